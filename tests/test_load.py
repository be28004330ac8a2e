"""load_weights and stream_weights on every era and blob layout, checked bit-exact."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

import asyncweights as aw
from asyncweights.testing import StoreBuilder, random_array, random_weights

from .conftest import wait_quiet

IMAGE_GEN = {
    "text_encoder/model.norm.weight": ((64,), mx.bfloat16),
    "text_encoder/model.layers.0.mlp.up_proj.weight": ((128, 64), mx.bfloat16),
    "text_encoder/model.layers.0.self_attn.q_proj.bias": ((128,), mx.float16),
    "transformer/blocks.0.attn.to_q.weight": ((64, 256), mx.bfloat16),
    "transformer/blocks.0.attn.to_k.weight": ((64, 128), mx.float32),
    "transformer/blocks.0.ff.weight": ((32, 128), mx.bfloat16),
    "transformer/pos_ids": ((4, 3), mx.int32),
    "transformer/mask": ((5,), mx.bool_),
    "vae/decoder.conv_in.weight": ((8, 4, 3, 3), mx.float32),
    "vae/decoder.conv_in.bias": ((8,), mx.float32),
}


def image_gen_tensors(seed: int = 0) -> dict[str, mx.array]:
    return {n: random_array(s, d, seed=f"{seed}:{n}") for n, (s, d) in IMAGE_GEN.items()}


def reference(store: Path, info: aw.TensorInfo) -> bytes:
    """The tensor's bytes as the `safetensors` package reads the same blob."""
    blob = store / "blobs" / ("sha256-" + info.digest.removeprefix("sha256:"))
    array = load_file(str(blob))[info.key]
    return np.ascontiguousarray(array).tobytes()


def raw(array: mx.array) -> bytes:
    """The array's bytes in row-major order."""
    # MLX's 3.11 wheel's stubs do not declare mx.array's buffer protocol (its 3.12+ ones do).
    return bytes(memoryview(array))  # type: ignore[arg-type, unused-ignore]


def assert_bit_exact(store: Path, weights: aw.Weights, expected: dict[str, mx.array]) -> None:
    assert sorted(weights) == sorted(expected)
    for name, array in weights.items():
        info = weights.info[name]
        assert array.dtype == expected[name].dtype, name
        assert tuple(array.shape) == tuple(expected[name].shape), name
        assert raw(array) == raw(expected[name]), name
        assert raw(array) == reference(store, info), name
        assert info.shape == tuple(array.shape)
        assert info.nbytes == array.nbytes


@pytest.mark.parametrize("era", ["E0", "E1", "E2", "E3"])
@pytest.mark.parametrize("component", [None, "text_encoder", "transformer", "vae"])
async def test_every_era_loads_bit_exact(
    builder: StoreBuilder, store_root: Path, era: Any, component: str | None
) -> None:
    built = builder.add_model(
        "toy:latest",
        image_gen_tensors(),
        era=era,
        quantize={
            "transformer/blocks.0.attn.to_q.weight": "int4",
            "transformer/blocks.0.ff.weight": ("int8", 32),
            "text_encoder/model.layers.0.mlp.up_proj.weight": "int8",
        },
        configs={"model_index.json": {"_class_name": "ZImagePipeline"}},
    )
    weights = await aw.load_weights("toy", component, store=store_root)
    assert_bit_exact(store_root, weights, built.component(component))
    assert weights.component == component
    assert weights.model == "toy"


LIMIT_CHOICES = {
    "throughput": aw.Limits.throughput(),
    "tiny-chunks-unpacked": aw.Limits(read_chunk=100, pack_bytes=0, group_bytes=4096),
    "pack-small": aw.Limits(pack_bytes=1024, group_bytes=64 * 1024, workers=3),
    "verify-tiny-chunks": aw.Limits(read_chunk=77, direct_read_bytes=0),
}


@pytest.mark.parametrize("limits", LIMIT_CHOICES.values(), ids=LIMIT_CHOICES.keys())
async def test_every_read_setting_loads_bit_exact(
    builder: StoreBuilder, store_root: Path, limits: aw.Limits
) -> None:
    # Chunk sizes that split every tensor, one buffer per tensor or per group, throughput
    # priority: the bytes that land in the arrays are the blob's, and verify agrees.
    built = builder.add_model(
        "toy:latest",
        image_gen_tensors(),
        era="E3",
        quantize={"transformer/blocks.0.ff.weight": "int4"},
    )
    weights = await aw.load_weights("toy", store=store_root, limits=limits, verify=True)
    assert_bit_exact(store_root, weights, built.component(None))


