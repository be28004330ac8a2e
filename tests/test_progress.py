"""`Progress` directly: fraction, ETA and Ollama's pull-progress shape."""

from __future__ import annotations

import math

import asyncweights as aw


def event(phase: str, done: int, total: int, elapsed: float = 2.0) -> aw.Progress:
    return aw.Progress(phase, done, total, 0, 0, elapsed, None, "m:latest")  # type: ignore[arg-type]


def test_fraction_of_the_bytes() -> None:
    assert event("loading", 25, 100).fraction == 0.25
    assert event("planning", 0, 0).fraction == 0.0
    assert event("done", 0, 0).fraction == 1.0


def test_eta_from_the_rate_so_far() -> None:
    assert event("loading", 25, 100, elapsed=1.0).eta() == 3.0
    assert event("loading", 0, 100).eta() == math.inf


def test_ollama_shape() -> None:
    assert event("planning", 0, 100).to_ollama() == {"status": "pulling manifest"}
    assert event("loading", 10, 100).to_ollama() == {
        "status": "loading m:latest",
        "digest": "m:latest",
        "total": 100,
        "completed": 10,
    }
    assert event("done", 100, 100).to_ollama()["status"] == "success"
