"""Running the command line in a subprocess: piped, or on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any


def cli(
    *args: str,
    tmp: Path,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``python -m asyncweights ARGS`` with stdout and stderr piped, the user cache under
    `tmp`/cache and no ``OLLAMA_MODELS`` (unless `env` gives one), bounded by `timeout`."""
    environ = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
    environ.pop("OLLAMA_MODELS", None)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "asyncweights", *args],
        capture_output=True,
        text=True,
        env=environ,
        input=input,
        timeout=timeout,
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a successful, piped command printed (piped: no progress bar on stderr)."""
    assert result.returncode == 0, result.stderr
    assert "%|" not in result.stderr
    return json.loads(result.stdout)


def run_on_pty(args: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; return status and output."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncweights", *args],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env=env,
    )
    os.close(child)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(main)
    return proc.wait(timeout=30), output
