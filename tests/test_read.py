"""_read's own rules: one group loaded and evaluated by each read path, digests hashed over
exactly the bytes loaded, blobs that change after planning, the reader threads' priority,
traceback clearing and the per-group file cap.

Plans come from the real planner (`make_plan`) over a small synthetic store; the group calls
run here, in the test's thread, as the loader's worker threads run them. Whole loads are in
test_load.py.
"""

from __future__ import annotations

import hashlib
import os
import resource
import threading
import weakref
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import asyncweights as aw
from asyncweights import _read
from asyncweights._load import make_plan
from asyncweights._plan import BlobPlan, Plan
from asyncweights.testing import StoreBuilder, random_weights

#: "big" is above the default direct-read size (64 KiB), the others below it.
SHAPES = {"small": (16, 32), "big": (300, 128), "scalar": (), "vec": (7,)}
PATHS = ["fill", "direct", "lazy"]


def raw(array: mx.array) -> bytes:
    return np.asarray(array.reshape(-1).view(mx.uint8)).tobytes()


@pytest.fixture
def source(builder: StoreBuilder) -> dict[str, mx.array]:
    tensors = random_weights(SHAPES, mx.float16, seed="read")
    builder.add_model("m:latest", tensors)
    return tensors


def limits_for(path: str) -> aw.Limits:
    # direct: every blob read whole, reopened here (nothing kept from planning);
    # lazy: every blob through mx.load.
    if path == "direct":
        return aw.Limits(direct_read_bytes=1 << 20, prefetch_bytes=0)
    if path == "lazy":
        return aw.Limits(direct_read_bytes=0, prefetch_bytes=0)
    return aw.Limits()


async def plan_for(store_root: Path, path: str, monkeypatch: pytest.MonkeyPatch) -> Plan:
    fills = path == "fill"
    monkeypatch.setattr(_read, "mlx_fills_through_readinto", lambda: fills)
    model = await aw.ModelStore(store_root).open("m")
    return await make_plan(model, None, limits_for(path))


def load_all(plan: Plan, path: str, *, verify: bool) -> dict[str, aw.Tensor]:
    out: dict[str, aw.Tensor] = {}
    for group in plan.groups:
        nbytes = sum(blob.nbytes for blob in group)
        loaded = _read.load_group(group, None, verify, "m:latest", limits_for(path))
        assert loaded.nbytes == nbytes
        out |= {t.name: t for t in loaded.tensors}
    return out


def blob_of(plan: Plan, name: str) -> BlobPlan:
    return next(b for b in plan.blobs if any(t.name == name for t in b.tensors))


