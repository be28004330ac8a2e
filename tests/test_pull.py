"""Pulling from registries: Debian's docker-registry for real, and a fake for what it cannot do.

Every pulled model is checked bit-exact against what the store builder wrote, blob files
byte-for-byte against the source store, and the store layout against Ollama 0.40's
(``manifests-v2`` symlink to the manifest blob, legacy anchor with the manifest layer).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import mlx.core as mx
import pytest

import asyncweights as aw
from asyncweights._pull import PARTIAL_MAX_AGE, partial_path, sweep_partials
from asyncweights.testing import BuiltModel, StoreBuilder, random_weights

from .cli_support import cli
from .conftest import blob_fds, wait_quiet
from .registry_support import FakeRegistry, RealRegistry, fake_registry, registry_missing
from .server_support import SERVER, serve

KiB = 1 << 10
OLLAMA_LIST = "application/vnd.ollama.manifest.list.v2+json"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
Models = dict[str, BuiltModel]  # the models of the source store, by registry repository name


def _image_model(builder: StoreBuilder, name: str, blocks: int, seed: int) -> BuiltModel:
    shapes: dict[str, tuple[int, ...]] = {
        f"transformer/blocks.{i}.weight": (32, 256) for i in range(blocks)
    }
    shapes["transformer/norm.weight"] = (256,)
    shapes.update({f"vae/conv.{i}.weight": (16, 16) for i in range(3)})
    return builder.add_model(
        name,
        random_weights(shapes, seed=seed),
        configs={"model_index.json": {"_class_name": "ZImagePipeline"}},
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, BuiltModel]]:
    """A source store with the models the registries serve."""
    root = tmp_path_factory.mktemp("source") / "store"
    builder = StoreBuilder(root)
    models = {
        "img": _image_model(builder, "img", 12, seed=1),
        "q4": builder.add_model(
            "q4",
            random_weights({"layers.0.mlp.weight": (64, 128), "embed.weight": (32, 64)}, seed=2),
            quantize="int4",
        ),
        "slow": _image_model(builder, "slow", 24, seed=3),
    }
    for era in ("E0", "E1", "E2", "E3"):
        shapes: dict[str, tuple[int, ...]] = {
            f"layers.{i}.mlp.{kind}.weight": (64, 128) for i in range(3) for kind in ("up", "down")
        }
        shapes["norm.weight"] = (128,)
        models[f"q-{era.lower()}"] = builder.add_model(
            f"q-{era.lower()}", random_weights(shapes, seed=era), era=era, quantize="int4"
        )
    return root, models


@pytest.fixture(scope="module")
def real_registry(
    tmp_path_factory: pytest.TempPathFactory, source: tuple[Path, dict[str, BuiltModel]]
) -> Iterator[RealRegistry]:
    reason = registry_missing()
    if reason is not None:
        pytest.skip(reason)
    root, models = source
    with RealRegistry.start(tmp_path_factory.mktemp("registry")) as registry:
        for name, built in models.items():
            registry.push(root, built.path, f"library/{name}", "latest")
        yield registry


@pytest.fixture
def fake(
    source: tuple[Path, dict[str, BuiltModel]],
) -> Iterator[tuple[FakeRegistry, FakeRegistry]]:
    root, models = source
    with fake_registry() as (registry, cdn):
        for name, built in models.items():
            registry.add_store_model(root, built.path, f"library/{name}", "latest")
        yield registry, cdn


@pytest.fixture
def registry(fake: tuple[FakeRegistry, FakeRegistry]) -> FakeRegistry:
    """The fake registry, serving every model of the source store as library/NAME:latest."""
    return fake[0]


@pytest.fixture
def cdn(fake: tuple[FakeRegistry, FakeRegistry]) -> FakeRegistry:
    """The fake registry's second host, where it can redirect blob downloads."""
    return fake[1]


@pytest.fixture
def source_root(source: tuple[Path, dict[str, BuiltModel]]) -> Path:
    """The root of the source store the registries serve."""
    return source[0]


@pytest.fixture
def models(source: tuple[Path, Models]) -> Models:
    """The models the registries serve, as the store builder wrote them."""
    return source[1]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """The store a test pulls into (not made: a pull makes it)."""
    return tmp_path / "store"


def assert_same(got: dict[str, mx.array] | aw.Weights, expected: dict[str, mx.array]) -> None:
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, name
        assert mx.array_equal(got[name], array).item(), name


