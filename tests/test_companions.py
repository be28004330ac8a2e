"""Companions of quantized weights by role, per-tensor quant keys beside blob-wide ones, and
weights named as mlx.nn modules name their parameters."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from safetensors.numpy import load_file

import asyncweights as aw
from asyncweights.testing import RawTensor, StoreBuilder, random_array

GLOBAL_SCALE = 0.0123456789


def tensor(name: str, array: mx.array) -> RawTensor:
    from asyncweights._writer import tensor_from_array

    return tensor_from_array(name, array)


def blob_file(store: Path, digest: str) -> str:
    return str(store / "blobs" / digest.replace(":", "-"))


def header_length(path: str) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def bits(array: mx.array) -> bytes:
    return np.asarray(array.view(mx.uint8)).tobytes()


@pytest.mark.parametrize("global_shape", [(), (64,)])
async def test_nvfp4_global_scale_keeps_float32_and_dequantizes_exactly(
    builder: StoreBuilder, store_root: Path, global_shape: tuple[int, ...]
) -> None:
    w = random_array((64, 128), mx.float32, seed="nvfp4")
    # MLX's stubs promise (wq, scales, biases); nvfp4 returns no biases.
    quantized = mx.quantize(w, group_size=16, bits=4, mode="nvfp4")
    assert len(quantized) == 2
    wq, scales = quantized[0], quantized[1]
    global_scale = mx.full(global_shape, GLOBAL_SCALE, dtype=mx.float32)
    layer = builder.add_blob(
        "l.weight",
        [tensor("l.weight", wq), tensor("l.weight.scale", scales),
         tensor("l.weight.global_scale", global_scale)],
        style="mlx",
        metadata={"quant_type": "nvfp4", "group_size": "16"},
    )  # fmt: skip
    norm = builder.add_blob("norm.weight", {"norm.weight": random_array((128,), mx.float32)})
    builder.write_manifest("m:latest", [layer, norm])

    weights = await aw.load_weights("m", store=store_root, dtype=mx.bfloat16)
    info = weights.info["l.weight"]
    assert info.quantization == aw.Quantization("nvfp4", "nvfp4", 4, 16)
    assert dict(info.companions) == {
        "scales": "l.weight_scale",
        "global_scale": "l.weight.global_scale",
    }
    # dtype= converts real floating tensors only; the global scale keeps its float32 bits.
    assert weights["norm.weight"].dtype == mx.bfloat16
    stored = weights["l.weight.global_scale"]
    assert stored.dtype == mx.float32
    assert weights.info["l.weight.global_scale"].source_dtype == "F32"
    raw = load_file(blob_file(store_root, layer.digest))  # an independent reader
    assert np.asarray(stored).tobytes() == raw["l.weight.global_scale"].tobytes()
    assert np.asarray(stored).reshape(-1)[0] == np.float32(GLOBAL_SCALE)

    # MLX's own dequantization of the stored bytes, times the global scale.
    expected = mx.dequantize(
        mx.array(raw["l.weight"]), mx.array(raw["l.weight.scale"]),
        group_size=16, bits=4, mode="nvfp4",
    )  # fmt: skip
    gs = mx.array(raw["l.weight.global_scale"])
    expected = (expected * (gs.reshape(-1, 1) if gs.size > 1 else gs)).astype(expected.dtype)
    got = weights.dequantize("l.weight")
    assert got.dtype == expected.dtype
    assert bits(got) == bits(expected)
    assert weights.dequantize("norm.weight") is weights["norm.weight"]


@pytest.mark.parametrize("blob_group", [64, 32])
async def test_per_tensor_keys_beside_blob_wide_keys_in_a_go_written_blob(
    builder: StoreBuilder, store_root: Path, blob_group: int
) -> None:
    """Ollama's Go writer (PR #17731) writes only the per-tensor fields that differ from the
    blob-wide ones, so a missing per-tensor field is the blob-wide value, as Ollama's runner
    reads it (x/mlxrunner/model/root.go)."""
    arrays = {n: random_array((32, 128), mx.float32, seed=n) for n in ("a", "b", "c")}
    entries = []
    other = 128 if blob_group == 64 else 64
    for name, group, bits in (("a", blob_group, 4), ("b", blob_group, 8), ("c", other, 4)):
        wq, scales, biases = mx.quantize(arrays[name], group_size=group, bits=bits)
        key = f"{name}.weight"
        entries += [
            tensor(key, wq),
            tensor(key + ".scale", scales.astype(mx.bfloat16)),
            tensor(key + ".bias", biases.astype(mx.bfloat16)),
        ]
    entries.sort(key=lambda t: t.name)  # Go writes data in key order
    layer = builder.add_blob(
        "packed",
        entries,
        style="go",
        metadata={"quant_type": "int4", "group_size": str(blob_group),
                  "b.weight.quant_type": "int8", "c.weight.group_size": str(other)},
    )  # fmt: skip
    builder.write_manifest("m:latest", [layer])
    assert header_length(blob_file(store_root, layer.digest)) % 8 == 0  # Go pads headers

    weights = await aw.load_weights("m", store=store_root)
    facts = {n: weights.info[f"{n}.weight"].quantization for n in ("a", "b", "c")}
    assert facts == {
        "a": aw.Quantization("int4", "affine", 4, blob_group),
        "b": aw.Quantization("int8", "affine", 8, blob_group),  # the blob-wide group
        "c": aw.Quantization("int4", "affine", 4, other),
    }
    for name, q in facts.items():
        assert q is not None
        back = weights.dequantize(f"{name}.weight")
        wq, scales, biases = mx.quantize(arrays[name], group_size=q.group_size, bits=q.bits)
        ref = mx.dequantize(
            wq, scales.astype(mx.bfloat16), biases.astype(mx.bfloat16),
            group_size=q.group_size, bits=q.bits,
        )  # fmt: skip
        assert mx.array_equal(back, ref).item(), name


class Block(nn.Module):  # type: ignore[misc]  # mlx.nn ships no type information: Module is Any
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, 64)
        self.out = nn.Linear(64, 32)

    def __call__(self, x: mx.array) -> mx.array:
        y: mx.array = self.out(nn.gelu(self.proj(x)))
        return y


async def test_mlx_nn_model_loads_from_the_store_in_one_call(
    builder: StoreBuilder, store_root: Path
) -> None:
    mx.random.seed(3)
    reference = Block()
    nn.quantize(reference, group_size=64, bits=4, class_predicate=lambda p, _: p == "proj")
    mx.eval(reference.parameters())
    params = dict(_flatten(reference.parameters()))
    assert sorted(params) == [
        "out.bias", "out.weight", "proj.bias", "proj.biases", "proj.scales", "proj.weight",
    ]  # fmt: skip
    # Stored as Ollama stores a quantized linear: one blob X, X.scale, X.bias + metadata.
    quantized = builder.add_blob(
        "proj.weight",
        [tensor("proj.weight", params["proj.weight"]),
         tensor("proj.weight.scale", params["proj.scales"]),
         tensor("proj.weight.bias", params["proj.biases"])],
        style="mlx",
        metadata={"quant_type": "int4", "group_size": "64"},
    )  # fmt: skip
    layers = [quantized]
    for name in ("proj.bias", "out.weight", "out.bias"):
        layers.append(builder.add_blob(name, {name: params[name]}))
    builder.write_manifest("block:latest", layers)

    model = Block()
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, _: p == "proj")
    model.load_weights(
        list((await aw.load_weights("block", store=store_root)).for_mlx_nn().items())
    )

    x = random_array((4, 128), mx.float32, seed="x")
    assert mx.array_equal(model(x), reference(x)).item()
    for name, array in _flatten(model.parameters()):
        assert mx.array_equal(array, params[name]).item(), name


def _flatten(tree: object, prefix: str = "") -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    flat = tree_flatten(tree)
    assert isinstance(flat, list)  # a dict only when a dict destination is passed
    return [(prefix + k, v) for k, v in flat]
