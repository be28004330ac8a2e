"""Pull while loading against pull then load, from a local docker-registry, in one run.

    python bench/pull.py [--scale 1.0] [--scratch DIR] [--out bench/results/pull.json]

The "big" benchmark model (``bench/generate.py``; ~2 GiB, 598 tensors at scale 1) is pushed
to Debian's ``docker-registry`` started on a free 127.0.0.1 port (the tests' runner).

Each round runs, back to back, each into a fresh store (medians of ``--rounds`` rounds):

1. ``pull``: `aw.pull` alone, the pure download (blobs hashed, fsynced, renamed);
2. ``load``: `aw.load_weights` of what (1) pulled: pull then load is (1) + (2);
3. ``stream --pull``: `aw.stream_weights(pull=True)`, every tensor dropped as it arrives:
   time to the first tensor and to the end (pull finished, manifest written);
4. ``load --pull``: `aw.load_weights(pull=True)`, all tensors held, to the end.

Goals (bench/README.md#targets): (3) and (4) at most 1.1x (1); the first tensor within 5%
of (1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

import asyncweights as aw
from generate import big_spec, generate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' registry runner

from tests.registry_support import RealRegistry, registry_missing  # noqa: E402


async def measure_round(name: str, url: str, work: Path) -> dict[str, float]:
    """One round: the four measurements back to back, each into a fresh store."""
    figures: dict[str, float] = {}

    store = work / "a"
    started = time.perf_counter()
    await aw.pull(name, store=store, registry=url)
    figures["pull_s"] = time.perf_counter() - started
    started = time.perf_counter()
    weights = await aw.load_weights(name, store=store)
    figures["load_s"] = time.perf_counter() - started
    weights.release()
    del weights
    figures["pull_then_load_s"] = figures["pull_s"] + figures["load_s"]
    shutil.rmtree(store)

    store = work / "b"
    started = time.perf_counter()
    first = None
    count = 0
    async with aw.stream_weights(name, store=store, pull=True, registry=url) as tensors:
        async for tensor in tensors:
            if first is None:
                first = time.perf_counter() - started
            count += 1
            del tensor
    figures["stream_pull_first_tensor_s"] = first if first is not None else float("nan")
    figures["stream_pull_total_s"] = time.perf_counter() - started
    figures["tensors"] = count
    shutil.rmtree(store)

    store = work / "c"
    started = time.perf_counter()
    weights = await aw.load_weights(name, store=store, pull=True, registry=url)
    figures["load_pull_total_s"] = time.perf_counter() - started
    weights.release()
    del weights
    shutil.rmtree(store)
    return figures


async def measure(name: str, url: str, work: Path, rounds: int) -> list[dict[str, float]]:
    results = []
    for index in range(rounds):
        figures = await measure_round(name, url, work)
        print(f"round {index + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
        results.append(figures)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="byte scale of 'big' (1 = ~2 GiB)")
    parser.add_argument("--scratch", type=Path, default=None, help="scratch folder (temp)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pull.json")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four, interleaved")
    args = parser.parse_args()
    missing = registry_missing()
    if missing is not None:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        work = Path(tmp)
        started = time.monotonic()
        paths = generate("big", big_spec(args.scale), work / "source", f"s{args.scale:g}")
        print(
            f"generated {paths.name}: {paths.tensors} tensors, "
            f"{paths.blob_bytes / 2**30:.3f} GiB in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
        with RealRegistry.start(work / "registry") as registry:
            repository, _, tag = paths.name.partition(":")
            started = time.monotonic()
            registry.push(Path(paths.store), Path(paths.manifest), repository, tag)
            print(f"pushed in {time.monotonic() - started:.1f} s", file=sys.stderr)
            shutil.rmtree(work / "source")  # the registry holds its own copy
            name = f"{repository}:{tag}"  # stored under registry.ollama.ai, fetched locally
            rounds = anyio.run(measure, name, registry.url, work / "stores", args.rounds)
    # Medians over the rounds: on a shared machine one round's neighbours can differ a lot.
    figures = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    pull = figures["pull_s"]
    result = {
        "model": {"tensors": paths.tensors, "blob_bytes": paths.blob_bytes},
        "machine": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_after": os.getloadavg(),
        },
        "rounds": [{k: round(v, 4) for k, v in r.items()} for r in rounds],
        "figures": {k: round(v, 4) for k, v in figures.items()},
        "ratios": {
            "stream_pull_total_vs_pull": round(figures["stream_pull_total_s"] / pull, 3),
            "load_pull_total_vs_pull": round(figures["load_pull_total_s"] / pull, 3),
            "first_tensor_vs_pull": round(figures["stream_pull_first_tensor_s"] / pull, 4),
            "pull_then_load_vs_pull": round(figures["pull_then_load_s"] / pull, 3),
        },
        "goals": {"total_vs_pull": 1.1, "first_tensor_vs_pull": 0.05},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    gib = paths.blob_bytes / 2**30
    print(
        f"big model: {paths.tensors} tensors, {gib:.3f} GiB, local docker-registry; "
        f"medians of {len(rounds)} rounds"
    )
    print(f"  pull alone              {pull:8.3f} s  ({gib / pull:.2f} GiB/s)")
    print(f"  load after it           {figures['load_s']:8.3f} s")
    print(f"  pull then load          {figures['pull_then_load_s']:8.3f} s")
    print(
        f"  stream --pull: first    {figures['stream_pull_first_tensor_s']:8.3f} s"
        f"  ({result['ratios']['first_tensor_vs_pull']:.1%} of the pull; goal <= 5%)"
    )
    print(
        f"  stream --pull: total    {figures['stream_pull_total_s']:8.3f} s"
        f"  ({result['ratios']['stream_pull_total_vs_pull']:.2f}x the pull; goal <= 1.1x)"
    )
    print(
        f"  load --pull: total      {figures['load_pull_total_s']:8.3f} s"
        f"  ({result['ratios']['load_pull_total_vs_pull']:.2f}x the pull)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