def test_limits_priority_choices() -> None:
    fast = aw.Limits.throughput(workers=6)
    assert (fast.priority, fast.workers, fast.group_bytes, fast.chunk_bytes) == (
        "throughput", 6, 64 << 20, 32 << 20,
    )  # fmt: skip
    assert (aw.Limits().priority, aw.Limits().chunk_bytes, aw.Limits().pack_bytes) == (
        "responsive", 1 << 20, None,
    )  # fmt: skip
    assert aw.Limits(read_chunk=4096).chunk_bytes == 4096
    with pytest.raises(ValueError, match=r"Limits\.priority must be 'responsive' or 'throughput'"):
        aw.Limits(priority="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Limits\.read_chunk must be at least 1"):
        aw.Limits(read_chunk=0)
    with pytest.raises(ValueError, match=r"Limits\.pack_bytes must not be negative"):
        aw.Limits(pack_bytes=-1)


@pytest.mark.parametrize(
    ("qtype", "group", "bits", "mode", "companions"),
    [
        ("int4", 32, 4, "affine", ["_scale", "_qbias"]),
        ("int4", 64, 4, "affine", ["_scale", "_qbias"]),
        ("int8", 32, 8, "affine", ["_scale", "_qbias"]),
        ("int8", 64, 8, "affine", ["_scale", "_qbias"]),
        ("nvfp4", 16, 4, "nvfp4", ["_scale"]),
        ("mxfp4", 32, 4, "mxfp4", ["_scale"]),
        ("mxfp8", 32, 8, "mxfp8", ["_scale"]),
    ],
)
@pytest.mark.parametrize("era", ["E0", "E1", "E3"])
async def test_quantization_facts_are_exact_and_dequantize_works(
    builder: StoreBuilder,
    store_root: Path,
    era: Any,
    qtype: str,
    group: int,
    bits: int,
    mode: str,
    companions: list[str],
) -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    source = random_weights({name: (32, 256), "model.norm.weight": (256,)}, seed=qtype)
    builder.add_model("q:latest", source, era=era, quantize={name: (qtype, group)})
    weights = await aw.load_weights("q", store=store_root)
    q = weights.info[name].quantization
    assert q == aw.Quantization(qtype, mode, bits, group)
    assert sorted(weights) == sorted([name, "model.norm.weight"] + [name + c for c in companions])
    for companion in companions:
        assert weights.info[name + companion].quantization is None
    assert weights.info["model.norm.weight"].quantization is None
    assert weights.quantization is not None
    assert weights.quantization.type == qtype
    expected = mx.quantize(source[name], group_size=group, bits=bits, mode=mode)
    restored = mx.dequantize(
        weights[name],
        weights[name + "_scale"],
        weights.get(name + "_qbias"),
        group_size=q.group_size,
        bits=q.bits,
        mode=q.mode,
    )
    reference_values = mx.dequantize(*expected, group_size=group, bits=bits, mode=mode)
    assert mx.array_equal(restored, reference_values).item()


async def test_unlabelled_packed_group_is_inferred_from_shapes(
    builder: StoreBuilder, store_root: Path
) -> None:
    # E1 packed expert groups carry no label at all (docs/format.md#packed-blobs): shapes decide.
    names = [f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in (0, 1) for p in ("up", "down")]
    shapes = {n: (16, 128) for n in names} | {"model.layers.1.mlp.gate.weight": (2, 8)}
    source = random_weights(shapes)
    quantize = {n: ("int8" if ".down." in n else "int4") for n in names}
    built = builder.add_model(
        "moe:latest", source, era="E1", quantize=quantize,
        pack={"model.layers.1.mlp.experts": names},
    )  # fmt: skip
    weights = await aw.load_weights("moe", store=store_root)
    assert_bit_exact(store_root, weights, built.expected)
    for n in names:
        bits = 8 if ".down." in n else 4
        assert weights.info[n].quantization == aw.Quantization(f"int{bits}", "affine", bits, 64)
    # Every expert tensor comes from the one packed blob; the group prefix is no tensor.
    assert len({weights.info[n].digest for n in names}) == 1
    assert "model.layers.1.mlp.experts" not in weights


@pytest.mark.parametrize("style", ["global", "per_tensor", "both"])
async def test_packed_group_metadata_styles(
    builder: StoreBuilder, store_root: Path, style: Any
) -> None:
    names = [f"model.layers.0.mlp.switch_mlp.{p}.weight" for p in ("gate", "up", "down")]
    source = random_weights({n: (4, 16, 64) for n in names})
    quantize = {n: ("int8", 32) for n in names}  # ratio 8: only a label tells int8/32
    built = builder.add_model(
        "st:latest", source, era="E2", quantize=quantize, metadata_style=style,
        pack={"model.layers.0.mlp.switch_mlp": names},
    )  # fmt: skip
    weights = await aw.load_weights("st", store=store_root)
    assert_bit_exact(store_root, weights, built.expected)
    for n in names:
        assert weights.info[n].quantization == aw.Quantization("int8", "affine", 8, 32)


