"""Run the benchmark matrix: every strategy in a fresh process, interleaved, warm and cold.

    python bench/run.py                       # full: big + small, 5 runs, ~12 min on 2 cores
    python bench/run.py --size smoke --runs 1 # 64 MiB smoke, well under a minute
    python bench/run.py --strategies aw_load,seed --models big --conditions warm --runs 7
    python bench/run.py --quick               # 5 pairs aw_load/seed, mid-size, under a minute
    AW_BASE_SRC=../main/src python bench/run.py --quick --strategies 'aw_load;aw_load@base;seed'
    python bench/run.py --quick --strategies 'aw_load;aw_load:read_chunk=262144;seed'

Each repetition runs every strategy once, in the same order (A B C … A B C …), so drift on a
noisy machine spreads evenly. Before a cold run every file of the model is evicted with
posix_fadvise(DONTNEED); before a warm run the files the strategy reads are read once. The
residency (mincore) just before each run is recorded with it. Results: a terminal table,
``--json`` (every raw run and the machine facts), a Markdown report and a PNG chart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pagecache
from generate import ModelPaths, add_size_args, ensure_models, size_from_args
from report import (
    summarize,
    terminal_table,
    write_chart,
    write_markdown,
    write_readme_results,
)
from strategies import STRATEGIES

HERE = Path(__file__).resolve().parent
MATRIX = [
    "aw_load", "aw_load_fast", "aw_stream", "aw_load_trio", "aw_stream_trio", "aw_verify",
    "seed", "single", "st_numpy", "raw1", "raw2", "raw1_fresh", "raw2_fresh",
]  # fmt: skip
MACHINE_LIMITS = ["memcpy", "sha256"]  # once per repetition, on "big", no cache condition
CHECKS = ["aw_cancel", "aw_cancel_trio", "aw_reload"]  # warm, once per repetition and model
ONCE = ["aw_nofile64"]  # warm, once per model
RUN_TIMEOUT_S = 300


def machine_facts() -> dict[str, Any]:
    """CPU, cores, memory, kernel, THP, library versions and the commit being measured."""

    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "?"

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in read("/proc/cpuinfo").splitlines()
         if ln.startswith("model name")), platform.processor() or "?",
    )  # fmt: skip
    mem = next((ln.split()[1] for ln in read("/proc/meminfo").splitlines()
                if ln.startswith("MemTotal")), "0")  # fmt: skip
    import mlx.core as mx
    import numpy as np

    import asyncweights

    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", "?"),
        "numpy": np.__version__,
        "asyncweights": getattr(asyncweights, "__version__", "?"),
        "commit": commit,
        "thp_enabled": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_defrag": read("/sys/kernel/mm/transparent_hugepage/defrag"),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _files(paths: ModelPaths, strategy: str) -> list[str]:
    kind = STRATEGIES[strategy.partition("@")[0].partition(":")[0]].files
    if kind == "blobs":
        return [*paths.blobs, paths.manifest]
    if kind == "single":
        return [paths.single]
    return []


def run_once(
    strategy: str, paths: ModelPaths, info_file: Path, condition: str, rep: int
) -> dict[str, Any]:
    """Prepare the page cache, run the strategy in a fresh process, return its figures."""
    files = _files(paths, strategy)
    if condition == "cold":
        pagecache.evict([*paths.blobs, paths.manifest, paths.single])
    elif condition == "warm" and files and pagecache.residency(files) < 1.0:
        pagecache.warm(files)
    residency = pagecache.residency(files) if files else None
    cmd = [sys.executable, str(HERE / "run_one.py"), strategy, str(info_file)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        lines = proc.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines else {}
        if not lines or proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            result = {"strategy": strategy, "ok": False, "error": tail[0], **result}
    except subprocess.TimeoutExpired:
        result = {"strategy": strategy, "ok": False, "error": f"timeout {RUN_TIMEOUT_S}s"}
    result.update(model=paths.kind, condition=condition, rep=rep, residency=residency)
    return result


def _model_facts(p: ModelPaths) -> dict[str, Any]:
    return {"name": p.name, "tensors": p.tensors, "blob_bytes": p.blob_bytes,
            "tensor_bytes": p.tensor_bytes}  # fmt: skip


def plan_runs(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """(model, condition, strategy, rep) in execution order: interleaved repetitions."""
    chosen = strategy_list(args.strategies) if args.strategies else None
    if getattr(args, "quick", False) and chosen:
        model = args.models.split(",")[0]
        return [(model, "warm", s, rep) for rep in range(args.runs) for s in chosen]

    def keep(names: list[str]) -> list[str]:
        # Variants (STRATEGY:knobs, STRATEGY@base) run where their strategy would.
        if chosen is None:
            return names
        return [s for s in chosen if s.partition("@")[0].partition(":")[0] in names]

    runs = []
    for model in args.models.split(","):
        for rep in range(args.runs):
            for condition in args.conditions.split(","):
                runs += [(model, condition, s, rep) for s in keep(MATRIX)]
            if model == "big":
                runs += [(model, "-", s, rep) for s in keep(MACHINE_LIMITS)]
            runs += [(model, "warm", s, rep) for s in keep(CHECKS)]
        runs += [(model, "warm", s, 0) for s in keep(ONCE)]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.partition("\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_size_args(parser)
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each strategy")
    parser.add_argument("--models", default="big,small", help="comma list: big,small")
    parser.add_argument("--conditions", default="warm,cold", help="comma list: warm,cold")
    parser.add_argument(
        "--strategies", help="comma (or ';') list, default all; see strategies.py, run_one.py"
    )
    parser.add_argument("--out", type=Path, help="folder for results (default bench/results/TAG)")
    parser.add_argument("--json", type=Path, help="raw runs + machine facts (OUT/runs.json)")
    parser.add_argument("--readme", action="store_true", help="put the results in bench/README.md")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    parser.add_argument("--from-json", type=Path, help="rebuild the reports from a runs.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check a change: --scale 0.25 --models big --conditions warm --runs 5 and\n"
        "--strategies aw_load,seed unless given; prints per-pair ratios, writes no report",
    )
    args = parser.parse_args()
    if args.quick:
        if args.scale is None:
            args.scale = 0.25
        args.conditions = "warm"
        if "--models" not in sys.argv:
            args.models = "big"
        if args.strategies is None:
            args.strategies = "aw_load,seed"
        if "--runs" not in sys.argv:
            args.runs = 5
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        out = args.out or args.from_json.parent
        publish(doc, out, args.json or args.from_json, args.readme)
        return
    if args.strategies:
        chosen = [s.partition("@")[0].partition(":")[0] for s in strategy_list(args.strategies)]
        unknown = set(chosen) - set(STRATEGIES)
        if unknown:
            parser.error(f"unknown strategies: {', '.join(sorted(unknown))}")

    size = size_from_args(args)
    out = args.out or HERE / "results" / size.tag
    out.mkdir(parents=True, exist_ok=True)
    json_file = args.json or out / "runs.json"
    models = ensure_models(args.scratch, size)
    info_files = {k: args.scratch / f"{k}-{size.tag}.json" for k in models}
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    runs = plan_runs(args)
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    started = time.monotonic()
    for i, (model, condition, strategy, rep) in enumerate(runs):
        r = run_once(strategy, models[model], info_files[model], condition, rep)
        results.append(r)
        if not args.quiet:
            figure = f"{r['gbps']:.2f} GB/s" if "gbps" in r else r.get("error", "ok")
            print(
                f"[{i + 1}/{len(runs)} {time.monotonic() - started:5.0f}s] {model} {condition} "
                f"{strategy} #{rep}: {figure}",
                file=sys.stderr,
            )

    if args.quick:
        quick_summary(results, strategy_list(args.strategies))
        return
    doc = {
        "command": command,
        "elapsed_s": time.monotonic() - started,
        "machine": machine_facts() | {"loadavg_start": loadavg_start},
        "size": {"tag": size.tag, "scale": size.scale, "small_blocks": size.small_blocks},
        "models": {k: _model_facts(p) for k, p in models.items()},
        "runs": results,
    }
    publish(doc, out, json_file, args.readme)


def strategy_list(text: str) -> list[str]:
    """Strategies split on ';' if there is one (knobs use ','), else on ','."""
    return text.split(";") if ";" in text else text.split(",")


def quick_summary(results: list[dict[str, Any]], strategies: list[str]) -> None:
    """Median wall per strategy, and the first strategy's time ratio to each other's, taken
    per repetition (pairs run back to back) and then the median: robust to drift."""
    import statistics

    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        if r.get("ok"):
            by.setdefault(r["strategy"], {})[r["rep"]] = r
    for name in strategies:
        runs = list(by.get(name, {}).values())
        if not runs:
            print(f"{name:14s} no successful run", file=sys.stderr)
            continue
        line = f"{name:14s} n={len(runs)}"
        walls = [r["wall_s"] for r in runs if "wall_s" in r]
        if walls:
            line += f" wall {statistics.median(walls):.3f} s"
        lags = [r["lag_p99_ms"] for r in runs if r.get("lag_p99_ms") is not None]
        if lags:
            worst = max(r["lag_max_ms"] for r in runs)
            line += f"  lag p99 {statistics.median(lags):.1f} ms (max {worst:.1f})"
        extras = [("first_tensor_ms", " ms"), ("reload_speedup", "x"), ("cancel_latency_ms", " ms")]
        for key, unit in extras:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                line += f"  {key} {statistics.median(values):.2f}{unit} (max {max(values):.2f})"
        print(line, file=sys.stderr)
    first = strategies[0]
    for other in strategies[1:]:
        pairs = [
            by[other][rep]["wall_s"] / by[first][rep]["wall_s"]
            for rep in by.get(first, {})
            if "wall_s" in by.get(other, {}).get(rep, {}) and "wall_s" in by[first][rep]
        ]
        if pairs:
            print(
                f"{first} speed vs {other}: median {statistics.median(pairs):.3f}x over "
                f"{len(pairs)} pairs (range {min(pairs):.2f}-{max(pairs):.2f}; load avg "
                f"{os.getloadavg()[0]:.1f})",
                file=sys.stderr,
            )


def publish(doc: dict[str, Any], out: Path, json_file: Path, readme: bool) -> None:
    """Summarize, then write the JSON, the Markdown report, the chart; print the tables."""
    out.mkdir(parents=True, exist_ok=True)
    doc["summary"] = summarize(doc)
    json_file.write_text(json.dumps(doc, indent=1))
    markdown = write_markdown(doc, out / "report.md")
    chart = write_chart(doc, out / "throughput.png")
    if readme:
        write_readme_results(HERE / "README.md", markdown, chart)
    print(terminal_table(doc))
    print(f"\nraw runs: {json_file}\nreport: {out / 'report.md'}\nchart: {chart}")


if __name__ == "__main__":
    main()
