"""One rank of a real ``mx.distributed`` group (``ring`` backend), run by test_shard_dist.py.

Usage: ``MLX_RANK=r MLX_HOSTFILE=hosts.json python tests/shard_worker.py STORE REFS OUT``.
Loads this rank's shard of the toy model, compares it with the reference slices the test
wrote (``REFS/world{N}_rank{r}.safetensors``, from mlx's own ``_shard``), measures the bytes
read, runs ``check_shards`` (a good load, a wrong part, another model version), runs a
tensor-parallel MLP through mlx.nn's sharded layers, loads a pipeline stage while recording
the blob files opened, and writes what it saw to ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import mlx.core as mx
import mlx.nn as nn

import asyncweights as aw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.shard_support import MODEL, RULES, rchar

OPENED: list[str] = []
WATCHING = [False]


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if WATCHING[0] and event == "open" and isinstance(args[0], str) and "blobs" in args[0]:
        OPENED.append(args[0])


class _MLP(nn.Module):  # type: ignore[misc]  # mlx.nn ships no type information: Module is Any
    def __init__(self, dims: int, hidden: int, group: mx.distributed.Group) -> None:
        super().__init__()
        self.up_proj = nn.AllToShardedLinear(dims, hidden, bias=True, group=group)
        self.down_proj = nn.ShardedToAllLinear(hidden, dims, bias=True, group=group)

    def __call__(self, x: mx.array) -> mx.array:
        y: mx.array = self.down_proj(nn.gelu(self.up_proj(x)))
        return y


class _Root(nn.Module):  # type: ignore[misc]  # mlx.nn ships no type information: Module is Any
    def __init__(self, dims: int, hidden: int, group: mx.distributed.Group) -> None:
        super().__init__()
        self.mlp = _MLP(dims, hidden, group)


def _equal(a: mx.array, b: mx.array) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(mx.array_equal(a, b).item())


async def _load(store: str, model: str, shard: aw.Shard) -> aw.Weights:
    return await aw.load_weights(model, store=store, shard=shard)


def _check(group: mx.distributed.Group, weights: aw.Weights) -> str | None:
    try:
        aw.check_shards(group, weights)
    except aw.ShardError as exc:
        return str(exc)
    return None


def main() -> None:
    store, refs, out = sys.argv[1:4]
    group = mx.distributed.init(backend="ring", strict=True)
    rank, world = group.rank(), group.size()
    result: dict[str, Any] = {"rank": rank, "world": world}
    shard = aw.Shard.from_group(group, rules=RULES)

    anyio.run(_load, store, MODEL, shard)  # warm: imports, header cache
    before = rchar()
    weights = anyio.run(_load, store, MODEL, shard)
    result["read"] = rchar() - before
    result["held_split"] = sum(i.nbytes for i in weights.info.values() if i.shard is not None)
    ref = mx.load(os.path.join(refs, f"world{world}_rank{rank}.safetensors"))
    assert isinstance(ref, dict)
    result["names_match"] = sorted(ref) == sorted(weights)
    result["mismatched"] = [n for n in ref if n not in weights or not _equal(weights[n], ref[n])]
    result["check_good"] = _check(group, weights)

    # The last rank takes the first rank's part: caught, naming a tensor.
    wrong = aw.Shard(0 if rank == world - 1 else rank, world, rules=RULES)
    result["check_wrong_part"] = _check(group, anyio.run(_load, store, MODEL, wrong))
    # The last rank loads another version of the model (one tensor differs).
    other = MODEL.replace("latest", "v2") if rank == world - 1 else MODEL
    result["check_other_version"] = _check(group, anyio.run(_load, store, other, shard))

    # Tensor-parallel MLP through mlx.nn's sharded layers, no reshuffling.
    mlp = anyio.run(_load, store, "mlp:latest", aw.Shard.from_group(group))
    io = mx.load(os.path.join(refs, "mlp_io.safetensors"))
    assert isinstance(io, dict)
    root = _Root(io["x"].shape[-1], mlp["mlp.up_proj.weight"].shape[0] * world, group)
    root.load_weights(list(mlp.for_mlx_nn().items()), strict=True)
    y = root.mlp(io["x"])
    # The same by hand: partial products, one all_sum.
    h = nn.gelu(io["x"] @ mlp["mlp.up_proj.weight"].T + mlp["mlp.up_proj.bias"])
    partial = h @ mlp["mlp.down_proj.weight"].T
    y_hand = mx.distributed.all_sum(partial, group=group) + mlp["mlp.down_proj.bias"]
    mx.eval(y, y_hand)
    result["mlp_max_diff"] = mx.abs(y - io["y"]).max().item()
    result["mlp_hand_max_diff"] = mx.abs(y_hand - io["y"]).max().item()
    result["mlp_bit_exact"] = _equal(y, io["y"])
    result["mlp_scale"] = mx.abs(io["y"]).max().item()

    # A pipeline stage opens only its own layers' blobs.
    stage = aw.Shard.pipeline(rank, world, 2)
    sys.addaudithook(_hook)
    WATCHING[0] = True
    staged = anyio.run(_load, store, MODEL, stage)
    WATCHING[0] = False
    result["stage_layers"] = (
        None if stage.layers is None else [stage.layers.start, stage.layers.stop]
    )
    result["stage_opened"] = sorted(set(OPENED))
    result["stage_tensors"] = sorted(staged)

    mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))  # leave together
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
