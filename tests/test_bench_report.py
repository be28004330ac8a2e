"""bench/report.py judges the targets of bench/README.md "Targets" from raw runs.

Hand-made runs with exact figures: each verdict lands on the right side of its bound, and a
row whose strategies did not run says "not run". No timing is measured here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from report import summarize  # type: ignore[import-not-found]  # noqa: E402


def run(model: str, condition: str, strategy: str, wall_s: float, **figures: Any) -> Any:
    """One successful run of `strategy` moving 1 GB in `wall_s` seconds."""
    return {
        "model": model, "condition": condition, "strategy": strategy, "ok": True,
        "wall_s": wall_s, "gbps": 1.0 / wall_s, **figures,
    }  # fmt: skip


def verdicts(runs: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    summary = summarize({"runs": runs})
    return {t["figure"]: (t["measured"], t["verdict"]) for t in summary["targets"]}


BIG_WARM = "big, warm: responsive default (load_weights) vs seed-style"
FAST = "big, warm: throughput choice (Limits.throughput()) vs seed-style"
SMALL = "small, warm: load_weights vs one-file mx.load"
COLD = "big, cold: load_weights vs seed-style"
LAG = "event-loop lag, big warm load, responsive default, {} (medians)"
FIRST = "time to first tensor, stream_weights, {} warm, {} (median)"
RELOAD = "reload through WeightCache vs its first load, {} warm (median of runs)"
VERIFY = "verify=True load time vs plain, big {} (medians)"


def test_ratio_targets_each_on_its_own_bound() -> None:
    lag = {"lag_p50_ms": 0.2, "lag_p99_ms": 2.0, "lag_max_ms": 10.0}
    got = verdicts([
        run("big", "warm", "seed", 1.0),
        run("big", "warm", "aw_load", 1.0 / 0.95, **lag),  # exactly 0.95x: met
        run("big", "warm", "aw_load_fast", 1.0 / 0.99),  # 0.99x: under 1.0x
        run("small", "warm", "single", 1.0),
        run("small", "warm", "aw_load", 1.0),
        run("big", "cold", "seed", 1.0),
        run("big", "cold", "aw_load", 1.0 / 1.29),  # 1.29x: under 1.3x
    ])  # fmt: skip
    assert got[BIG_WARM] == ("0.95x (1 runs; seed 1)", "met")
    assert got[FAST] == ("0.99x (1 runs; seed 1)", "**MISSED**")
    assert got[SMALL] == ("1.00x (1 runs; single 1)", "met")
    assert got[COLD] == ("1.29x (1 runs; seed 1)", "**MISSED**")
    assert got[LAG.format("asyncio")] == (
        "p99 2.0 ms, max 10.0 ms (1 runs; worst max 10.0 ms)",
        "met",
    )
    assert got[LAG.format("trio")] == ("—", "not run")


def test_first_tensor_reload_verify_and_what_did_not_run() -> None:
    got = verdicts([
        run("big", "warm", "aw_stream", 1.0, first_tensor_ms=20.0),
        run("small", "warm", "aw_stream_trio", 1.0, first_tensor_ms=50.5),
        run("big", "warm", "aw_reload", 3.0, first_load_s=1.8, reload_s=1.0,
            reload_speedup=1.8),
        run("big", "warm", "aw_reload", 3.0, first_load_s=2.0, reload_s=1.0,
            reload_speedup=2.0),
        run("big", "warm", "aw_reload", 3.0, first_load_s=1.0, reload_s=1.0,
            reload_speedup=1.0),
        run("big", "warm", "aw_load", 1.0),
        run("big", "warm", "aw_verify", 1.5),
    ])  # fmt: skip
    assert got[FIRST.format("big", "asyncio")] == ("20.0 ms", "met")
    assert got[FIRST.format("small", "trio")] == ("50.5 ms", "**MISSED**")
    assert got[FIRST.format("big", "trio")] == ("—", "not run")
    # The median of the per-run speedups (1.0, 1.8, 2.0), with the median times beside it.
    assert got[RELOAD.format("big")] == (
        "1.80x (first load 1.800 s, reload 1.000 s; 3 runs)",
        "met",
    )
    assert got[RELOAD.format("small")] == ("—", "not run")
    assert got[VERIFY.format("warm")] == ("1.50x (1.500 s vs 1.000 s)", "met")
    assert got[VERIFY.format("cold")] == ("—", "not run")


def test_cancel_open_files_and_the_raw_limits_as_information() -> None:
    left = {f"{when}_{what}": 0 for when in ("after", "settled")
            for what in ("blob_fds", "busy_threads", "mlx_active_mib")}  # fmt: skip
    cancels = [
        {"model": "big", "condition": "warm", "strategy": "aw_cancel", "ok": True,
         "cancel_latency_ms": ms, **left}
        for ms in (15.0, 20.0, 60.0)
    ]  # fmt: skip
    cancels[2]["after_blob_fds"] = 1  # one run left a blob file open
    runs = [*cancels, run("big", "warm", "aw_load_fast", 1.0, max_fds_extra=65)]
    runs += [run("big", "warm", "raw2_fresh", 0.5), run("big", "warm", "aw_load", 1.0)]
    summary = summarize({"runs": runs})
    got = {t["figure"]: (t["measured"], t["verdict"]) for t in summary["targets"]}
    assert got["cancel, big warm: time from cancel to return (median, worst)"] == (
        "20.0 ms (60.0 ms; asyncio 3 runs, trio not run)",
        "met",
    )
    left_row = got["cancel, big warm: left right after return (worst run)"]
    assert left_row[1] == "**MISSED**"
    assert left_row[0].startswith("blob files 1, busy threads 0, MLX active MiB 0;")
    assert got["cancel, small warm: time from cancel to return (median, worst)"] == ("—", "not run")
    assert got["open files held during any load (worst run, both models)"] == ("65", "**MISSED**")
    assert got["loads under `ulimit -n 64`"] == ("—", "not run")
    # The raw reads are information: no verdict.
    assert summary["information"][0] == {
        "figure": "big, warm: load_weights vs raw read, fresh memory, 2 thr",
        "measured": "0.50x (1 runs; raw2_fresh 1)",
    }
    assert summary["information"][2]["measured"] == "not run"
    assert {"met", "**MISSED**", "not run"} >= {t["verdict"] for t in summary["targets"]}
