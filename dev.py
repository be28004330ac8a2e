#!/usr/bin/env python3
"""Bootstrap asyncweights in ./.venv from requirements.lock and run a task; needs only python3.

    python3 dev.py demo [ARGS]       load the built-in demo model with a progress bar
    python3 dev.py test [PYTEST ARGS]
                                     lint, type-check and run the test-suite (what CI runs)
    python3 dev.py test --latest     the same in .venv-latest, against the newest releases of
                                     every dependency (not locked; shows drift on purpose)
    python3 dev.py bench [ARGS]      run the benchmark harness (bench/README.md)
    python3 dev.py run CMD ...       run any command inside the environment
    python3 dev.py lock [UV ARGS]    regenerate requirements.lock from pyproject.toml
                                     (e.g. `lock --upgrade` to move every pin to the newest)

The environment is made with the interpreter that runs this script (3.11 or newer) and
installed from requirements.lock: one universal resolution of the project's dependencies, the
`server` extra and the `dev` and `bench` dependency groups, valid on CPython 3.11-3.13 on
Linux and macOS. It is rebuilt when pyproject.toml, requirements.lock or the interpreter
change. `DEV_VENV=DIR` puts the environment elsewhere (CI keeps one per interpreter).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCK = ROOT / "requirements.lock"
VENV = Path(os.environ.get("DEV_VENV") or ROOT / ".venv").resolve()
# What `lock` resolves: kept in one place so the lock and this script agree.
LOCK_INPUTS = ["--extra", "server", "--group", "dev", "--group", "bench"]


def bin_dir(env: Path) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin")


def pip(env: Path) -> list[str]:
    return [str(bin_dir(env) / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]


def create(env: Path) -> None:
    if env.exists():
        shutil.rmtree(env)
    print(
        f"creating {env.name} with Python {sys.version.split()[0]} ({sys.executable}) …", flush=True
    )
    try:
        venv.EnvBuilder(with_pip=True).create(env)
    except (OSError, subprocess.CalledProcessError) as exc:
        # Debian's python3 ships venv without ensurepip: `apt-get install python3-venv`.
        sys.exit(
            f"error: cannot create a virtual environment with {sys.executable}: {exc}\n"
            "(on Debian/Ubuntu: apt-get install python3-venv)"
        )


def ensure_env() -> Path:
    """Create VENV and install requirements.lock and the project, once per change of either."""
    if sys.version_info < (3, 11):  # noqa: UP036 (python3 may be older than the project)
        sys.exit(f"error: asyncweights needs Python 3.11 or newer, not {sys.version.split()[0]}")
    stamp = VENV / ".installed"
    wanted = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + LOCK.read_bytes() + sys.version.encode()
    ).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return VENV
    create(VENV)
    print(f"installing requirements.lock and asyncweights into {VENV.name} …", flush=True)
    # Every package, transitive ones included, is pinned in the lock; the project itself is
    # installed editable on top, built by the locked hatchling (no unpinned build backend).
    subprocess.run([*pip(VENV), "install", "-r", str(LOCK)], check=True)
    subprocess.run(
        [*pip(VENV), "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True
    )
    subprocess.run([*pip(VENV), "check"], check=True)
    stamp.write_text(wanted)
    return VENV


def latest_env() -> Path:
    """A separate environment with the newest release of every dependency (no lock)."""
    env = ROOT / ".venv-latest"
    create(env)
    # PEP 735 dependency groups (`--group`) need pip >= 25.1.
    subprocess.run([*pip(env), "install", "-U", "pip>=25.1"], check=True)
    print("installing the newest releases into .venv-latest …", flush=True)
    subprocess.run(
        [
            *pip(env),
            "install",
            "-U",
            "--upgrade-strategy",
            "eager",
            "-e",
            f"{ROOT}[server]",
            "--group",
            "dev",
            "--group",
            "bench",
        ],
        check=True,
    )
    out = subprocess.run(
        [*pip(env), "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    locked: dict[str, set[str]] = {}  # name -> the versions pinned (markers may differ)
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line[0].isspace() and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            locked.setdefault(normalize(name), set()).add(version)
    drift = []
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==")
            pinned = locked.get(normalize(name))
            if pinned and version not in pinned:
                drift.append(f"  {name}: {' or '.join(sorted(pinned))} locked, {version} now")
    print(
        "not the version locked:" if drift else "every version as locked",
        *drift,
        sep="\n",
        flush=True,
    )
    return env


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def run(*cmd: str) -> int:
    return subprocess.run(cmd, cwd=ROOT).returncode


def mypy_command(tools: Path) -> list[str]:
    """mypy --strict; on 3.12+ without the unused-ignore check, which 3.11 alone decides.

    MLX ships its stubs in each wheel, and only those of its 3.12+ wheels declare the buffer
    protocol of ``mx.array``: an ignore that mypy needs with the 3.11 wheel is unused with the
    others. Every other check runs on every interpreter.
    """
    command = [str(tools / "mypy")]
    if sys.version_info[:2] != (3, 11):
        command.append("--no-warn-unused-ignores")
    return command


def test(env: Path, args: list[str]) -> int:
    tools = bin_dir(env)
    print(f"testing with {tools / 'python'} (Python {sys.version.split()[0]})", flush=True)
    steps = [
        [str(tools / "ruff"), "check", "src", "tests", "bench", "examples"],
        [str(tools / "ruff"), "format", "--check", "src", "tests", "bench", "examples"],
        mypy_command(tools),
        [str(tools / "python"), "-m", "pytest", *(args or ["-q"])],
    ]
    for step in steps:
        print(
            "$",
            " ".join(Path(step[0]).name if i == 0 else s for i, s in enumerate(step)),
            flush=True,
        )
        if code := run(*step):
            return code
    return 0


def main(argv: list[str]) -> int:
    task, args = (argv[0], argv[1:]) if argv else ("demo", [])
    if task == "test" and "--latest" in args:
        args.remove("--latest")
        return test(latest_env(), args)
    if task not in {"demo", "test", "bench", "run", "lock"}:
        print(__doc__, file=sys.stderr)
        return 2
    env = ensure_env()
    tools = bin_dir(env)
    if task == "demo":
        return run(str(tools / "asyncweights"), "demo", *args)
    if task == "test":
        return test(env, args)
    if task == "bench":
        return run(str(tools / "python"), "bench/run.py", *args)
    if task == "lock":
        return run(
            str(tools / "uv"),
            "pip",
            "compile",
            "--quiet",
            "--universal",
            "--python-version",
            "3.11",
            "--no-config",
            "--index-url",
            "https://pypi.org/simple",
            "--custom-compile-command",
            "python3 dev.py lock",
            "pyproject.toml",
            *LOCK_INPUTS,
            "-o",
            str(LOCK),
            *args,
        )
    return run(*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