def assert_layout(store: Path, source_root: Path, built: BuiltModel, name: str) -> None:
    """Ollama 0.40's layout: blobs byte-equal to the source, v2 link, legacy anchor."""
    data = built.path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    v2 = store / "manifests-v2" / "ollama.com" / "library" / name / "latest"
    assert v2.is_symlink()
    assert os.readlink(v2) == f"../../../../blobs/{digest.replace(':', '-')}"
    assert v2.read_bytes() == data
    anchor = json.loads(
        (store / "manifests/registry.ollama.ai/library" / name / "latest").read_bytes()
    )
    source_doc = json.loads(data)
    assert anchor["config"] == source_doc["config"]
    assert anchor["layers"] == [
        *source_doc["layers"],
        {"mediaType": MANIFEST_V2, "digest": digest, "size": len(data)},
    ]
    for layer in [source_doc["config"], *source_doc["layers"]]:
        file = layer["digest"].replace(":", "-")
        assert (store / "blobs" / file).read_bytes() == (source_root / "blobs" / file).read_bytes()
    leftovers = [p.name for p in (store / "blobs").iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ----------------------------------------------------------------------------- real registry


async def test_pull_from_docker_registry_then_load_bit_exact(
    real_registry: RealRegistry, source_root: Path, models: Models, store: Path
) -> None:
    events: list[aw.Progress] = []
    model = await aw.pull("img", store=store, registry=real_registry.url, on_progress=events.append)
    assert model.label == "img"
    assert_layout(store, source_root, models["img"], "img")
    weights = await aw.load_weights("img", store=store)
    assert_same(weights, models["img"].expected)
    assert events[0].to_ollama() == {"status": "pulling manifest"}
    assert events[-2].to_ollama() == {"status": "writing manifest"}
    assert events[-1].phase == "done"
    layers = [models["img"].config, *models["img"].layers]
    total = sum({layer.digest: layer.size for layer in layers}.values())
    assert (events[-1].completed_bytes, events[-1].total_bytes) == (total, total)


async def test_https_to_a_plain_http_registry_fails_at_once_and_says_how_to_fix_it(
    real_registry: RealRegistry, tmp_path: Path
) -> None:
    # A registry named without a scheme gets https://; docker-registry here speaks plain
    # HTTP. The handshake fails the same way every time: one attempt, and the message says
    # how to name a plain-HTTP registry (it said "request failed after 6 attempts:
    # ConnectError: [SSL: WRONG_VERSION_NUMBER] ...").
    store = tmp_path / "store"
    host = real_registry.url.removeprefix("http://")
    with pytest.raises(aw.RegistryError) as info:
        await aw.pull("img", store=store, registry=host)
    exc = info.value
    assert type(exc) is aw.RegistryError
    message = str(exc)
    assert message.startswith("TLS handshake failed: [SSL: WRONG_VERSION_NUMBER]"), message
    assert "a registry that speaks plain HTTP is given as http://host:port" in message
    assert "(or insecure=True, CLI --insecure)" in message
    assert f"registry https://{host}" in message
    assert "attempts" not in message
    assert not (store / "manifests").exists()
    model = await aw.pull("img", store=store, registry=host, insecure=True)
    assert model.label == "img"


async def test_pull_quantized_model_from_docker_registry(
    real_registry: RealRegistry, source_root: Path, models: Models, store: Path
) -> None:
    await aw.pull("q4:latest", store=store, registry=real_registry.url)
    assert_layout(store, source_root, models["q4"], "q4")
    weights = await aw.load_weights("q4", store=store)
    assert_same(weights, models["q4"].expected)
    assert weights.quantization is not None
    assert weights.quantization.type == "int4"


async def test_load_with_pull_from_docker_registry(
    real_registry: RealRegistry, source_root: Path, models: Models, store: Path
) -> None:
    weights = await aw.load_weights(
        "img", "transformer", store=store, pull=True, registry=real_registry.url
    )
    assert_same(weights, models["img"].component("transformer"))
    assert_layout(store, source_root, models["img"], "img")  # the other components too


async def test_stream_with_pull_from_docker_registry(
    real_registry: RealRegistry, models: Models, store: Path
) -> None:
    got: dict[str, mx.array] = {}
    async with aw.stream_weights(
        "img", "vae", store=store, pull=True, registry=real_registry.url
    ) as tensors:
        async for tensor in tensors:
            got[tensor.name] = tensor.array
    assert_same(got, models["img"].component("vae"))


async def test_pull_missing_tag_is_registry_not_found(
    real_registry: RealRegistry, tmp_path: Path
) -> None:
    with pytest.raises(aw.RegistryNotFoundError) as caught:
        await aw.pull("img:nope", store=tmp_path / "store", registry=real_registry.url)
    assert isinstance(caught.value, aw.ModelNotFoundError)
    assert caught.value.status == 404
    assert str(caught.value) == (
        "HTTP 404 Not Found for the manifest: manifest unknown "
        f"(model 'img:nope', registry {real_registry.url}, repository library/img)"
    )
    assert not (tmp_path / "store" / "manifests").exists()


async def test_repull_downloads_nothing_and_verify_replaces_a_damaged_blob(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    await aw.pull("q4", store=store, registry=registry.url)
    first = len(registry.requests)
    await aw.pull("q4", store=store, registry=registry.url)
    assert [r[0] for r in registry.requests[first:]] == ["manifest"]
    # Same size, wrong bytes: trusted as Ollama trusts it, unless verify=True.
    layer = models["q4"].layers[0]
    blob = store / "blobs" / layer.digest.replace(":", "-")
    damaged = bytearray(blob.read_bytes())
    damaged[-1] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    second = len(registry.requests)
    await aw.pull("q4", store=store, registry=registry.url)
    assert len(registry.requests) == second + 1
    await aw.pull("q4", store=store, registry=registry.url, verify=True)
    assert [r[1] for r in registry.requests[second + 1 :]] == [
        "/v2/library/q4/manifests/latest",
        f"/v2/library/q4/blobs/{layer.digest}",
    ]
    assert_layout(store, source_root, models["q4"], "q4")


# ------------------------------------------------------------------------------ fake registry


async def test_redirect_to_another_host_never_carries_the_token(
    registry: FakeRegistry, cdn: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    registry.token = "s3cret"
    registry.redirect_to = cdn.url
    await aw.pull("img", store=store, registry=registry.url)
    assert_layout(store, source_root, models["img"], "img")
    kinds = [kind for kind, _, _ in registry.requests]
    assert kinds[:3] == ["manifest", "token", "manifest"]
    assert registry.requests[0][2].get("authorization") is None
    assert all(h.get("authorization") == "Bearer s3cret" for k, _, h in registry.requests[2:])
    blobs = {p.rsplit("/", 1)[1] for _, p, _ in cdn.requests}
    assert blobs == {layer.digest for layer in [models["img"].config, *models["img"].layers]}
    assert all("authorization" not in headers for _, _, headers in cdn.requests)


async def test_bearer_token_refused_is_an_auth_error(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.token = "s3cret"
    registry.issued_token = "expired"  # handed out, then refused: one retry only
    with pytest.raises(aw.RegistryAuthError) as caught:
        await aw.pull("q4", store=tmp_path / "store", registry=registry.url)
    assert caught.value.status == 401
    assert "authentication required" in str(caught.value)
    assert [k for k, _, _ in registry.requests] == ["manifest", "token", "manifest"]


async def test_ollama_manifest_list_resolves_to_the_mlx_child(
    registry: FakeRegistry, models: Models, store: Path
) -> None:
    child = models["q4"].path.read_bytes()
    child_digest = "sha256:" + hashlib.sha256(child).hexdigest()
    other = "sha256:" + "ab" * 32
    listing = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OLLAMA_LIST,
            "manifests": [
                {"mediaType": MANIFEST_V2, "digest": other, "runner": "llamacpp", "format": "gguf"},
                {
                    "mediaType": MANIFEST_V2,
                    "digest": child_digest,
                    "runner": "mlx",
                    "format": "safetensors",
                },
            ],
        }
    ).encode()
    registry.add_manifest("library/multi", "latest", listing, OLLAMA_LIST)
    registry.blobs[child_digest] = child  # Ollama fetches list children as blobs
    await aw.pull("multi", store=store, registry=registry.url)
    list_digest = "sha256:" + hashlib.sha256(listing).hexdigest()
    v2 = store / "manifests-v2/ollama.com/library/multi/latest"
    assert os.readlink(v2) == f"../../../../blobs/{list_digest.replace(':', '-')}"
    assert (store / "blobs" / child_digest.replace(":", "-")).read_bytes() == child
    anchor = json.loads((store / "manifests/registry.ollama.ai/library/multi/latest").read_bytes())
    assert anchor["layers"][-2:] == [
        {"mediaType": OLLAMA_LIST, "digest": list_digest, "size": len(listing)},
        {"mediaType": MANIFEST_V2, "digest": child_digest, "size": len(child)},
    ]
    weights = await aw.load_weights("multi", store=store)
    assert_same(weights, models["q4"].expected)


async def test_manifest_list_without_mlx_child(registry: FakeRegistry, tmp_path: Path) -> None:
    listing = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OLLAMA_LIST,
            "manifests": [
                {"mediaType": MANIFEST_V2, "digest": "sha256:" + "cd" * 32, "runner": "ggml"}
            ],
        }
    ).encode()
    registry.add_manifest("library/gguf", "latest", listing, OLLAMA_LIST)
    with pytest.raises(aw.ManifestError) as caught:
        await aw.pull("gguf", store=tmp_path / "store", registry=registry.url)
    assert str(caught.value) == (
        "no compatible manifest in the list (runners: ggml) (model 'gguf')"
    )


