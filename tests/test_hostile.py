"""Hostile input and changing files (issue "Hostile input and changing files").

Each case loads through the public API as a careless or hostile caller would, and checks the
exact error type and message; after each, no blob file is open, no thread is still loading
and MLX's active memory is back where it was (the autouse `_no_leak` fixture).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import mlx.core as mx
import msgspec
import pytest

import asyncweights as aw
from asyncweights.testing import StoreBuilder, random_weights

from .conftest import open_fds, wait_quiet

MODEL = "hostile"


@pytest.fixture(autouse=True)
def _no_leak(store_root: Path) -> Iterator[None]:
    """No blob file open, no loading thread, no extra descriptor, MLX memory back."""
    mx.clear_cache()
    memory = mx.get_active_memory()
    fds = set(open_fds())
    yield
    if store_root.exists():
        wait_quiet(store_root)
    # A test's own arrays (its BuiltModel) can outlive it in a cycle through a caught error's
    # traceback until the collector runs: collected first, only a real leak is left to see.
    gc.collect()
    mx.clear_cache()
    assert mx.get_active_memory() <= memory
    where = str(store_root.parent)  # the store and anything else the test made
    leaked = [t for fd, t in open_fds().items() if fd not in fds and t.startswith(where)]
    assert leaked == []


async def fails(
    exc_type: type[aw.AsyncWeightsError],
    root: Path,
    *fragments: str,
    model: Any = MODEL,
    **kw: Any,
) -> aw.AsyncWeightsError:
    """Load `model` from the store at `root` (with `load_weights` keywords `kw`) and check the
    exact error type, that it is no group, and the message fragments."""
    try:
        with anyio.fail_after(30):  # nothing here may hang
            await aw.load_weights(model, store=root, **kw)
    except BaseException as caught:  # a group, or an untyped error, must fail the test below
        exc = caught
    else:
        raise AssertionError("the load did not fail")
    assert type(exc) is exc_type, repr(exc)
    for fragment in fragments:
        assert fragment in str(exc), (fragment, str(exc))
    return exc


def blob_file(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


class _Opens:
    """Every path `os.open` is asked for while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = os.open

        def recording(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            self.paths.append(os.fsdecode(path))
            return real(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", recording)


# ---------------------------------------------------------------- 1. names are not paths

HOSTILE_NAMES = [
    "/dev/zero",
    "/etc/shadow",
    "/proc/self/environ",
    "~root/.bashrc",
    "~/.ollama/models/manifests/registry.ollama.ai/library/x/latest",
    "../../../../etc/passwd",
    "./manifests/registry.ollama.ai/library/hostile/latest",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "ns/../../etc:passwd",
    "model\0",
    "C:\\Windows\\win.ini",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_a_str_is_always_a_model_name_never_a_path(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    builder.add_model(MODEL, random_weights({"w": (2,)}))
    opens = _Opens(monkeypatch)
    exc = await fails(aw.InvalidNameError, store_root, "invalid model name", model=name)
    assert exc.model == name
    root = str(store_root)
    outside = [p for p in opens.paths if not p.startswith(root)]
    assert outside == []


async def test_a_manifest_is_given_as_a_path_object(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = builder.add_model(MODEL, random_weights({"w": (2, 3)}))
    weights = await aw.load_weights(built.path, store=store_root)
    assert weights.model == str(built.path)
    assert mx.array_equal(weights["w"], built.expected["w"]).item()
    with pytest.raises(aw.InvalidNameError):
        await aw.load_weights(str(built.path), store=store_root)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "directory"])
async def test_a_manifest_path_that_is_no_regular_file_fails_at_once(
    builder: StoreBuilder, store_root: Path, tmp_path: Path, special: str
) -> None:
    builder.add_model(MODEL, random_weights({"w": (2,)}))
    path = Path(special)
    kind = "a character device"
    if special == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        kind = "a FIFO"
    elif special == "directory":
        path = tmp_path
        kind = "a directory"
    await fails(
        aw.ManifestError,
        store_root,
        f"manifest is not a regular file ({kind})",
        str(path),
        model=path,
    )


async def test_a_manifest_entry_replaced_by_a_fifo_fails_at_once(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = builder.add_model(MODEL, random_weights({"w": (2,)}))
    built.path.unlink()
    os.mkfifo(built.path)
    # A FIFO is no manifest entry (only files and links are): not found, at once.
    await fails(aw.ModelNotFoundError, store_root, "model not found in store")


# ------------------------------------------------------- 2. one way to open a store file


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "directory"])
async def test_a_config_blob_that_is_no_regular_file_fails_at_once(
    builder: StoreBuilder, store_root: Path, special: str
) -> None:
    built = builder.add_model(MODEL, random_weights({"w": (2,)}))
    path = blob_file(store_root, built.config.digest)
    path.unlink()
    kind = {"/dev/zero": "a character device", "fifo": "a FIFO", "directory": "a directory"}
    if special == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif special == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    await fails(
        aw.BlobError,
        store_root,
        f"config blob is not a regular file ({kind[special]})",
        f"model {MODEL!r}",
        built.config.digest,
    )


async def test_a_huge_config_blob_is_refused_before_any_read(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = builder.add_blob("w", {"w": mx.zeros((2,))})
    config = builder.add_config()
    huge = 1 << 30
    path = blob_file(store_root, config.digest)
    os.truncate(path, huge)  # sparse: what /dev/zero or a planted file would cost to read
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {**msgspec.to_builtins(config), "size": huge},
        "layers": [msgspec.to_builtins(weights)],
    }
    from asyncweights._writer import write_manifest

    write_manifest(store_root, MODEL, json.dumps(manifest).encode())
    opens = _Opens(monkeypatch)
    await fails(
        aw.BlobError,
        store_root,
        f"config blob is {huge} bytes, over Limits.max_config_bytes ({64 << 20})",
        config.digest,
    )
    assert str(path) not in opens.paths  # refused from the manifest's size, never opened


async def test_a_config_blob_larger_than_the_manifest_says_is_not_read(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = builder.add_model(MODEL, random_weights({"w": (2,)}))
    path = blob_file(store_root, built.config.digest)
    os.truncate(path, 1 << 30)
    await fails(
        aw.SizeMismatchError,
        store_root,
        f"config blob is {1 << 30} bytes but the manifest says {built.config.size}",
    )


async def test_a_huge_manifest_is_refused_before_any_read(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = builder.add_model(MODEL, random_weights({"w": (2,)}))
    os.truncate(built.path, 1 << 30)
    await fails(
        aw.ManifestError,
        store_root,
        f"manifest is {1 << 30} bytes, over Limits.max_manifest_bytes ({64 << 20})",
        f"model {MODEL!r}",
    )


async def test_a_tensor_blob_that_is_a_device_fails_at_once(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = builder.add_model(MODEL, random_weights({"w": (2,)}))
    layer = built.layers[0]
    path = blob_file(store_root, layer.digest)
    path.unlink()
    path.symlink_to("/dev/zero")
    await fails(aw.BlobError, store_root, "blob is not a regular file (a character device)")


# --------------------------------------------------------------------- 3. errors, typed

_RAISED: dict[str, tuple[Callable[[], BaseException], type[aw.AsyncWeightsError], str]] = {
    "memory": (lambda: MemoryError(), aw.BudgetError, "out of memory: MemoryError"),
    "oserror": (
        lambda: OSError(errno.EIO, os.strerror(errno.EIO)),
        aw.LoadError,
        "I/O error: Input/output error",
    ),
    "mlx": (lambda: ValueError("[eval] boom"), aw.LoadError, "unexpected ValueError: [eval] boom"),
}


@pytest.mark.parametrize("case", _RAISED)
async def test_anything_raised_while_evaluating_is_one_typed_error(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    builder.add_model(MODEL, random_weights({"a": (64, 64), "b": (3,)}))
    make, expected, message = _RAISED[case]
    raised: list[BaseException] = []

    def failing_eval(*args: Any) -> None:
        raised.append(make())
        raise raised[-1]

    monkeypatch.setattr(mx, "eval", failing_eval)
    exc = await fails(expected, store_root, message, f"model {MODEL!r}")
    assert exc.__cause__ is raised[0]
    if case == "oserror":
        assert exc.errno == errno.EIO


@pytest.mark.parametrize("case", _RAISED)
async def test_anything_raised_while_planning_is_one_typed_error(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    from asyncweights import _read

    builder.add_model(MODEL, random_weights({"a": (4,), "b": (3,)}))
    make, expected, message = _RAISED[case]

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise make()

    monkeypatch.setattr(_read, "head_of", failing)
    if case == "oserror":  # the planner words it, naming the blob it was reading
        message = "cannot read blob header: Input/output error"
    exc = await fails(expected, store_root, message)
    assert exc.__cause__ is not None
    assert not isinstance(exc.__cause__, BaseExceptionGroup)


async def test_stream_weights_errors_are_typed_too(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder.add_model(MODEL, random_weights({"a": (4,)}))

    def failing_eval(*args: Any) -> None:
        raise MemoryError

    monkeypatch.setattr(mx, "eval", failing_eval)

    async def consume() -> None:
        async with aw.stream_weights(MODEL, store=store_root) as tensors:
            async for _ in tensors:
                pass

    with pytest.raises(aw.BudgetError, match="out of memory"):
        await consume()


async def test_listing_goes_on_past_unreadable_folders_and_symlink_loops(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder.add_model("good:latest", random_weights({"w": (2,)}))
    builder.add_model("other/also:latest", random_weights({"w": (2,)}))
    library = store_root / "manifests/registry.ollama.ai/library"
    (library / "loop").symlink_to(library / "loop")  # ELOOP when listed
    (library / "locked").mkdir()
    real = Path.iterdir

    def iterdir(self: Path) -> Any:
        if self.name == "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    store = aw.ModelStore(store_root)
    errors: list[aw.ManifestError] = []
    names = [str(n) async for n in store.models(on_error=errors.append)]
    assert names == ["good:latest", "other/also:latest"]
    assert sorted((type(e), e.errno) for e in errors) == sorted(
        [(aw.ManifestError, errno.ELOOP), (aw.ManifestError, errno.EACCES)]
    )
    assert {str(e.path) for e in errors} == {str(library / "loop"), str(library / "locked")}
    assert all(e.reason.startswith("cannot list manifests: ") for e in errors)
    assert [str(n) async for n in store.models()] == names  # no callback: skipped quietly


async def test_nul_in_a_path_or_name_is_a_typed_error(store_root: Path, tmp_path: Path) -> None:
    with pytest.raises(aw.ManifestError) as root:
        aw.ModelStore(f"{tmp_path}/a\0b")
    assert root.value.reason == "models root path contains a NUL character"
    assert "\0" not in str(root.value)
    with pytest.raises(aw.ManifestError) as path:
        await aw.load_weights(Path(f"{tmp_path}/m\0"), store=store_root)
    assert path.value.reason == "manifest path contains a NUL character"
    with pytest.raises(aw.InvalidNameError, match="bad character"):
        await aw.load_weights("m\0:latest", store=store_root)


# ---------------------------------------------------------------- 4. caps on metadata


def _three_layers(builder: StoreBuilder) -> None:
    builder.add_model(MODEL, random_weights({"a": (2,), "b": (2,), "c": (2,)}))


def _long_layer_name(builder: StoreBuilder) -> None:
    builder.write_manifest(MODEL, [builder.add_blob("n" * 40, {"w": mx.zeros((2,))})])


def _three_tensors_one_long_name(builder: StoreBuilder) -> None:
    tensors = {"a": mx.zeros((2,)), "b": mx.zeros((2,)), "c" * 50: mx.ones(1)}
    builder.write_manifest(MODEL, [builder.add_blob("w", tensors)])


# How to build a model over one cap, the error, its message, and the Limits with that cap.
Cap = tuple[Callable[[StoreBuilder], None], type[aw.AsyncWeightsError], str, aw.Limits]
_CAPS: dict[str, Cap] = {
    "layers": (
        _three_layers, aw.ManifestError, "manifest has 4 layers, over Limits.max_layers (3)",
        aw.Limits(max_layers=3),
    ),
    "layer-name": (
        _long_layer_name, aw.ManifestError,
        "layer 0 has a name of 40 bytes, over Limits.max_name_bytes (32)",
        aw.Limits(max_name_bytes=32),
    ),
    "tensors": (
        _three_tensors_one_long_name, aw.HeaderError,
        "header has 3 tensors, over Limits.max_tensors (2)", aw.Limits(max_tensors=2),
    ),
    "tensor-name": (
        _three_tensors_one_long_name, aw.HeaderError,
        "tensor name of 50 bytes, over Limits.max_name_bytes (40)", aw.Limits(max_name_bytes=40),
    ),
}  # fmt: skip


@pytest.mark.parametrize("cap", _CAPS)
async def test_each_metadata_cap_names_itself(
    builder: StoreBuilder, store_root: Path, cap: str
) -> None:
    build, error, message, limits = _CAPS[cap]
    build(builder)
    await fails(error, store_root, message, limits=limits)


async def test_header_bytes_cap_is_checked_before_the_header_is_read(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = builder.add_blob("w", {"w" * 300: mx.zeros((2,))})
    builder.write_manifest(MODEL, [layer])
    size = int.from_bytes(blob_file(store_root, layer.digest).read_bytes()[:8], "little")
    await fails(
        aw.HeaderError,
        store_root,
        f"header length {size} is over Limits.max_header_bytes (256)",
        layer.digest,
        limits=aw.Limits(max_header_bytes=256, direct_read_bytes=0),
    )


@pytest.mark.parametrize("direct", [True, False], ids=["read-whole", "header-only"])
async def test_a_header_over_64_kib_is_decoded_in_steps_and_loads_exactly(
    builder: StoreBuilder, store_root: Path, direct: bool
) -> None:
    tensors = {f"blocks.{i}.attention.weight": mx.full((2,), i, mx.int32) for i in range(1500)}
    layer = builder.add_blob("many", tensors)
    builder.write_manifest(MODEL, [layer])
    size = int.from_bytes(blob_file(store_root, layer.digest).read_bytes()[:8], "little")
    assert size > 64 * 1024
    limits = aw.Limits(direct_read_bytes=1 << 30 if direct else 0)
    weights = await aw.load_weights(MODEL, store=store_root, limits=limits)
    assert sorted(weights) == sorted(tensors)
    for name, array in tensors.items():
        assert mx.array_equal(weights[name], array).item(), name


async def test_a_duplicate_key_in_a_big_header_is_found(
    builder: StoreBuilder, store_root: Path
) -> None:
    entries = ",".join(
        f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(3000)
    )
    text = ("{" + entries + ',"t7":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}').encode()
    layer = builder.add_bytes("w", len(text).to_bytes(8, "little") + text + bytes(3000))
    builder.write_manifest(MODEL, [layer])
    await fails(aw.HeaderError, store_root, "duplicate key 't7' in header", "tensor 't7'")


async def test_a_manifest_over_64_kib_loads_exactly(
    builder: StoreBuilder, store_root: Path
) -> None:
    tensors = {f"t{i:04}": mx.full((1,), i, mx.int32) for i in range(500)}
    built = builder.add_model(MODEL, tensors)
    # One msgspec call up to 4 MiB, steps above (test_manifest pins which path runs).
    assert built.path.stat().st_size > 64 * 1024
    weights = await aw.load_weights(MODEL, store=store_root)
    assert sorted(weights) == sorted(tensors)
    assert all(weights[name].item() == int(name[1:]) for name in tensors)
    model = await aw.ModelStore(store_root).open(MODEL)
    assert len(model.manifest.layers) == len(built.layers)


async def test_no_thread_is_left_after_a_refused_load(
    builder: StoreBuilder, store_root: Path
) -> None:
    builder.add_model(MODEL, random_weights({"a": (2,)}))
    before = {t.ident for t in threading.enumerate()}
    for _ in range(5):
        with pytest.raises(aw.ManifestError):
            await aw.load_weights(MODEL, store=store_root, limits=aw.Limits(max_layers=1))
    busy = [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and not t.name.startswith(("AnyIO", "asyncweights-reader"))
    ]
    assert busy == []


def test_limits_reject_caps_below_one() -> None:
    for cap in (
        "max_manifest_bytes",
        "max_layers",
        "max_config_bytes",
        "max_header_bytes",
        "max_tensors",
        "max_name_bytes",
    ):
        with pytest.raises(ValueError, match=f"Limits.{cap} must be at least 1"):
            aw.Limits(**{cap: 0})  # type: ignore[arg-type]


# ---------------------------------------------------- one open per blob, files changing under it


def _independent(data: bytes) -> dict[str, bytes]:
    """Each tensor's bytes of a safetensors file, read with json and slicing only."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return {
        k: data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]]
        for k, v in header.items()
    }


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
@pytest.mark.parametrize("held", [True, False], ids=["held-open", "read-whole"])
async def test_blob_swapped_many_times_during_loads_loads_one_version_or_fails(
    builder: StoreBuilder, store_root: Path, verify: bool, held: bool
) -> None:
    """A thread swaps one blob between two versions (atomic renames, and in-place rewrites
    when verifying) while loads run, for a bounded time. Every load either fails with one
    typed error or returns exactly one version's validated bytes, never a mix: each blob is
    opened once and its data read through the descriptor its header was checked through."""
    shapes = {"a": (64, 64), "b": (32,), "c": (48, 16)}
    model = builder.add_model(MODEL, random_weights(shapes, seed=3))
    layer = next(x for x in model.layers if x.name == "b")
    path = blob_file(store_root, layer.digest)
    original = path.read_bytes()
    n = int.from_bytes(original[:8], "little")
    flipped = original[: 8 + n] + bytes(x ^ 0xFF for x in original[8 + n :])
    versions = {_independent(original)["b"], _independent(flipped)["b"]}
    assert len(versions) == 2
    spare = store_root.parent / "spare"
    spare.mkdir()
    limits = aw.Limits(workers=2, group_bytes=4096, prefetch_bytes=0 if held else 1 << 30)
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            data = flipped if i % 2 else original
            if verify and i % 3 == 0:
                with open(path, "r+b") as f:  # in place: a load may see half of each
                    f.seek(8 + n)
                    f.write(data[8 + n :])
            else:
                tmp = spare / f"v{i}"
                tmp.write_bytes(data)
                os.replace(tmp, path)
            i += 1

    expected = {k: bytes(memoryview(v)) for k, v in model.expected.items()}  # type: ignore[arg-type]
    await aw.load_weights(MODEL, store=store_root, verify=verify, limits=limits)  # pools made
    threads = _our_threads()
    loaded = failed = 0
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        with anyio.fail_after(20):
            deadline = anyio.current_time() + 1.5
            while anyio.current_time() < deadline:
                try:
                    weights = await aw.load_weights(
                        MODEL, store=store_root, verify=verify, limits=limits
                    )
                except (aw.BlobError, aw.HeaderError):  # any other error fails the test
                    failed += 1
                    continue
                got = {k: bytes(memoryview(v)) for k, v in weights.items()}  # type: ignore[arg-type]
                del weights
                assert got["b"] in versions  # one version whole, never a mix
                if verify:
                    assert got["b"] == _independent(original)["b"]  # what the digest names
                assert {k: v for k, v in got.items() if k != "b"} == {
                    k: v for k, v in expected.items() if k != "b"
                }
                loaded += 1
    finally:
        stop.set()
        thread.join(5)
    path.write_bytes(original)
    assert loaded + failed >= 5, (loaded, failed)
    assert loaded >= 1  # the version a load checked is the version it returns
    wait_quiet(store_root)
    assert _our_threads() == threads  # and the autouse fixture: no fd, MLX memory back


def _our_threads() -> int:
    return sum(t.name.startswith("asyncweights") for t in threading.enumerate())
