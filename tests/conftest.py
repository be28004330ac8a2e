"""Shared fixtures and checks: every async test runs on asyncio and on trio."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from pathlib import Path
from types import FrameType

import pytest

from asyncweights.testing import StoreBuilder


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    """The root of an empty store (blobs/ and manifests/ are made by the builder)."""
    return tmp_path / "store"


@pytest.fixture
def builder(store_root: Path) -> StoreBuilder:
    return StoreBuilder(store_root)


def open_fds() -> dict[str, str]:
    """The file descriptors this process holds, with what each points to."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the descriptor listdir itself used
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def blob_fds(store: Path) -> list[str]:
    """Open descriptors that point into the store."""
    root = str(store.resolve())
    return [target for target in open_fds().values() if target.startswith(root)]


def busy_load_threads() -> list[int]:
    """Threads whose stack is inside asyncweights' loading code right now."""
    marker = os.sep + "asyncweights" + os.sep
    busy = []
    for ident, frame in sys._current_frames().items():
        f: FrameType | None = frame
        while f is not None:
            if marker in f.f_code.co_filename and "testing" not in f.f_code.co_filename:
                busy.append(ident)
                break
            f = f.f_back
    return busy


def wait_quiet(store: Path, timeout: float = 5.0) -> None:
    """Assert that, within `timeout`, no blob file is open and no thread is still loading."""
    deadline = time.monotonic() + timeout
    gc.collect()  # an error's traceback may hold arrays in a cycle until collected
    while True:
        files, threads = blob_fds(store), busy_load_threads()
        if not files and not threads:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: open blob files {files}, busy threads {threads}")
        time.sleep(0.01)
