"""What a run measures about itself: open files, event-loop lag, memory, threads."""

from __future__ import annotations

import os
import resource
import threading
import time

import anyio


def open_fds() -> int:
    """File descriptors open in this process (the listing's own descriptor not counted)."""
    return len(os.listdir("/proc/self/fd")) - 1


def blob_fds(blobs_dir: str) -> int:
    """Descriptors of this process that point into the store's ``blobs/`` folder."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(blobs_dir):
                count += 1
        except OSError:
            pass  # the listing's own descriptor, already closed
    return count


def busy_threads() -> int:
    """Threads of this process other than the caller that are running or in disk wait."""
    me = threading.get_native_id()
    busy = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        busy += state in ("R", "D")
    return busy


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def peak_rss_bytes() -> int:
    """The peak RSS of this process (VmHWM), in bytes.

    Not ru_maxrss: Linux carries ru_maxrss across execve, so a child started by a big
    orchestrator reports the parent's peak. VmHWM belongs to the new address space.
    """
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    """The current RSS of this process (VmRSS), in bytes."""
    return _status_kib("VmRSS") * 1024


def ru_maxrss_bytes() -> int:
    """ru_maxrss in bytes (Linux reports KiB); see `peak_rss_bytes` for its catch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class FdSampler:
    """A daemon thread counting open descriptors every ``interval`` seconds; keeps the max."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval  # stretched to 4x a listing's cost: 5,000 fds take ~1 ms
        self.baseline = open_fds()
        self.max = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fd-sampler", daemon=True)

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            start = time.perf_counter()
            self.sample()
            wait = max(self.interval, 4 * (time.perf_counter() - start))

    def sample(self) -> None:
        try:
            self.max = max(self.max, open_fds())
        except OSError:  # EMFILE under a tight RLIMIT_NOFILE: the load holds them all
            self.max = max(self.max, resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def __enter__(self) -> FdSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def extra(self) -> int:
        """The most descriptors open at once above the count before the load."""
        return self.max - self.baseline


class LoopTicker:
    """A task that sleeps 1 ms in a loop and records how late each wake-up was (seconds)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.lags: list[float] = []

    async def run(self) -> None:
        while True:
            start = time.perf_counter()
            await anyio.sleep(self.period)
            self.lags.append(max(0.0, time.perf_counter() - start - self.period))

    def summary(self) -> dict[str, float | int | None]:
        """p50, p99 and max lag in milliseconds, and the tick count."""
        lags = sorted(self.lags)
        if not lags:
            return {"lag_p50_ms": None, "lag_p99_ms": None, "lag_max_ms": None, "ticks": 0}

        def pct(p: float) -> float:
            return lags[min(len(lags) - 1, round(p * (len(lags) - 1)))] * 1e3

        return {
            "lag_p50_ms": pct(0.50),
            "lag_p99_ms": pct(0.99),
            "lag_max_ms": lags[-1] * 1e3,
            "ticks": len(lags),
        }