async def test_412_is_a_precondition_error_with_the_registry_message(
    registry: FakeRegistry, store: Path
) -> None:
    registry.manifest_status = (412, "this model requires macOS")
    with pytest.raises(aw.PreconditionFailedError) as caught:
        await aw.pull("img:mlx", store=store, registry=registry.url)
    assert str(caught.value) == (
        "HTTP 412 Precondition Failed for the manifest: this model requires macOS "
        f"(model 'img:mlx', registry {registry.url}, repository library/img)"
    )
    assert (caught.value.registry, caught.value.repository) == (registry.url, "library/img")
    assert store.name not in os.listdir(store.parent)  # the store itself was not made


@pytest.mark.parametrize(
    ("status", "error", "phrase"),
    [
        (401, aw.RegistryAuthError, "Unauthorized"),
        (403, aw.RegistryAuthError, "Forbidden"),
        (404, aw.RegistryNotFoundError, "Not Found"),
        (500, aw.RegistryServerError, "Internal Server Error"),
        (400, aw.RegistryError, "Bad Request"),
    ],
)
async def test_each_http_failure_has_its_error(
    registry: FakeRegistry, tmp_path: Path, status: int, error: type[aw.RegistryError], phrase: str
) -> None:
    registry.manifest_status = (status, "no, because")
    with pytest.raises(error) as caught:
        await aw.pull(
            "q4", store=tmp_path, registry=registry.url, limits=aw.Limits(registry_retries=0)
        )
    assert type(caught.value) is error
    assert caught.value.status == status
    assert str(caught.value) == (
        f"HTTP {status} {phrase} for the manifest: no, because "
        f"(model 'q4', registry {registry.url}, repository library/q4)"
    )


