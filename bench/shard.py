"""Loading across machines: per-rank bytes read and time, asyncweights against mlx-lm's way.

    python bench/shard.py [--size full|smoke] [--scale F] [--worlds 1,2,3] [--runs 3]
                          [--scratch DIR] [--out bench/results/shard.json]

The "transformer" component of the "big" benchmark model (``bench/generate.py``: a DiT of 15
blocks, bf16; ~1.3 GiB at scale 1) is split tensor-parallel across ``world`` ranks, each rank
a process of its own, all started at once (they share this machine's cores), in one run:

* ``asyncweights``: ``aw.load_weights(..., shard=aw.Shard(rank, world, rules=RULES))``: each
  split tensor's byte ranges read straight into the rank's arrays;
* ``mlx-lm``: what mlx-lm's ``sharded_load`` does: a lazy ``mx.load`` of the model file, each
  weight cut as ``mlx.nn.layers.distributed`` cuts it (``mx.split`` of each segment,
  concatenated, ``mx.contiguous``), one ``mx.eval``.

World 1 loads the whole component both ways. Each rank reports the bytes it read
(``/proc/self/io`` ``rchar``), its wall time and its CPU time (user + system). Goals
(issue "Loading across machines"): bytes per rank within 1% of total / world, and CPU seconds
summed over the ranks at most 1.1x the single-process load's. The files are in the page
cache (warm): bytes read count what each loader asks of the kernel, not disk traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = "transformer"
#: the DiT's layers, as mlx.nn shards them (attn.qkv is q, k, v fused along rows)
RULES: dict[str, Any] = {
    "attn.qkv": ("all-to-sharded", 3),
    "attn.proj": "sharded-to-all",
    "mlp.fc1": "all-to-sharded",
    "mlp.fc2": "sharded-to-all",
    "adaLN_modulation.1": "all-to-sharded",
}


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rank_run(method: str, name: str, store: str, single: str, rank: int, world: int) -> None:
    """One rank: load, then print one JSON line of what it read and how long it took."""
    import anyio
    import mlx.core as mx

    import asyncweights as aw

    shard = aw.Shard(rank, world, rules=RULES) if world > 1 else None
    prefix = COMPONENT + "/"
    # The rank's slices are planned (header only) before the clock starts, for both methods.
    plan: dict[str, aw.ShardSlice | None] = {}
    if method == "mlx-lm":
        keys = json.loads(Path(single).with_suffix(".keys.json").read_text())
        for key, shape in keys.items():
            if key.startswith(prefix):
                plan[key] = None if shard is None else shard.slice_for(key, tuple(shape))
    read0, cpu0, t0 = _rchar(), _cpu(), time.perf_counter()
    if method == "asyncweights":
        weights = anyio.run(lambda: aw.load_weights(name, COMPONENT, store=store, shard=shard))
        arrays = dict(weights)
    else:
        loaded = mx.load(single)
        assert isinstance(loaded, dict)
        arrays = {}
        for key, piece in plan.items():
            w = loaded[key]
            if piece is not None:
                parts = []
                for lo, hi in piece.ranges:
                    index = [slice(None)] * w.ndim
                    index[piece.axis] = slice(lo, hi)
                    parts.append(w[tuple(index)])
                w = mx.contiguous(mx.concatenate(parts, axis=piece.axis))
            arrays[key] = w
        mx.eval(list(arrays.values()))
        del loaded
    seconds = time.perf_counter() - t0
    out = {
        "method": method,
        "rank": rank,
        "world": world,
        "seconds": seconds,
        "cpu_seconds": _cpu() - cpu0,
        "bytes_read": _rchar() - read0,
        "bytes_held": sum(a.nbytes for a in arrays.values()),
        "tensors": len(arrays),
    }
    print(json.dumps(out), flush=True)


def _round(method: str, paths: Any, world: int, timeout: float) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")]))
    args = [paths.name, paths.store, paths.single]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank-run", method, *args, str(r), str(world)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(world)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"{method} rank failed ({p.returncode}): {err.decode()[-2000:]}")
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    return results


def _keys_file(single: str) -> None:
    """Shapes of the one-file copy's tensors, read from its header (beside it, once)."""
    target = Path(single).with_suffix(".keys.json")
    if target.exists():
        return
    with open(single, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    target.write_text(json.dumps(shapes))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-run":
        method, name, store, single, rank, world = sys.argv[2:8]
        rank_run(method, name, store, single, int(rank), int(world))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from generate import _reusable, _spec_digest, add_size_args, big_spec, generate, size_from_args

    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    add_size_args(parser)
    parser.add_argument("--worlds", default="1,2,3", help="world sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="rounds per world and method")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shard.json")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per round")
    args = parser.parse_args()
    size = size_from_args(args)
    specs = big_spec(size.scale)
    digest = _spec_digest("big", specs)
    info = args.scratch / f"big-{size.tag}.json"
    paths = _reusable(info, digest)
    if paths is None:
        args.scratch.mkdir(parents=True, exist_ok=True)
        paths = generate("big", specs, args.scratch, size.tag)
        info.write_text(json.dumps({"spec": digest, "paths": paths.__dict__}))
    _keys_file(paths.single)
    worlds = [int(w) for w in args.worlds.split(",")]
    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        for world in worlds:
            for method in ("asyncweights", "mlx-lm"):  # interleaved, same page cache
                for r in _round(method, paths, world, args.timeout):
                    r["run"] = run
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr)
    summary = _summary(rows, worlds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    args.out.write_text(json.dumps({"machine": machine, "rows": rows, "summary": summary}))
    print(_table(summary))


def _summary(rows: list[dict[str, Any]], worlds: list[int]) -> list[dict[str, Any]]:
    out = []
    for world in worlds:
        for method in ("asyncweights", "mlx-lm"):
            mine = [r for r in rows if r["world"] == world and r["method"] == method]
            runs = sorted({r["run"] for r in mine})
            per_run_cpu = [sum(r["cpu_seconds"] for r in mine if r["run"] == k) for k in runs]
            out.append(
                {
                    "world": world,
                    "method": method,
                    "bytes_read_per_rank": statistics.median(r["bytes_read"] for r in mine),
                    "bytes_held_per_rank": statistics.median(r["bytes_held"] for r in mine),
                    "seconds_per_rank": statistics.median(r["seconds"] for r in mine),
                    "cpu_seconds_all_ranks": statistics.median(per_run_cpu),
                }
            )
    return out


def _table(summary: list[dict[str, Any]]) -> str:
    mib = 1 << 20
    whole = {s["method"]: s for s in summary if s["world"] == 1}
    lines = [
        "| world | method | read / rank (MiB) | held / rank (MiB) | read / held "
        "| read / (total / world) | wall / rank (s) | CPU, all ranks (s) | CPU vs world 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        base = whole.get(s["method"])
        total = base["bytes_held_per_rank"] if base else float("nan")
        share = s["bytes_read_per_rank"] / (total / s["world"])
        held = s["bytes_read_per_rank"] / s["bytes_held_per_rank"]
        cpu = s["cpu_seconds_all_ranks"] / base["cpu_seconds_all_ranks"] if base else float("nan")
        lines.append(
            f"| {s['world']} | {s['method']} | {s['bytes_read_per_rank'] / mib:.1f} "
            f"| {s['bytes_held_per_rank'] / mib:.1f} | {held:.4f} | {share:.4f} "
            f"| {s['seconds_per_rank']:.3f} | {s['cpu_seconds_all_ranks']:.3f} | {cpu:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
