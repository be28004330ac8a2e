"""examples/server.py in a subprocess on 127.0.0.1: started, awaited, always stopped."""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

SERVER = Path(__file__).resolve().parent.parent / "examples" / "server.py"


@contextlib.contextmanager
def serve(args: list[str], timeout: float = 30) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Run ``python ARGS`` (``[str(SERVER), "--store", …, "--port", "0"]`` or a ``-c``
    launcher), read the base URL from its ``listening on`` line and wait until it answers
    /health, each within `timeout` seconds; yield the URL and the process; then terminate
    it (kill after 10 s) and reap it."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"the server printed nothing in {timeout} s"
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        base = line.split()[-1]
        deadline = time.monotonic() + timeout
        while True:  # bound before it listens: wait for the first answer
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
