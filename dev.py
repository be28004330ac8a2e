#!/usr/bin/env python3
"""Bootstrap asyncweights in ./.venv and run a task; needs nothing but python3.

    python3 dev.py demo [ARGS]   load the built-in demo model with a progress bar
    python3 dev.py test          lint, type-check and run the test-suite (what CI runs)
    python3 dev.py bench [ARGS]  run the benchmark harness (bench/README.md)
    python3 dev.py run CMD ...   run any command inside the environment
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def ensure_env() -> None:
    """Create the virtual environment and install the project, once per pyproject change."""
    stamp = VENV / ".installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("creating .venv …", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    # PEP 735 dependency groups need pip >= 25.1.
    subprocess.run([*pip, "install", "-U", "pip>=25.1"], check=True)
    print("installing asyncweights and its test tools into .venv …", flush=True)
    subprocess.run([*pip, "install", "-e", str(ROOT), "--group", "dev", "--group", "bench"],
                   check=True)
    stamp.write_text(wanted)


def run(*cmd: str) -> int:
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    task, args = (argv[0], argv[1:]) if argv else ("demo", [])
    ensure_env()
    if task == "demo":
        return run(str(BIN / "asyncweights"), "demo", *args)
    if task == "test":
        steps = [
            [str(BIN / "ruff"), "check", "src", "tests", "bench", "examples"],
            [str(BIN / "ruff"), "format", "--check", "src", "tests", "bench", "examples"],
            [str(BIN / "mypy")],
            [str(BIN / "pytest"), *(args or ["-q"])],
        ]
        for step in steps:
            print("$", " ".join(Path(step[0]).name if i == 0 else s for i, s in enumerate(step)),
                  flush=True)
            if code := run(*step):
                return code
        return 0
    if task == "bench":
        return run(str(BIN / "python"), "bench/run.py", *args)
    if task == "run":
        return run(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
