"""A toy transformer for sharded loads, and what each rank must hold, computed by MLX itself.

The expected slices come from ``mlx.nn.layers.distributed._shard`` with its own predicates
(``_all_to_sharded`` / ``_sharded_to_all``): exactly what ``shard_linear`` would leave in a
rank's layer, so a loaded shard equal to it drops into MLX's sharded layers as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.nn.layers.distributed import _all_to_sharded, _shard, _sharded_to_all

from asyncweights.testing import BuiltModel, StoreBuilder, random_array

MODEL = "toy-tp:latest"
#: the fused GQA projection: q 96 rows, k 48, v 48 (split indices, as shard_linear takes them)
QKV = [96, 144]
RULES: dict[str, Any] = {"qkv_proj": ("all-to-sharded", QKV)}

SHAPES: dict[str, tuple[tuple[int, ...], mx.Dtype]] = {
    "model.embed_tokens.weight": ((48, 96), mx.bfloat16),
    "model.norm.weight": ((96,), mx.float32),
    # layer 0: quantized (int4 rows, int8 columns, int4 columns, int4 stacked experts)
    "model.layers.0.self_attn.q_proj.weight": ((96, 384), mx.bfloat16),
    "model.layers.0.self_attn.q_proj.bias": ((96,), mx.float32),
    "model.layers.0.self_attn.o_proj.weight": ((96, 384), mx.bfloat16),
    "model.layers.0.mlp.down_proj.weight": ((96, 384), mx.float32),
    "model.layers.0.mlp.switch_mlp.up_proj.weight": ((4, 48, 384), mx.bfloat16),
    "model.layers.0.input_layernorm.weight": ((96,), mx.bfloat16),
    # layer 1: plain bf16 / f32, fused qkv, stacked experts both ways
    "model.layers.1.self_attn.qkv_proj.weight": ((192, 96), mx.bfloat16),
    "model.layers.1.self_attn.o_proj.weight": ((96, 96), mx.float32),
    "model.layers.1.self_attn.o_proj.bias": ((96,), mx.float32),
    "model.layers.1.mlp.switch_mlp.gate_proj.weight": ((4, 48, 96), mx.bfloat16),
    "model.layers.1.mlp.switch_mlp.down_proj.weight": ((4, 96, 48), mx.float32),
    "model.layers.1.post_attention_layernorm.weight": ((96,), mx.float32),
}
QUANTIZE = {
    "model.layers.0.self_attn.q_proj.weight": "int4",
    "model.layers.0.self_attn.o_proj.weight": "int8",
    "model.layers.0.mlp.down_proj.weight": "int4",
    "model.layers.0.mlp.switch_mlp.up_proj.weight": "int4",
}


def build(builder: StoreBuilder) -> BuiltModel:
    tensors = {n: random_array(s, d, seed=n) for n, (s, d) in SHAPES.items()}
    return builder.add_model(MODEL, tensors, quantize=QUANTIZE)


def rule_of(path: str) -> tuple[str, Any]:
    last = path.rsplit(".", 1)[-1]
    if last == "qkv_proj":
        return "all-to-sharded", QKV
    if last in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        return "all-to-sharded", 1
    if last in ("o_proj", "down_proj"):
        return "sharded-to-all", 1
    return "replicate", 1


class FakeGroup:
    """What ``_shard`` asks of a group: its size and this rank."""

    def __init__(self, rank: int, world: int) -> None:
        self._rank, self._world = rank, world

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._world


def expected(built: BuiltModel, rank: int, world: int) -> dict[str, mx.array]:
    """Every tensor as rank `rank` of `world` must hold it (names as loaded)."""
    roles = {"": "weight", "_scale": "scales", "_qbias": "biases"}
    modules: dict[str, dict[str, tuple[str, mx.array]]] = {}
    for name, array in built.expected.items():
        for suffix, role in roles.items():
            base = name[: -len(suffix)] if suffix else name
            if suffix and not name.endswith(suffix):
                continue
            if base.endswith(".weight"):
                modules.setdefault(base[: -len(".weight")], {})[role] = (name, array)
                break
            if base.endswith(".bias") and not suffix:
                modules.setdefault(base[: -len(".bias")], {})["bias"] = (name, array)
                break
    out: dict[str, mx.array] = {}
    group = FakeGroup(rank, world)
    for path, params in modules.items():
        kind, segments = rule_of(path)
        tree = {role: array for role, (_, array) in params.items()}
        if kind != "replicate" and world > 1:
            predicate = (_all_to_sharded if kind == "all-to-sharded" else _sharded_to_all)(segments)
            tree = _shard(tree, predicate, group)
        for role, (name, _) in params.items():
            out[name] = tree[role]
    assert set(out) == set(built.expected)
    return out


def rchar() -> int:
    """Bytes this process has read through read(2)-family calls (``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def split_bytes(built: BuiltModel) -> tuple[int, int]:
    """(bytes of the tensors a tensor-parallel load splits, bytes of those it replicates)."""
    split = whole = 0
    for name, array in expected(built, 0, 1).items():
        if _is_split(built, name):
            split += array.nbytes
        else:
            whole += array.nbytes
    return split, whole


def _is_split(built: BuiltModel, name: str) -> bool:
    return expected(built, 0, 2)[name].shape != built.expected[name].shape


def blob_paths(root: Path, built: BuiltModel) -> dict[str, str]:
    """Layer name -> blob file of each tensor layer."""
    return {
        layer.name: os.fspath(root / "blobs" / layer.digest.replace(":", "-"))
        for layer in built.layers
        if layer.name
    }


def header_bytes(paths: Iterable[str]) -> int:
    """The safetensors prefix and header bytes of these blob files, summed."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += 8 + int.from_bytes(f.read(8), "little")
    return total
