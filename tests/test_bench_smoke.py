"""The benchmark harness runs end to end in its smoke size and reports every strategy.

Speed is never asserted here: only that each strategy ran in its own process and reported
sane figures, and that the report, chart and target verdicts were written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from strategies import STRATEGIES  # type: ignore[import-not-found]  # noqa: E402


@pytest.mark.timeout(240)
def test_smoke_run_reports_every_strategy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(ROOT / "bench" / "run.py"), "--size", "smoke", "--runs", "1",
        "--quiet", "--scratch", str(tmp_path / "scratch"), "--out", str(out),
        "--json", str(tmp_path / "runs.json"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Verdicts against the targets" in proc.stdout

    doc = json.loads((tmp_path / "runs.json").read_text())
    assert set(doc["machine"]) >= {"cpu", "cores", "memory_gib", "kernel", "mlx", "thp_enabled"}
    runs = doc["runs"]
    assert {r["strategy"] for r in runs} == set(STRATEGIES)
    failed = [(r["model"], r["condition"], r["strategy"], r.get("error")) for r in runs
              if not r["ok"]]  # fmt: skip
    assert failed == []
    for r in runs:
        assert r["wall_s"] > 0 if "wall_s" in r else "cancel_latency_ms" in r
        if r["strategy"].startswith(("aw_load", "aw_stream", "aw_verify", "aw_nofile")):
            assert r["tensors"] == doc["models"][r["model"]]["tensors"]
            assert r["ticks"] > 0
            assert r["lag_max_ms"] >= r["lag_p99_ms"] >= r["lag_p50_ms"] >= 0
        if "gbps" in r:
            assert r["gbps"] > 0
        if "max_fds_extra" in r:
            assert r["max_fds_extra"] >= 0
        if r.get("residency") is not None:
            assert 0.0 <= r["residency"] <= 1.0
        if r["strategy"].startswith("aw_stream"):
            assert 0 < r["first_tensor_ms"] <= r["wall_s"] * 1e3
    conditions = {(r["model"], r["condition"]) for r in runs}
    assert {("big", "warm"), ("big", "cold"), ("small", "warm"), ("small", "cold")} <= conditions

    targets = doc["summary"]["targets"]
    assert len(targets) >= 10
    assert all(t["verdict"] in ("met", "**MISSED**", "not run") for t in targets)
    # The smoke run has every strategy, model and condition: every target is judged.
    assert [t["figure"] for t in targets if t["verdict"] == "not run"] == []
    information = doc["summary"]["information"]
    assert len(information) == 4
    assert all(
        i["measured"].endswith("runs; raw2_fresh 1)") or i["measured"].endswith("runs; raw2 1)")
        for i in information
    )
    assert (out / "report.md").read_text().startswith("### Benchmark report")
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_hostile_lag_smoke_runs_every_case_on_both_backends(tmp_path: Path) -> None:
    """bench/hostile_lag.py in its smoke size: every case runs and ends as it should (the
    big documents decoded or refused with the right error); lag is not asserted."""
    out = tmp_path / "lag.json"
    cmd = [sys.executable, str(ROOT / "bench" / "hostile_lag.py"), "--smoke", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    outcomes = {(r["backend"], r["case"]): r["outcome"] for r in results}
    refused = "HeaderError: 1 trailing bytes after the last tensor"
    expected = {
        "manifest-layers": "ok, 30000 layers",
        "manifest-strings": "ok, 0 layers",
        "header-tensors": refused,
        "header-metadata": refused,
        "config-vocab": "ok, 20000 keys",
    }
    for backend in ("asyncio", "trio"):
        for case, outcome in expected.items():
            assert outcomes[backend, case] == outcome, (backend, case)
        before = [case for b, case in outcomes if b == backend and case.startswith("before: ")]
        assert len(before) == 3
    assert all(r["ticks"] > 0 and r["max_lag_ms"] >= 0 and r["seconds"] > 0 for r in results)
