"""Progress events and their delivery to plain or async callbacks."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.to_thread

from ._errors import LoadError

__all__ = ["Progress", "ProgressCallback"]

Phase = Literal["planning", "pulling", "loading", "verifying", "writing", "done"]


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a load has come.

    Attributes:
        phase: ``"planning"`` (headers), ``"loading"`` or ``"done"`` (the final event);
            an import reports ``"writing"`` instead of ``"loading"``; a pull reports
            ``"pulling"`` (the manifest, each blob, then writing the manifest).
        completed_bytes, total_bytes: tensor bytes evaluated so far, and in all (for an
            import: source tensor bytes hashed and written to the store).
        completed_tensors, total_tensors: tensors evaluated so far, and in all.
            While pulling: blob bytes and blobs in the store so far, and in all.
        elapsed: seconds since the load started.
        tensor: the last tensor finished, if any.
        model: the model as the caller named it.
        digest: while pulling, the blob this event is about (None for the manifest).
        digest_completed, digest_total: bytes of that blob in the store, and its size.
    """

    phase: Phase
    completed_bytes: int
    total_bytes: int
    completed_tensors: int
    total_tensors: int
    elapsed: float
    tensor: str | None = None
    model: str = ""
    digest: str | None = None
    digest_completed: int = 0
    digest_total: int = 0

    @property
    def fraction(self) -> float:
        """Completed share of the bytes, from 0.0 to 1.0."""
        if self.total_bytes == 0:
            return 1.0 if self.phase == "done" else 0.0
        return self.completed_bytes / self.total_bytes

    def to_ollama(self) -> dict[str, Any]:
        """The event in Ollama's pull-progress shape: status, digest, total, completed.

        Pull events read as Ollama's own (``server/download.go``): ``pulling manifest``,
        ``pulling <12 hex>`` per blob with its digest and bytes, ``writing manifest``.
        """
        if self.phase == "pulling":
            if self.digest is None:  # before the blobs, or once every blob is in
                done = 0 < self.total_tensors == self.completed_tensors
                return {"status": "writing manifest" if done else "pulling manifest"}
            return {
                "status": f"pulling {self.digest[7:19]}",
                "digest": self.digest,
                "total": self.digest_total,
                "completed": self.digest_completed,
            }
        status = {"planning": "pulling manifest", "done": "success"}.get(
            self.phase,
            f"{'writing' if self.phase == 'writing' else 'loading'} {self.model}".strip(),
        )
        event: dict[str, Any] = {"status": status}
        if self.phase != "planning":
            event.update(digest=self.model, total=self.total_bytes, completed=self.completed_bytes)
        return event

    def eta(self) -> float:
        """Estimated seconds left, from the rate so far (inf before any byte)."""
        if self.completed_bytes == 0 or self.elapsed <= 0:
            return math.inf
        rate = self.completed_bytes / self.elapsed
        return (self.total_bytes - self.completed_bytes) / rate


ProgressCallback = Callable[[Progress], Awaitable[None] | None]


class ProgressReporter:
    """Rate-limits events and delivers them from a task of their own.

    The load never waits for a slow callback: events that arrive while one is being
    delivered are merged into the newest. Plain callbacks run in a worker thread, so even
    one that blocks does not stall the event loop. The first and the final event are
    always delivered; a callback that raises fails the load with `LoadError`.
    """

    def __init__(self, callback: ProgressCallback | None, interval: float, model: str) -> None:
        self._callback = callback
        self._interval = interval
        self._model = model
        self._pending: Progress | None = None
        self._last_sent = -math.inf
        self._wake = anyio.Event()
        self._closed = False
        self.error: BaseException | None = None
        self._is_async = callback is not None and (
            inspect.iscoroutinefunction(callback)
            or inspect.iscoroutinefunction(getattr(callback, "__call__", None))  # noqa: B004
        )

    def emit(self, event: Progress, *, force: bool = False) -> None:
        """Offer an event; it is sent if due (or forced), else merged into the next one."""
        if self._callback is None:
            return
        self._pending = event
        now = time.monotonic()
        if force or now - self._last_sent >= self._interval:
            self._last_sent = now
            self._wake.set()

    async def run(self) -> None:
        """Deliver events until `close` is called and the last one is out."""
        if self._callback is None:
            return
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            event, self._pending = self._pending, None
            if event is not None:
                await self._deliver(event)
            if self._closed and self._pending is None:
                return

    def close(self, final: Progress | None) -> None:
        """Queue the final event (if any) and let `run` end after delivering it."""
        if final is not None and self._callback is not None:
            self._pending = final
        self._closed = True
        self._wake.set()

    async def _deliver(self, event: Progress) -> None:
        assert self._callback is not None
        try:
            if self._is_async:
                result = self._callback(event)
                if inspect.isawaitable(result):
                    await result
            else:
                await anyio.to_thread.run_sync(self._callback, event, abandon_on_cancel=True)
        except Exception as exc:
            raise LoadError(
                f"progress callback raised {type(exc).__name__}: {exc}", model=self._model
            ) from exc