async def test_real_layer_biases_keep_their_names(builder: StoreBuilder, store_root: Path) -> None:
    source = random_weights({"attn.q_proj.weight": (64, 64), "attn.q_proj.bias": (64,)})
    builder.add_model(
        "b:latest", source, era="E3", quantize={"attn.q_proj.weight": "int4"},
        pack={"attn.q_proj": ["attn.q_proj.weight", "attn.q_proj.bias"]},
    )  # fmt: skip
    weights = await aw.load_weights("b", store=store_root)
    assert sorted(weights) == [
        "attn.q_proj.bias", "attn.q_proj.weight", "attn.q_proj.weight_qbias",
        "attn.q_proj.weight_scale",
    ]  # fmt: skip
    assert raw(weights["attn.q_proj.bias"]) == raw(source["attn.q_proj.bias"])


async def test_identical_e0_tensors_share_one_blob(builder: StoreBuilder, store_root: Path) -> None:
    ones = mx.ones((4, 8), dtype=mx.bfloat16)
    built = builder.add_model("d:latest", {"a.norm.weight": ones, "b.norm.weight": ones}, era="E0")
    assert built.layers[0].digest == built.layers[1].digest
    weights = await aw.load_weights("d", store=store_root)
    assert sorted(weights) == ["a.norm.weight", "b.norm.weight"]
    assert weights.info["a.norm.weight"].digest == weights.info["b.norm.weight"].digest
    assert mx.array_equal(weights["a.norm.weight"], ones).item()