@pytest.mark.parametrize("path", PATHS)
async def test_every_read_path_loads_a_group_bit_exact_and_evaluated(
    store_root: Path, source: dict[str, mx.array], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = await plan_for(store_root, path, monkeypatch)
    loaded = load_all(plan, path, verify=True)
    assert sorted(loaded) == sorted(SHAPES)
    for name, t in loaded.items():
        expected = source[name]
        assert (t.array.dtype, tuple(t.array.shape)) == (mx.float16, SHAPES[name]), name
        assert raw(t.array) == raw(expected), name
        blob = blob_of(plan, name)
        assert t.info == aw.TensorInfo(
            name, mx.float16, SHAPES[name], expected.nbytes, blob.digest, name, "F16"
        )


@pytest.mark.parametrize("path", PATHS)
async def test_dtype_converts_floats_in_the_group(
    store_root: Path, source: dict[str, mx.array], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = await plan_for(store_root, path, monkeypatch)
    for group in plan.groups:
        for t in _read.load_group(group, mx.float32, False, "m:latest", limits_for(path)).tensors:
            assert t.array.dtype == mx.float32
            assert t.info.source_dtype == "F16"
            assert raw(t.array) == raw(source[t.name].astype(mx.float32)), t.name


def corrupt(blob_path: str) -> bytes:
    """Flip the last byte of a blob (tensor data, not the header); the new digest."""
    data = bytearray(Path(blob_path).read_bytes())
    data[-1] ^= 0xFF
    Path(blob_path).write_bytes(data)
    return bytes(data)


@pytest.mark.parametrize("path", PATHS)
async def test_verify_hashes_the_bytes_loaded_and_names_the_blob(
    store_root: Path, source: dict[str, mx.array], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = await aw.ModelStore(store_root).open("m")
    layer = next(x for x in model.tensor_layers if x.name == "big")
    blob_path = str(model.store.blob_path(layer.digest))
    actual = "sha256:" + hashlib.sha256(corrupt(blob_path)).hexdigest()

    plan = await plan_for(store_root, path, monkeypatch)
    with pytest.raises(aw.DigestMismatchError) as caught:
        load_all(plan, path, verify=True)
    err = caught.value
    assert (err.model, err.digest, err.path) == ("m:latest", layer.digest, Path(blob_path))
    assert str(err).startswith(f"blob bytes hash to {actual}"), str(err)

    # Without verify the same bytes load: the flipped byte is the last of "big".
    plan = await plan_for(store_root, path, monkeypatch)
    got = raw(load_all(plan, path, verify=False)["big"].array)
    want = bytearray(raw(source["big"]))
    want[-1] ^= 0xFF
    assert got == bytes(want)


def append_byte(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"\0")


@pytest.mark.parametrize("path", ["fill", "direct"])
async def test_a_blob_that_changes_after_planning_is_refused(
    store_root: Path, source: dict[str, mx.array], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = await plan_for(store_root, path, monkeypatch)
    blob = blob_of(plan, "big")  # not kept whole by planning: reopened by the group
    assert blob.data is None
    append_byte(blob.path)
    group = next(g for g in plan.groups if blob in g)
    with pytest.raises(aw.BlobError) as caught:
        _read.load_group(group, None, False, "m:latest", limits_for(path))
    err = caught.value
    assert type(err) is aw.BlobError
    assert (err.digest, err.path) == (blob.digest, Path(blob.path))
    assert str(err).startswith("blob changed while loading"), str(err)


async def test_verify_file_hashes_the_whole_file(
    store_root: Path, source: dict[str, mx.array], monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = await plan_for(store_root, "lazy", monkeypatch)
    blob = blob_of(plan, "big")
    monkeypatch.setattr(_read, "_HASH_CHUNK", 4096)  # several chunks
    _read.verify_file(blob, "m:latest")  # the stored bytes match their digest
    actual = "sha256:" + hashlib.sha256(corrupt(blob.path)).hexdigest()
    with pytest.raises(aw.DigestMismatchError, match=f"^blob bytes hash to {actual}"):
        _read.verify_file(blob, "m:latest")


def test_reader_threads_are_shared_per_nice_and_run_at_it() -> None:
    assert _read.reader_threads(19) is _read.reader_threads(19)
    assert _read.reader_threads(None) is not _read.reader_threads(19)

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = own_nice()
    assert _read.reader_threads(19).submit(own_nice).result(timeout=30) == 19
    assert _read.reader_threads(None).submit(own_nice).result(timeout=30) == base


def test_clear_chain_frames_frees_what_a_causes_frames_hold() -> None:
    class Held:
        pass

    def deep() -> None:
        held = Held()
        ref.append(weakref.ref(held))
        raise OSError("deep")

    ref: list[weakref.ref[Held]] = []
    try:
        try:
            deep()
        except OSError as cause:
            raise aw.LoadError("group failed", model="m") from cause
    except aw.LoadError as exc:
        error = exc
    assert ref[0]() is not None  # the cause's traceback keeps deep()'s locals alive
    _read.clear_chain_frames(error)
    assert ref[0]() is None
    assert isinstance(error.__cause__, OSError)  # the chain itself stays


@pytest.mark.parametrize(
    ("soft", "in_use", "max_open", "workers", "expected"),
    [
        (resource.RLIM_INFINITY, 0, 32, 2, 16),
        (1024, 24, 32, 2, 16),  # the cap fits under the limit
        (64, 24, 32, 2, 10),  # (64 - 24) // 2 = 20 files for the workers
        (20, 24, 32, 4, 1),  # no room: at least one file per group
    ],
)
def test_files_per_group_shares_the_cap_within_rlimit_nofile(
    monkeypatch: pytest.MonkeyPatch,
    soft: int,
    in_use: int,
    max_open: int,
    workers: int,
    expected: int,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, resource.RLIM_INFINITY))
    monkeypatch.setattr(os, "listdir", lambda _: ["x"] * in_use)
    limits = aw.Limits(max_open_files=max_open, workers=workers)
    assert _read.files_per_group(limits) == expected