async def test_a_stalled_download_times_out_then_fails(
    registry: FakeRegistry, models: Models, tmp_path: Path
) -> None:
    registry.chunk = 4 * KiB
    registry.delay = 1.0  # longer than the read timeout between two chunks
    limits = aw.Limits(registry_timeout=0.2, registry_retries=1)
    with pytest.raises(aw.RegistryError) as caught:
        await aw.pull("q4", store=tmp_path / "store", registry=registry.url, limits=limits)
    assert type(caught.value) is aw.RegistryError
    assert caught.value.digest in {layer.digest for layer in models["q4"].layers} | {
        models["q4"].config.digest
    }
    assert "download broke off 2 times, last: ReadTimeout" in str(caught.value)
    assert not (tmp_path / "store" / "manifests").exists()


async def test_server_errors_are_retried_then_raised(
    registry: FakeRegistry, source_root: Path, models: Models, tmp_path: Path
) -> None:
    layer = models["q4"].layers[0]
    registry.fail_first[layer.digest] = 2
    await aw.pull("q4", store=tmp_path / "a", registry=registry.url)
    assert_layout(tmp_path / "a", source_root, models["q4"], "q4")
    registry.fail_first[layer.digest] = 10
    with pytest.raises(aw.RegistryServerError) as caught:
        await aw.pull(
            "q4", store=tmp_path / "b", registry=registry.url, limits=aw.Limits(registry_retries=1)
        )
    assert caught.value.status == 503
    assert caught.value.digest == layer.digest
    assert str(caught.value).startswith("HTTP 503 Service Unavailable for the blob")
    assert not (tmp_path / "b" / "manifests").exists()


