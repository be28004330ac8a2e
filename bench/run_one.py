"""Run one strategy once in this (fresh) process and print its figures as one JSON line.

    python bench/run_one.py STRATEGY MODEL_INFO_JSON

``MODEL_INFO_JSON`` is the ``<kind>-<tag>.json`` file `generate.py` wrote beside the store.
``STRATEGY:knob=value,...`` sets `Limits` fields for the asyncweights strategies.
``STRATEGY@base`` runs the strategy with the asyncweights source tree named by the
``AW_BASE_SRC`` environment variable first on ``sys.path`` (an A/B against another commit).
The line always has ``strategy`` and ``ok``; a failed run has ``error`` instead of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Before anything imports asyncweights (generate does): the @base tree must be the one found.
if len(sys.argv) > 1 and sys.argv[1].endswith("@base"):
    sys.path.insert(0, os.environ["AW_BASE_SRC"])

from generate import ModelPaths
from strategies import STRATEGIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("strategy", help="a name from strategies.py, optionally with @base")
    parser.add_argument("model_info", type=Path)
    args = parser.parse_args()
    name, _, variant = args.strategy.partition("@")
    name, _, knobs = name.partition(":")
    if knobs:  # e.g. aw_load:read_chunk=262144,workers=3 -> Limits(read_chunk=..., workers=3)
        os.environ["AW_BENCH_LIMITS"] = knobs
    if name not in STRATEGIES or variant not in ("", "base"):
        parser.error(f"unknown strategy {args.strategy!r}")
    if variant:
        import asyncweights

        base = os.path.realpath(os.environ["AW_BASE_SRC"])
        if not os.path.realpath(asyncweights.__file__).startswith(base + os.sep):
            parser.error(f"@base imported asyncweights from {asyncweights.__file__}")
    info = json.loads(args.model_info.read_text())
    paths = ModelPaths(**info["paths"])
    try:
        figures = STRATEGIES[name].run(paths)
        line = {"strategy": args.strategy, "ok": True, **figures}
    except Exception as exc:  # a failed run is a result too: report it, do not crash
        line = {"strategy": args.strategy, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