async def test_dtype_converts_floating_tensors_only(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = builder.add_model(
        "c:latest", image_gen_tensors(), era="E3",
        quantize={"transformer/blocks.0.attn.to_q.weight": "int4"},
    )  # fmt: skip
    weights = await aw.load_weights("c", "transformer", store=store_root, dtype=mx.float16)
    expected = built.component("transformer")
    for name, array in weights.items():
        source = expected[name]
        kept = name.startswith("blocks.0.attn.to_q.weight") or not mx.issubdtype(
            source.dtype, mx.floating
        )
        if kept:
            assert array.dtype == source.dtype, name
            assert mx.array_equal(array, source).item(), name
        else:
            assert array.dtype == mx.float16, name
            assert mx.array_equal(array, source.astype(mx.float16)).item(), name
        assert weights.info[name].dtype == array.dtype
        assert weights.info[name].source_dtype in {"BF16", "F32", "U32", "I32", "BOOL"}


async def test_stream_yields_every_tensor_evaluated(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = builder.add_model("s:latest", image_gen_tensors(), era="E1")
    seen: dict[str, mx.array] = {}
    limits = aw.Limits(group_bytes=4096, workers=2)
    async with aw.stream_weights("s", "vae", store=store_root, limits=limits) as tensors:
        async for tensor in tensors:
            assert tensor.info.name == tensor.name
            seen[tensor.name] = tensor.array
    expected = built.component("vae")
    assert sorted(seen) == sorted(expected)
    for name, array in seen.items():
        assert mx.array_equal(array, expected[name]).item()


async def test_missing_component_lists_the_present_ones(
    builder: StoreBuilder, store_root: Path
) -> None:
    builder.add_model("m:latest", image_gen_tensors(), era="E1")
    with pytest.raises(aw.ComponentNotFoundError) as info:
        await aw.load_weights("m", "unet", store=store_root)
    assert str(info.value) == (
        "no component 'unet'; the model has: 'text_encoder', 'transformer', 'vae' (model 'm')"
    )
    assert info.value.available == ["text_encoder", "transformer", "vae"]


async def test_load_by_manifest_path_and_object(builder: StoreBuilder, store_root: Path) -> None:
    built = builder.add_model("p:latest", image_gen_tensors(), era="E3")
    store = aw.ModelStore(store_root)
    model = await store.open("p")
    a = await aw.load_weights(built.path, "vae", store=store)
    b = await aw.load_weights(model.manifest, "vae", store=store)
    c = await aw.load_weights(model, "vae")
    assert sorted(a) == sorted(b) == sorted(c) == sorted(built.component("vae"))


async def test_progress_is_ordered_and_ends_at_100_percent(
    builder: StoreBuilder, store_root: Path
) -> None:
    builder.add_model("g:latest", image_gen_tensors(), era="E1")
    plain: list[aw.Progress] = []
    awaited: list[aw.Progress] = []

    async def on_async(event: aw.Progress) -> None:
        await anyio.lowlevel.checkpoint()
        awaited.append(event)

    limits = aw.Limits(group_bytes=1, progress_interval=0)
    for callback in (plain.append, on_async):
        weights = await aw.load_weights("g", store=store_root, on_progress=callback, limits=limits)
    for events in (plain, awaited):
        assert events[0].phase == "planning"
        assert events[0].completed_bytes == 0
        assert events[-1].phase == "done"
        assert events[-1].completed_bytes == events[-1].total_bytes == weights.nbytes
        assert events[-1].completed_tensors == events[-1].total_tensors == len(weights)
        done = [e.completed_bytes for e in events]
        assert done == sorted(done)
        assert [e.phase for e in events[1:-1]] == ["loading"] * (len(events) - 2)
    assert events[-1].to_ollama() == {
        "status": "success", "digest": "g", "total": weights.nbytes, "completed": weights.nbytes,
    }  # fmt: skip


async def test_verify_accepts_good_blobs_and_rejects_corrupt_ones(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = builder.add_model("v:latest", image_gen_tensors(), era="E1")
    await aw.load_weights("v", store=store_root, verify=True)
    layer = next(x for x in built.layers if x.name == "vae/decoder.conv_in.weight")
    blob = store_root / "blobs" / ("sha256-" + layer.digest.removeprefix("sha256:"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, same header: only the hash can tell
    blob.write_bytes(bytes(data))
    assert (await aw.load_weights("v", "vae", store=store_root)).keys()
    with pytest.raises(aw.DigestMismatchError) as info:
        await aw.load_weights("v", "vae", store=store_root, verify=True)
    assert info.value.digest == layer.digest
    assert info.value.path == blob
    assert "blob bytes hash to sha256:" in str(info.value)
    assert "model 'v'" in str(info.value)


async def test_budget_refuses_before_reading(builder: StoreBuilder, store_root: Path) -> None:
    builder.add_model("big:latest", image_gen_tensors(), era="E1")
    with pytest.raises(aw.BudgetError, match=r"over the budget of 100 \(model 'big'\)"):
        await aw.load_weights("big", store=store_root, limits=aw.Limits(max_bytes=100))


async def test_cancel_mid_load_frees_files_and_threads(
    builder: StoreBuilder, store_root: Path
) -> None:
    tensors = {f"layers.{i}.weight": (256, 256) for i in range(64)}
    builder.add_model("c:latest", random_weights(tensors), era="E3")
    limits = aw.Limits(group_bytes=128 * 1024, workers=2)
    received = 0
    with anyio.CancelScope() as scope:
        async with aw.stream_weights("c", store=store_root, limits=limits) as stream:
            async for _ in stream:
                received += 1
                if received == 3:
                    scope.cancel()
    assert scope.cancelled_caught
    wait_quiet(store_root)


def test_many_blobs_load_under_a_64_file_limit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import resource, sys, anyio, mlx.core as mx
        import asyncweights as aw
        from asyncweights.testing import StoreBuilder
        root = sys.argv[1]
        tensors = {f"t.{i}.weight": mx.full((4,), i, dtype=mx.float32) for i in range(2000)}
        StoreBuilder(root).add_model("many:latest", tensors, era="E3")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        w = anyio.run(lambda: aw.load_weights("many", store=root))
        assert len(w) == 2000 and all(w[f"t.{i}.weight"][0].item() == i for i in range(2000))
        print("loaded", len(w))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "store")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded 2000"


def _ours_and_native_threads() -> int:
    """Native threads (MLX's) plus asyncweights' readers; the event loop's pool left out."""
    others = {t.native_id for t in threading.enumerate() if not t.name.startswith("asyncweights-")}
    return len({int(tid) for tid in os.listdir("/proc/self/task")} - others)


async def test_groups_run_in_long_lived_low_priority_threads(
    builder: StoreBuilder, store_root: Path
) -> None:
    # MLX pins a stream and a native thread to every thread that evaluates: loads must
    # reuse their threads, or each load would leave threads behind for good.
    builder.add_model("t:latest", image_gen_tensors(), era="E3")
    # Readers never run at a higher priority than the process: ask for one below its own, so
    # the test holds when the suite itself runs under `nice`.
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    limits = aw.Limits(group_bytes=4096, reader_nice=nice)
    await aw.load_weights("t", store=store_root, limits=limits)
    after_first = _ours_and_native_threads()
    for _ in range(3):
        await aw.load_weights("t", store=store_root, limits=limits)
    assert _ours_and_native_threads() == after_first
    readers = [t for t in threading.enumerate() if t.name.startswith("asyncweights-reader")]
    assert readers
    for thread in readers:
        assert thread.native_id is not None
        if os.getpriority(os.PRIO_PROCESS, thread.native_id) == nice:
            break
    else:
        raise AssertionError("no reader thread runs at the asked nice value")
