"""Keeping the event loop first in line for the CPU while MLX reads.

MLX reads lazily loaded arrays in a pool of native threads of its own (four on Linux). On
a 2-core machine they keep both cores busy with page faults, and the event-loop thread
waits its turn: 7-15 ms of loop lag, measured. Those reader threads are found once, as
the native threads that appear while the first `mx.load` arrays are evaluated, and given
a lower priority (a higher nice value). Linux's scheduler then runs the loop thread as soon
as it wakes; when nothing else wants the CPU, the readers run exactly as fast as before.
An unprivileged process cannot raise a priority again, so this is done once and kept: the
threads only ever read tensors.
"""

from __future__ import annotations

import os
import threading

__all__ = ["ReaderPriority"]


def _native_threads() -> set[int]:
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: nothing to do
        return set()


class ReaderPriority:
    """Finds MLX's reader threads around the first lazy evaluation and lowers their priority."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self.niced: list[int] = []

    @property
    def done(self) -> bool:
        return self._done

    def before(self) -> set[int] | None:
        """Call before evaluating lazily loaded arrays; returns the threads seen, or None."""
        return None if self._done else _native_threads()

    def after(self, before: set[int] | None, nice: int) -> None:
        """Call after the evaluation: threads that appeared in between are MLX's readers."""
        if before is None or self._done:
            return
        python = {t.native_id for t in threading.enumerate()}
        new = _native_threads() - before - python
        if not new:
            return  # the pool existed already, or the evaluation read nothing lazily
        with self._lock:
            if self._done:
                return
            self._done = True
            for tid in new:
                try:
                    current = os.getpriority(os.PRIO_PROCESS, tid)
                    os.setpriority(os.PRIO_PROCESS, tid, max(current, nice))
                    self.niced.append(tid)
                except OSError:
                    pass  # the thread ended, or the platform refuses: harmless


#: Process-wide, like the threads it tracks; holds no event-loop state.
READERS = ReaderPriority()
