"""Sharded loads in one process: each rank's slices, the bytes read, pipeline stages, errors.

Multi-process groups (the ``ring`` backend) are in ``test_shard_dist.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

import asyncweights as aw
from asyncweights import _read
from asyncweights.testing import StoreBuilder, random_array

from .shard_support import (
    MODEL,
    RULES,
    blob_paths,
    build,
    expected,
    header_bytes,
    rchar,
    split_bytes,
)


def _equal(a: mx.array, b: mx.array) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(mx.array_equal(a, b).item())


@pytest.mark.parametrize("world", [1, 2, 3])
async def test_every_rank_holds_mlx_shard_linear_slice_bit_exact(
    builder: StoreBuilder, store_root: Path, world: int
) -> None:
    built = build(builder)
    held: list[dict[str, mx.array]] = []
    for rank in range(world):
        weights = await aw.load_weights(
            MODEL, store=store_root, shard=aw.Shard(rank, world, rules=RULES)
        )
        want = expected(built, rank, world)
        assert list(weights) == list(want) or set(weights) == set(want)
        for name, array in want.items():
            assert _equal(weights[name], array), (rank, name)
            info = weights.info[name]
            assert info.full_shape == built.expected[name].shape
            assert info.shape == array.shape
            assert (info.shard is None) == (array.shape == built.expected[name].shape or world == 1)
        held.append(dict(weights))
    if world > 1:
        # Quantized weights dequantize to the matching rows of the full dequantized weight.
        q = "model.layers.0.self_attn.q_proj.weight"
        full = mx.dequantize(
            built.expected[q], built.expected[q + "_scale"], built.expected[q + "_qbias"],
            group_size=64, bits=4,
        )  # fmt: skip
        parts = [
            mx.dequantize(h[q], h[q + "_scale"], h[q + "_qbias"], group_size=64, bits=4)
            for h in held
        ]
        assert _equal(mx.concatenate(parts, axis=0), full)


async def test_slice_facts_in_info(builder: StoreBuilder, store_root: Path) -> None:
    build(builder)
    weights = await aw.load_weights(MODEL, store=store_root, shard=aw.Shard(1, 3, rules=RULES))
    info = weights.info
    assert info["model.layers.1.self_attn.qkv_proj.weight"].shard == aw.ShardSlice(
        (192, 96), 0, ((32, 64), (112, 128), (160, 176))
    )
    assert info["model.layers.0.self_attn.o_proj.weight"].shard == aw.ShardSlice(
        (96, 96), 1, ((32, 64),)
    )  # int8: 384 columns are 96 packed words
    assert info["model.layers.0.self_attn.o_proj.weight_scale"].shard == aw.ShardSlice(
        (96, 6), 1, ((2, 4),)
    )
    assert info["model.layers.1.mlp.switch_mlp.gate_proj.weight"].shard == aw.ShardSlice(
        (4, 48, 96), 1, ((16, 32),)
    )
    assert info["model.layers.0.self_attn.q_proj.bias"].shard == aw.ShardSlice(
        (96,), 0, ((32, 64),)
    )
    assert info["model.layers.1.self_attn.o_proj.bias"].shard is None  # sharded-to-all
    assert info["model.norm.weight"].shard is None
    assert info["model.norm.weight"].full_shape == (96,)


def test_spans_are_one_per_segment_expert_or_row() -> None:
    rows = aw.ShardSlice((8, 4), 0, ((2, 4),))
    assert rows.spans(2) == [(16, 16)]
    fused = aw.ShardSlice((12, 4), 0, ((2, 4), (6, 8), (10, 12)))
    assert fused.spans(1) == [(8, 8), (24, 8), (40, 8)]
    experts = aw.ShardSlice((3, 4, 2), 1, ((0, 2),))
    assert experts.spans(4) == [(0, 16), (32, 16), (64, 16)]
    columns = aw.ShardSlice((3, 6), 1, ((3, 6),))
    assert columns.spans(1) == [(3, 3), (9, 3), (15, 3)]
    assert columns.shape == (3, 3)


async def test_bytes_read_are_the_ranks_share(builder: StoreBuilder, store_root: Path) -> None:
    built = build(builder)
    split, whole = split_bytes(built)
    headers = header_bytes(blob_paths(store_root, built).values())
    rows = 0  # one row of every split tensor: the issue's tolerance
    for name, array in built.expected.items():
        if expected(built, 0, 2)[name].shape != array.shape:
            rows += array.nbytes // array.shape[0]
    shard = aw.Shard(1, 2, rules=RULES)
    await aw.load_weights(MODEL, store=store_root, shard=shard)  # warm: imports, header cache
    before = rchar()
    weights = await aw.load_weights(MODEL, store=store_root, shard=shard)
    read = rchar() - before
    held_split = sum(weights.info[n].nbytes for n in weights if weights.info[n].shard)
    assert abs(held_split - split // 2) <= rows
    # Manifest and config files are read too: a few KiB at most.
    small = (
        sum(p.stat().st_size for p in (store_root / "manifests").rglob("*") if p.is_file())
        + built.config.size
    )
    assert split // 2 + whole <= read <= split // 2 + whole + headers + small + rows, (
        read,
        split,
        whole,
    )
    before = rchar()
    await aw.load_weights(MODEL, store=store_root)
    full = rchar() - before
    assert full >= split + whole  # the unsharded load reads every byte


async def test_pipeline_stage_opens_only_its_layers_blobs(
    builder: StoreBuilder, store_root: Path
) -> None:
    built = build(builder)
    paths = blob_paths(store_root, built)
    opened: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if watching[0] and event == "open" and isinstance(args[0], str) and "blobs" in args[0]:
            opened.append(args[0])

    sys.addaudithook(hook)  # cannot be removed: it records only while `watching`
    stage = aw.Shard.pipeline(1, 2, num_layers=2)
    assert stage.layers == range(1, 2)
    watching[0] = True
    try:
        weights = await aw.load_weights(MODEL, store=store_root, shard=stage)
    finally:
        watching[0] = False
    mine = {paths[n] for n in paths if ".layers.0." not in n}
    config = str(store_root / "blobs" / built.config.digest.replace(":", "-"))
    assert set(opened) - {config} == mine
    assert set(weights) == {n for n in built.expected if ".layers.0." not in n}
    for name in weights:
        assert _equal(weights[name], built.expected[name])
        assert weights.info[name].shard is None


async def test_stream_and_cache_take_a_shard(builder: StoreBuilder, store_root: Path) -> None:
    built = build(builder)
    want = expected(built, 2, 3)
    shard = aw.Shard(2, 3, rules=RULES)
    async with aw.stream_weights(MODEL, store=store_root, shard=shard) as tensors:
        got = {t.name: t for t in [t async for t in tensors]}
    assert set(got) == set(want)
    for name, tensor in got.items():
        assert _equal(tensor.array, want[name])
        assert tensor.info.full_shape == built.expected[name].shape
    async with aw.WeightCache(store=store_root) as cache:
        async with cache.lease(MODEL, shard=shard) as weights:
            assert all(_equal(weights[n], want[n]) for n in want)
        async with cache.lease(MODEL, shard=aw.Shard(2, 3, rules=RULES)) as again:
            assert again is weights  # same plan, same key
        async with cache.lease(MODEL) as whole:
            assert whole is not weights
            assert all(_equal(whole[n], built.expected[n]) for n in want)


async def test_dtype_converts_the_held_slice(builder: StoreBuilder, store_root: Path) -> None:
    built = build(builder)
    weights = await aw.load_weights(
        MODEL, store=store_root, shard=aw.Shard(0, 2, rules=RULES), dtype=mx.float16
    )
    name = "model.layers.1.mlp.switch_mlp.down_proj.weight"
    assert _equal(weights[name], expected(built, 0, 2)[name].astype(mx.float16))
    packed = "model.layers.0.mlp.down_proj.weight"
    assert weights[packed].dtype == mx.uint32


async def test_rules_override_defaults(builder: StoreBuilder, store_root: Path) -> None:
    built = build(builder)
    shard = aw.Shard(
        1, 2, rules={"o_proj": "replicate", "*.layers.1.*.gate_proj": "sharded-to-all"}
    )
    assert shard.rule("model.layers.0.self_attn.o_proj") == ("replicate", 1)
    assert shard.rule("model.layers.1.mlp.switch_mlp.gate_proj") == ("sharded-to-all", 1)
    assert shard.rule("model.layers.0.mlp.switch_mlp.gate_proj") == ("all-to-sharded", 1)
    assert shard.rule("model.embed_tokens") == ("replicate", 1)
    assert aw.Shard(0, 2, defaults=False).rule("x.q_proj") == ("replicate", 1)
    weights = await aw.load_weights(
        MODEL, store=store_root, shard=aw.Shard(1, 2, rules={**RULES, "o_proj": "replicate"})
    )
    name = "model.layers.1.self_attn.o_proj.weight"
    assert _equal(weights[name], built.expected[name])


async def test_column_split_inside_a_group_fails_before_any_read(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # int4, group 64: 256 input columns make 4 groups, which do not split in 3.
    name = "model.layers.0.mlp.down_proj.weight"
    builder.add_model(
        "cut:latest",
        {name: random_array((48, 384), mx.bfloat16, seed=1)},
        quantize={name: ("int4", 128)},
    )
    reads: list[object] = []
    monkeypatch.setattr(_read, "read_shard", lambda *a: reads.append(a))
    with pytest.raises(aw.ShardError) as caught:
        await aw.load_weights("cut", store=store_root, shard=aw.Shard(0, 2))
    assert caught.value.tensor == name
    assert "cuts a quantization group (group_size 128, 4 bits)" in str(caught.value)
    assert "model 'cut'" in str(caught.value)
    assert reads == []


async def test_axis_that_does_not_divide_is_a_typed_error(
    builder: StoreBuilder, store_root: Path
) -> None:
    name = "blk.q_proj.weight"
    builder.add_model("odd:latest", {name: random_array((10, 4), mx.float32, seed=2)})
    with pytest.raises(aw.ShardError) as caught:
        await aw.load_weights("odd", store=store_root, shard=aw.Shard(0, 3))
    assert caught.value.tensor == name
    assert "axis 0 of shape [10, 4] does not split into 3 equal parts (all-to-sharded)" in str(
        caught.value
    )


def test_bad_shard_arguments() -> None:
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        aw.Shard(2, 2)
    with pytest.raises(ValueError, match="world must be a positive int"):
        aw.Shard(0, 0)
    with pytest.raises(ValueError, match="is not one of"):
        aw.Shard(0, 2, rules={"x": "rows"})  # type: ignore[dict-item]
    assert aw.Shard.pipeline(0, 3, 7).layers == range(0, 3)
    assert aw.Shard.pipeline(2, 3, 7).layers == range(5, 7)


async def test_sharded_load_cannot_pull(store_root: Path) -> None:
    with pytest.raises(aw.ShardError, match="cannot pull"):
        await aw.load_weights("x", store=store_root, pull=True, shard=aw.Shard(0, 2))


async def test_gguf_model_cannot_be_sharded(
    builder: StoreBuilder, store_root: Path, tmp_path: Path
) -> None:
    from .test_gguf import write_gguf

    path = write_gguf(
        tmp_path / "m.gguf", {"blk.0.attn_q.weight": ("F32", np.ones((4, 8), np.float32))}
    )
    builder.add_gguf_model("g:latest", weights=path)
    with pytest.raises(aw.ShardError) as caught:
        await aw.load_weights("g", store=store_root, shard=aw.Shard(0, 2))
    assert caught.value.reason == "sharded loads read safetensors blobs; this is a GGUF model"
    assert caught.value.model == "g"


async def test_check_shards_in_a_group_of_one(builder: StoreBuilder, store_root: Path) -> None:
    build(builder)
    group = mx.distributed.init()  # no launcher: the singleton group
    assert group.size() == 1
    weights = await aw.load_weights(MODEL, store=store_root, shard=aw.Shard.from_group(group))
    assert all(info.shard is None for info in weights.info.values())  # a world of 1 is whole
    aw.check_shards(group, weights)  # every tensor agrees with itself: no error


def test_cli_loads_one_rank_by_hand(
    builder: StoreBuilder, store_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncweights._cli import run

    built = build(builder)
    status = run(
        ["load", "toy-tp", "--store", str(store_root), "--rank", "1", "--world", "2", "--json"]
    )
    out, err = capsys.readouterr()
    assert status == 0, err
    facts = json.loads(out)["shard"]
    split, _whole = split_bytes(built)
    n_split = sum(expected(built, 0, 2)[n].shape != a.shape for n, a in built.expected.items())
    assert facts["rank"] == 1
    assert facts["world"] == 2
    assert facts["layers"] is None
    assert facts["split_tensors"] == n_split
    assert facts["whole_tensors"] == len(built.expected) - n_split
    assert facts["split_bytes_full"] == split
    assert facts["split_bytes_held"] == split // 2
    assert facts["bytes_read"] >= split // 2
    assert facts["checked"] is False
    status = run(["load", "toy-tp", "--store", str(store_root), "--world", "2", "--pipeline", "2"])
    out, _ = capsys.readouterr()
    assert status == 0, out
    assert "rank 0/2, layers 0..0: 0 split tensors" in out