async def test_connection_dropped_mid_blob_resumes_with_range(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    registry.chunk = 4 * KiB
    layer = max(models["img"].layers, key=lambda layer: layer.size)
    registry.drop_after[layer.digest] = 12 * KiB
    await aw.pull("img", store=store, registry=registry.url)
    assert_layout(store, source_root, models["img"], "img")
    ranges = [h.get("range") for k, p, h in registry.requests if p.endswith(layer.digest)]
    assert ranges == [None, f"bytes={12 * KiB}-"]


async def test_wrong_bytes_are_a_digest_mismatch_and_nothing_is_kept(
    registry: FakeRegistry, models: Models, store: Path
) -> None:
    layer = models["img"].layers[2]
    good = registry.blobs[layer.digest]
    registry.wrong[layer.digest] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(aw.DigestMismatchError) as caught:
        await aw.pull("img", store=store, registry=registry.url)
    bad = "sha256:" + hashlib.sha256(registry.wrong[layer.digest]).hexdigest()
    assert str(caught.value) == (
        f"registry {registry.url} sent bytes with sha256 {bad}; nothing kept "
        f"(model 'img', tensor {layer.name!r}, blob {layer.digest})"
    )
    assert not (store / "blobs" / layer.digest.replace(":", "-")).exists()
    assert not partial_path(aw.ModelStore(store), layer.digest).exists()
    assert not (store / "manifests").exists()
    assert not (store / "manifests-v2").exists()


async def test_plain_http_only_on_explicit_request(tmp_path: Path) -> None:
    with pytest.raises(aw.InvalidNameError) as caught:
        await aw.pull("img", store=tmp_path, registry="ftp://127.0.0.1:1")
    assert "must be http:// or https://" in str(caught.value)
    with pytest.raises(aw.InvalidNameError):
        await aw.load_weights(str(tmp_path / "manifest"), store=tmp_path, pull=True)


# ------------------------------------------------------------------------------------ overlap


async def test_first_tensor_arrives_before_the_pull_ends(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    registry.chunk = 2 * KiB
    registry.delay = 0.002  # 16 KiB blobs: about 16 ms each, 4 at a time
    link = store / "manifests-v2/ollama.com/library/slow/latest"
    got: dict[str, mx.array] = {}
    missing_at_first: list[int] = []
    # Groups of one blob: a group is read once all its blobs are in the store.
    limits = aw.Limits(group_bytes=32 * KiB)
    async with aw.stream_weights(
        "slow", "transformer", store=store, pull=True, registry=registry.url, limits=limits
    ) as tensors:
        async for tensor in tensors:
            if not got:
                assert not link.exists()  # the manifest is written last
                missing_at_first.append(
                    sum(
                        not (store / "blobs" / layer.digest.replace(":", "-")).exists()
                        for layer in models["slow"].layers
                    )
                )
            got[tensor.name] = tensor.array
    assert missing_at_first[0] > len(models["slow"].layers) // 2
    assert_same(got, models["slow"].component("transformer"))
    assert_layout(store, source_root, models["slow"], "slow")


@pytest.mark.parametrize("era", ["E0", "E1", "E2", "E3"])
async def test_load_while_pulling_keeps_quantization_of_every_era(
    registry: FakeRegistry, models: Models, store: Path, tmp_path: Path, era: str
) -> None:
    """Segments planned as blobs arrive give the facts a whole-model plan gives."""
    registry.chunk = 1 * KiB
    registry.delay = 0.001  # blobs trickle in: the load is cut into several segments
    name = f"q-{era.lower()}"
    streamed: dict[str, aw.Tensor] = {}
    limits = aw.Limits(group_bytes=4 * KiB)  # a turn per few blobs
    async with aw.stream_weights(
        name, store=store, pull=True, registry=registry.url, limits=limits
    ) as tensors:
        async for tensor in tensors:
            streamed[tensor.name] = tensor
    assert_same({n: t.array for n, t in streamed.items()}, models[name].expected)
    local = await aw.load_weights(name, store=store)
    assert {n: t.info for n, t in streamed.items()} == dict(local.info)
    packed = [n for n, info in local.info.items() if info.quantization is not None]
    assert len(packed) == 6
    again = await aw.load_weights(
        name, store=tmp_path / "again", pull=True, registry=registry.url, limits=limits
    )
    assert again.quantization == local.quantization
    assert again.quantization is not None
    assert dict(again.info) == dict(local.info)
    assert list(again) == list(local)


@pytest.mark.parametrize("stage", ["manifest", "planning", "blobs", "first-tensor", "late"])
async def test_cancel_at_every_stage_then_resume_bit_exact(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path, stage: str
) -> None:
    registry.chunk = 2 * KiB
    registry.delay = 0.002
    # Blob requests after these wait until the cancel is done: the pull cannot finish
    # first, however slow the machine.
    registry.gate_after = 2 + 10  # the config and JSON layer, then 10 tensor blobs
    built = models["slow"]
    seen = anyio.Event()
    gc.collect()
    mx.clear_cache()
    memory_before = mx.get_active_memory()

    async def on_progress(event: aw.Progress) -> None:
        if stage == "manifest" or (stage == "planning" and event.phase == "planning"):
            seen.set()
        if stage == "blobs" and event.phase == "pulling" and event.completed_bytes > 64 * KiB:
            seen.set()

    with anyio.move_on_after(30) as scope:
        async with aw.stream_weights(
            "slow",
            "transformer",
            store=store,
            pull=True,
            registry=registry.url,
            on_progress=on_progress,
            limits=aw.Limits(group_bytes=32 * KiB),
        ) as tensors:
            count = 0
            async with anyio.create_task_group() as tg:

                async def cancel_when_seen() -> None:
                    await seen.wait()
                    scope.cancel()

                tg.start_soon(cancel_when_seen)
                async for tensor in tensors:
                    del tensor  # hold no array: MLX memory is checked after the cancel
                    count += 1
                    if stage == "first-tensor" or (stage == "late" and count == 6):
                        scope.cancel()
    assert scope.cancelled_caught
    registry.gate.set()
    wait_quiet(store)
    assert blob_fds(store) == []
    mx.clear_cache()
    assert mx.get_active_memory() <= memory_before  # no array of the load is left
    blobs = store / "blobs"
    names = sorted(p.name for p in blobs.iterdir()) if blobs.exists() else []
    digests = {layer.digest for layer in [built.config, *built.layers]}
    for name in names:
        if name.startswith("."):
            assert name.endswith(".partial"), name  # only resumable partials are left
            continue
        digest = name.replace("-", ":")
        assert digest in digests
        source_blob = (source_root / "blobs" / name).read_bytes()
        assert (blobs / name).read_bytes() == source_blob  # only verified blobs are named
    assert not (store / "manifests-v2").exists()
    registry.delay = 0.0
    weights = await aw.load_weights("slow", store=store, pull=True, registry=registry.url)
    assert_same(weights, built.expected)
    assert_layout(store, source_root, built, "slow")


# ------------------------------------------------------------------------ cache, CLI, server


async def test_lease_with_pull_shares_one_load(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    registry.chunk = 4 * KiB
    registry.delay = 0.001
    sizes: list[int] = []
    async with aw.WeightCache(store=store) as cache:

        async def lease() -> None:
            async with cache.lease("img", "vae", pull=True, registry=registry.url) as weights:
                assert_same(weights, models["img"].component("vae"))
                sizes.append(len(weights))

        async with anyio.create_task_group() as tg:
            tg.start_soon(lease)
            tg.start_soon(lease)
        assert cache.stats.loads == 1
    assert sizes == [3, 3]
    assert_layout(store, source_root, models["img"], "img")


def test_cli_pull_then_load_pull(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path, tmp_path: Path
) -> None:
    host = registry.url.removeprefix("http://")
    args = ["--store", str(store), "--registry"]
    result = cli("pull", "q4", *args, host, "--insecure", "--json", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    built = models["q4"]
    sizes = {layer.digest: layer.size for layer in [built.config, *built.layers]}
    assert data["blobs"] == data["new_blobs"] == len(sizes)
    assert data["bytes"] == data["downloaded_bytes"] == sum(sizes.values())
    assert_layout(store, source_root, built, "q4")
    result = cli("load", "img", "-c", "vae", "--pull", *args, registry.url, "--json", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["model"], data["tensors"]) == ("img", 3)
    assert_layout(store, source_root, models["img"], "img")
    result = cli("pull", "nope", *args, registry.url, tmp=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "error: HTTP 404 Not Found for the manifest: manifest unknown (model 'nope', "
        f"registry {registry.url}, repository library/nope)\n"
    )


def test_server_pull_streams_ollama_progress(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    with serve([str(SERVER), "--store", str(store), "--port", "0"]) as (base, _):
        events = []
        with httpx.stream(
            "POST",
            base + "/pull",
            json={"model": "img", "registry": registry.url},
            timeout=30,
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for text in response.iter_lines():
                if text.startswith("data: "):
                    events.append(json.loads(text.removeprefix("data: ")))
    assert events[0] == {"status": "pulling manifest"}
    assert events[-2] == {"status": "writing manifest"}
    built = models["img"]
    sizes = {layer.digest: layer.size for layer in [built.config, *built.layers]}
    assert events[-1] == {
        "status": "success",
        "digest": "img",
        "total": sum(sizes.values()),
        "completed": sum(sizes.values()),
    }
    for event in events[1:-2]:
        digest = event["digest"]
        assert event == {
            "status": f"pulling {digest[7:19]}",
            "digest": digest,
            "total": sizes[digest],
            "completed": event["completed"],
        }
        assert 0 <= event["completed"] <= sizes[digest]
    assert_layout(store, source_root, built, "img")


# ------------------------------------------------------------------------- partials, kill -9

_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin
"""


@contextlib.contextmanager
def _lock_held_by_another_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process holds `path`'s flock for the block, or until its stdin is closed;
    it exits (and is reaped) after."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        finally:
            holder.kill()  # nothing once it exited
            holder.wait(timeout=10)
            holder.stdout.close()
    assert holder.returncode == 0


def _partial(blobs: Path, tag: str, age: float) -> Path:
    path = blobs / f".sha256-{hashlib.sha256(tag.encode()).hexdigest()}.partial"
    path.write_bytes(tag.encode() * 100)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


async def test_pull_sweeps_dead_old_partials_and_never_a_locked_or_young_one(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    blobs = store / "blobs"
    blobs.mkdir(parents=True)
    old = PARTIAL_MAX_AGE + 60
    dead = _partial(blobs, "dead", old)
    live = _partial(blobs, "live", old)  # old too, but its writer still holds the lock
    young = _partial(blobs, "young", PARTIAL_MAX_AGE - 60)  # resumable: kept
    other = blobs / ".sha256-foreign.tmp"  # not ours: never touched
    other.write_bytes(b"x")
    os.utime(other, (time.time() - old, time.time() - old))
    with _lock_held_by_another_process(live):
        await aw.pull("img", store=store, registry=registry.url)
        assert not dead.exists()
        assert live.read_bytes() == b"live" * 100
        assert young.read_bytes() == b"young" * 100
        assert other.read_bytes() == b"x"
    # The holder is gone, so its lock is: the next pull sweeps that partial too.
    await aw.pull("img", store=store, registry=registry.url)
    assert not live.exists()
    assert young.exists()
    young.unlink()
    other.unlink()
    assert_layout(store, source_root, models["img"], "img")


def test_sweep_leaves_a_partial_resumed_meanwhile(tmp_path: Path) -> None:
    """The age is checked again under the lock: a partial written since the listing stays."""
    old = _partial(tmp_path, "old", PARTIAL_MAX_AGE + 60)
    resumed = _partial(tmp_path, "resumed", PARTIAL_MAX_AGE + 60)
    fd = os.open(resumed, os.O_RDWR)
    try:
        os.pwrite(fd, b"more", 500)  # a write updates st_mtime: no longer dead
    finally:
        os.close(fd)
    assert sweep_partials(tmp_path, PARTIAL_MAX_AGE) == [old.name]
    assert resumed.exists()
    assert sweep_partials(tmp_path / "absent", PARTIAL_MAX_AGE) == []


_PULL_ONE_AT_A_TIME = """
import functools, sys
import anyio
import asyncweights as aw
store, registry = sys.argv[1], sys.argv[2]
limits = aw.Limits(pull_streams=1)
anyio.run(functools.partial(aw.pull, "slow", store=store, registry=registry, limits=limits))
"""


def _kill_mid_blob(store: Path, registry: str, partial: Path, stall: int) -> None:
    """Pull in a child process; SIGKILL it once `partial` holds `stall` bytes."""
    child = subprocess.Popen(
        [sys.executable, "-c", _PULL_ONE_AT_A_TIME, str(store), registry],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert child.poll() is None, child.communicate(timeout=10)[1][-2000:]
            assert time.monotonic() < deadline, f"the child pull wrote no {stall} bytes in 60 s"
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_size >= stall:
                    child.kill()  # SIGKILL: no handler, no cleanup, the lock dies with it
                    break
            time.sleep(0.005)
    finally:
        child.kill()
        child.wait(timeout=10)
        assert child.stderr is not None
        child.stderr.close()
    assert child.returncode == -9


async def test_pull_killed_mid_blob_resumes_with_range_bit_exact(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    built = models["slow"]
    registry.chunk = 2 * KiB
    layer = built.layers[len(built.layers) // 2]
    digest, stall = layer.digest, 5 * KiB  # not a chunk boundary
    assert stall < layer.size
    # The registry sends `stall` bytes of that blob, then holds the rest: the child is
    # killed mid-blob, with exactly those bytes written.
    registry.stall_after[digest] = stall
    partial = partial_path(aw.ModelStore(store), digest)
    await anyio.to_thread.run_sync(_kill_mid_blob, store, registry.url, partial, stall)
    assert partial.stat().st_size == stall
    assert partial.read_bytes() == registry.blobs[digest][:stall]
    # Only verified blobs have a final name; the killed one is a partial, nothing else.
    for path in (store / "blobs").iterdir():
        if path.name.startswith("."):
            assert path == partial
        else:
            assert path.read_bytes() == (source_root / "blobs" / path.name).read_bytes()
    assert not (store / "blobs" / digest.replace(":", "-")).exists()
    assert not (store / "manifests-v2").exists()
    registry.release.set()
    before = len(registry.requests)
    weights = await aw.load_weights("slow", store=store, pull=True, registry=registry.url)
    assert_same(weights, built.expected)
    assert_layout(store, source_root, built, "slow")
    ranges = [h.get("range") for _, p, h in registry.requests[before:] if p.endswith(digest)]
    assert ranges == [f"bytes={stall}-"]


# ---------------------------------------------------------------------- cache: lease while pulling


async def test_lease_with_pull_loads_while_it_downloads(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    built = models["slow"]
    registry.chunk = 2 * KiB
    registry.delay = 0.002
    # Blob requests after these are held until the lease reports loaded tensors: the pull
    # cannot end before the load has made progress, unless the load waits for the pull (then
    # the watchdog below opens the gate, the manifest is written first, and the test fails).
    registry.gate_after = 2 + 10  # the config and JSON layer, then 10 tensor blobs
    link = store / "manifests-v2/ollama.com/library/slow/latest"
    phases: list[str] = []
    at_first_load: list[tuple[bool, int]] = []

    async def on_progress(event: aw.Progress) -> None:
        phases.append(event.phase)
        if event.phase == "loading" and event.completed_tensors and not at_first_load:
            missing = sum(
                not (store / "blobs" / layer.digest.replace(":", "-")).exists()
                for layer in built.layers
            )
            at_first_load.append((link.exists(), missing))
            registry.gate.set()

    # Every event delivered (none merged by time): the held pull sends none meanwhile.
    limits = aw.Limits(group_bytes=32 * KiB, progress_interval=0.0)
    async with aw.WeightCache(store=store, limits=limits) as cache:
        async with anyio.create_task_group() as tg:

            async def watchdog() -> None:
                await anyio.sleep(20)
                registry.gate.set()

            tg.start_soon(watchdog)
            async with cache.lease(
                "slow", "transformer", pull=True, registry=registry.url, on_progress=on_progress
            ) as weights:
                assert_same(weights, built.component("transformer"))
                assert list(weights) == list(built.component("transformer"))  # manifest order
            tg.cancel_scope.cancel()  # the watchdog
        assert cache.stats.loads == 1
        assert cache.stats.bytes_reserved == 0
        # A second lease of the same tag: a hit, only the manifest is asked for.
        before = len(registry.requests)
        async with cache.lease("slow", "transformer", pull=True, registry=registry.url) as again:
            assert again is weights
        assert [kind for kind, _, _ in registry.requests[before:]] == ["manifest"]
        assert cache.stats.hits == 1
    # Loaded tensors reported while at least the held blobs were still missing.
    assert at_first_load == [(False, at_first_load[0][1])]
    assert at_first_load[0][1] >= len(built.layers) - 10
    assert phases[0] == "pulling"
    assert phases[-1] == "done"
    assert_layout(store, source_root, built, "slow")
    # Every blob was fetched once: the load read the blobs the pull committed.
    fetched = [p.rsplit("/", 1)[1] for kind, p, _ in registry.requests[:before] if kind == "blob"]
    assert sorted(fetched) == sorted({x.digest for x in [built.config, *built.layers]})


async def test_lease_with_pull_over_budget_downloads_no_blob(
    registry: FakeRegistry, models: Models, store: Path
) -> None:
    vae = [x for x in models["img"].layers if (x.name or "").startswith("vae/")]
    need = sum({x.digest: x.size for x in vae}.values())
    async with aw.WeightCache(need - 1, store=store) as cache:
        with pytest.raises(aw.BudgetError) as caught:
            async with cache.lease("img", "vae", pull=True, registry=registry.url):
                pytest.fail("leased over budget")
        assert str(caught.value) == (
            f"load needs {need} bytes, over the cache's max_bytes of {need - 1} (model 'img')"
        )
        assert cache.stats.failures == 1
        assert cache.stats.bytes_reserved == 0
        # Twice the bytes with float32 from float16/bfloat16-sized tensors at most.
        with pytest.raises(aw.BudgetError) as caught:
            async with cache.lease(
                "img", "vae", pull=True, registry=registry.url, dtype=mx.float32
            ):
                pytest.fail("leased over budget")
        assert f"load needs {need * 2} bytes" in str(caught.value)
    assert [kind for kind, _, _ in registry.requests] == ["manifest", "manifest"]
    assert not (store / "manifests-v2").exists()


async def test_pull_waits_for_a_locked_blob_and_takes_it_over_when_its_writer_dies(
    registry: FakeRegistry, source_root: Path, models: Models, store: Path
) -> None:
    built = models["img"]
    layer = built.layers[3]
    prefix = 3 * KiB + 7
    (store / "blobs").mkdir(parents=True)
    partial = partial_path(aw.ModelStore(store), layer.digest)
    partial.write_bytes(registry.blobs[layer.digest][:prefix])  # what the writer got so far
    rest_done = anyio.Event()

    async def on_progress(event: aw.Progress) -> None:
        if event.completed_tensors == event.total_tensors - 1 and event.total_tensors:
            rest_done.set()  # every other blob is in: the pull waits for the locked one

    # Bounded: a pull that only waited for the blob to land would wait out its timeout.
    with _lock_held_by_another_process(partial) as holder, anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    aw.pull, "img", store=store, registry=registry.url, on_progress=on_progress
                )
            )
            with anyio.fail_after(30):
                await rest_done.wait()
            await anyio.sleep(0.2)  # the pull polls the lock meanwhile, and waits
            assert not (store / "manifests-v2").exists()
            assert [p for _, p, _ in registry.requests if p.endswith(layer.digest)] == []
            assert holder.stdin is not None
            holder.stdin.close()  # the writer exits: its lock goes, and the pull takes over
    assert not partial.exists()
    assert_layout(store, source_root, built, "img")
    ranges = [h.get("range") for _, p, h in registry.requests if p.endswith(layer.digest)]
    assert ranges == [f"bytes={prefix}-"]
