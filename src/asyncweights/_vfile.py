"""Filling fresh MLX arrays from byte ranges of open files: the library's one read path.

MLX gives a Python file object the memory of the arrays it loads: ``mx.load(obj,
format="safetensors")`` reads the header through ``obj``, then allocates each array (fresh,
untouched memory) and calls ``obj.seek(offset)`` and ``obj.readinto(memoryview(array))`` to
fill it (mlx ``python/src/load.cpp``, ``PyFileReader``, checked here on mlx 0.32). So a
`VirtualFile` shows MLX a synthetic safetensors file whose tensors are *buffers* laid out by
this module, and its ``readinto`` fills each buffer from `Span` s: byte ranges of files the
caller opened (and validated) once, or bytes already in memory. The arrays asked for are
views into those buffers, so many small tensors share one allocation.

Reads are `os.preadv` calls of at most ``chunk`` bytes, made by threads of this module at the
lowest CPU priority the OS offers (``SCHED_IDLE`` on Linux, else nice 19): the kernel here
does not preempt a thread inside a long read, so short reads by idle-priority threads are
what keeps an event loop's thread first in line. Between two chunks a read checks its cancel
flag, so cancelling waits for one chunk at most. Each chunk can be fed to a `Digest` right
after it lands, so a verified load hashes exactly the bytes that end up in the arrays.

The same mechanism serves safetensors blobs, GGUF tensor ranges, row or column spans of a
shard (a list of spans per array) and bytes of a blob still being written (a span whose
`Span.ready` waits for them).

If a future MLX stops handing ``readinto`` its own memory, `mlx_fills_through_readinto`
says so and callers fall back to ``mx.load(path)``.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

__all__ = [
    "ArrayRequest",
    "Digest",
    "FillCancelled",
    "FillError",
    "Span",
    "VirtualFile",
    "fill_arrays",
    "lower_thread_priority",
    "mlx_fills_through_readinto",
]

MiB = 1 << 20
#: Offsets of arrays packed into one buffer: a cache line, enough for every dtype.
ALIGN = 64


class FillError(Exception):
    """A read for a fill failed; `span` says which file range, `__cause__` why."""

    def __init__(self, message: str, span: Span | None = None) -> None:
        super().__init__(message)
        self.span = span


class FillCancelled(Exception):
    """The fill's cancel flag was set: raised between two chunks."""


class Digest:
    """A SHA-256 fed with one file's bytes in file order, as they land in MLX memory.

    Args:
        expected: ``"sha256:<hex>"``, the digest the whole file must have.
        prefix: the file's first bytes, already read and validated (a safetensors header);
            the spans of the file that follow start at ``len(prefix)``.
        size: the file's size in bytes.
        tag: anything the caller wants back with a mismatch (the blob it checks).
    """

    __slots__ = ("_hash", "_lock", "_next", "_unordered", "expected", "prefix", "size", "tag")

    def __init__(
        self, expected: str, prefix: bytes | bytearray, size: int, tag: Any = None
    ) -> None:
        self.expected = expected
        self.prefix = prefix
        self.size = size
        self.tag = tag
        self._lock = threading.Lock()
        self.restart()

    def restart(self) -> None:
        """Forget what was fed: the bytes will be fed again, in order."""
        self._hash = hashlib.sha256(self.prefix)
        self._next = len(self.prefix)
        self._unordered = False

    def feed(self, offset: int, data: memoryview) -> None:
        """Hash `data`, the file's bytes at `offset`, if it continues what came before."""
        with self._lock:
            if self._unordered or offset != self._next:
                self._unordered = True  # hashed again from the arrays once they are loaded
                return
            self._hash.update(data)
            self._next += len(data)

    @property
    def complete(self) -> bool:
        """Every byte arrived, in order."""
        return not self._unordered and self._next == self.size

    def actual(self) -> str:
        """The digest of the bytes fed so far."""
        return "sha256:" + self._hash.hexdigest()

    @property
    def matches(self) -> bool:
        """Every byte arrived and they hash to `expected`."""
        return self.complete and self.actual() == self.expected


@dataclass(frozen=True, slots=True)
class Span:
    """``length`` bytes at ``offset`` of the open file ``fd``, or of ``data`` when given.

    Args:
        fd: an open descriptor (the caller owns it and keeps it open during the fill).
        offset: where the bytes start in the file (or in `data`).
        length: how many bytes.
        data: bytes already in memory (read while planning); then `fd` is ignored.
        digest: fed with these bytes once they are in MLX memory (`offset` is the position
            in that digest's file).
        ready: called with the end offset before each read: blocks until the file holds the
            bytes up to it (a download in progress), or raises.
        tag: anything the caller wants back when this span fails (the blob it reads).
    """

    fd: int
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = None
    digest: Digest | None = None
    ready: Callable[[int], None] | None = None
    tag: Any = None


@dataclass(frozen=True, slots=True)
class ArrayRequest:
    """One array to make: `spans`, concatenated, are its bytes in row-major order."""

    key: str
    dtype: mx.Dtype
    shape: tuple[int, ...]
    spans: Sequence[Span]
    #: the array's size in bytes (``dtype.size`` times the shape's product), computed once:
    #: a group's layout, fill and digests each ask for it, per array
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        object.__setattr__(self, "nbytes", n)


@dataclass(slots=True)
class _Part:
    """A span placed in the virtual file's data section, at `start`."""

    start: int
    span: Span


@dataclass(slots=True)
class _Layout:
    header: bytes
    data_size: int
    parts: list[_Part]
    starts: list[int]
    #: per buffer entry: (data-section offset, size)
    buffers: list[tuple[int, int]]
    #: per request: (buffer index, offset in the buffer)
    places: dict[str, tuple[int, int]]


def _layout(requests: Sequence[ArrayRequest], pack_upto: int) -> _Layout:
    """Place requests in buffers: those up to `pack_upto` bytes share one, aligned."""
    buffers: list[tuple[int, int]] = []
    places: dict[str, tuple[int, int]] = {}
    parts: list[_Part] = []
    pos = 0

    def place(members: list[ArrayRequest], aligned: bool) -> None:
        nonlocal pos
        index = len(buffers)
        start = pos
        offset = 0
        add = parts.append
        for request in members:
            if aligned:
                offset = -(-offset // ALIGN) * ALIGN
            places[request.key] = (index, offset)
            at = start + offset
            for span in request.spans:
                add(_Part(at, span))
                at += span.length
            offset += request.nbytes
        if aligned:
            # A whole number of the widest element (8 bytes), so the shared buffer can be
            # viewed as any member's dtype at once (`fill_arrays`); the tail is never read.
            offset = -(-offset // 8) * 8
        buffers.append((start, offset))
        pos = start + offset

    packed: list[ArrayRequest] = []
    for request in requests:
        spans, nbytes = request.spans, request.nbytes
        total = spans[0].length if len(spans) == 1 else sum(s.length for s in spans)
        if total != nbytes:
            raise ValueError(f"array {request.key!r} needs {nbytes} bytes, its spans hold {total}")
        if nbytes == 0:
            continue
        if nbytes <= pack_upto:
            packed.append(request)
        else:
            place([request], aligned=False)
    if packed:
        place(packed, aligned=True)
    header = _synthetic_header(buffers)
    return _Layout(header, pos, parts, [p.start for p in parts], buffers, places)


def _synthetic_header(buffers: list[tuple[int, int]]) -> bytes:
    # One U8 vector per buffer: MLX allocates exactly that, views give the arrays.
    doc = {
        str(i): {"dtype": "U8", "shape": [size], "data_offsets": [start, start + size]}
        for i, (start, size) in enumerate(buffers)
    }
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class VirtualFile:
    """A read-only safetensors file object for ``mx.load``, assembled from spans.

    ``readinto`` of the data section hands the work to `reader` (a thread of this module)
    and waits; the first error it meets is kept in `error` (MLX turns it into a
    RuntimeError carrying only its text).
    """

    closed = False

    def __init__(
        self,
        layout: _Layout,
        *,
        chunk: int,
        cancel: threading.Event | None,
        reader: ThreadPoolExecutor | None,
    ) -> None:
        self._layout = layout
        self._size = len(layout.header) + layout.data_size
        self._pos = 0
        self._chunk = chunk
        self._cancel = cancel
        self._reader = reader
        self.error: BaseException | None = None
        self.calls = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence == os.SEEK_END:
            offset += self._size
        if offset < 0:
            raise ValueError("negative seek position")
        self._pos = offset
        return offset

    def read(self, size: int = -1) -> bytes:
        end = self._size if size < 0 else min(self._size, self._pos + size)
        buf = bytearray(max(0, end - self._pos))
        n = self.readinto(memoryview(buf))
        return bytes(buf[:n])

    def readinto(self, buffer: Any) -> int:
        if self.error is not None:
            # MLX may still run reads it queued before the first one failed: end them now.
            raise FillError("an earlier read of this file failed")
        view = memoryview(buffer).cast("B")
        start = self._pos
        n = max(0, min(len(view), self._size - start))
        try:
            head = self._layout.header
            done = 0
            if start < len(head):
                done = min(n, len(head) - start)
                view[:done] = head[start : start + done]
            if done < n:
                self.calls += 1
                rest = view[done:n]
                at = start + done - len(head)
                if self._reader is None:
                    self._fill(rest, at)
                else:
                    self._reader.submit(self._fill, rest, at).result()
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise
        finally:
            view.release()
        self._pos = start + n
        return n

    def _fill(self, view: memoryview, at: int) -> None:
        """Fill `view`, the data section from `at` on, from the spans it covers."""
        parts = self._layout.parts
        i = max(0, bisect.bisect_right(self._layout.starts, at) - 1)
        end = at + len(view)
        chunk = self._chunk
        cancel = self._cancel
        while i < len(parts) and parts[i].start < end:
            part = parts[i]
            i += 1
            span = part.span
            lo = max(at, part.start)
            hi = min(end, part.start + span.length)
            if lo >= hi:
                continue
            skip = lo - part.start  # bytes of the span before this call's range
            out = view[lo - at : hi - at]
            if span.data is not None:
                out[:] = memoryview(span.data)[span.offset + skip : span.offset + skip + len(out)]
                if span.digest is not None:
                    span.digest.feed(span.offset + skip, out)
                continue
            done = 0
            while done < len(out):
                if cancel is not None and cancel.is_set():
                    raise FillCancelled("load cancelled")
                piece = out[done : done + chunk]
                offset = span.offset + skip + done
                if span.ready is not None:
                    span.ready(offset + len(piece))
                try:
                    got = os.preadv(span.fd, [piece], offset)
                except OSError as exc:
                    raise FillError(f"cannot read: {exc.strerror}", span) from exc
                if got == 0:
                    raise FillError("file ended early: it shrank while loading", span)
                if span.digest is not None:
                    span.digest.feed(offset, piece[:got])
                done += got


def fill_arrays(
    requests: Sequence[ArrayRequest],
    *,
    pack_upto: int = 1 << 62,
    chunk: int = MiB,
    cancel: threading.Event | None = None,
    reader: ThreadPoolExecutor | None = None,
) -> dict[str, mx.array]:
    """Make evaluated MLX arrays from byte ranges of open files (blocking; a worker thread).

    Args:
        requests: the arrays, each with its dtype, shape and spans (keys are unique).
        pack_upto: arrays of at most this many bytes share one MLX buffer (views into it,
            at 64-byte offsets): one allocation and one read call instead of many. Keeping
            one of them alive keeps the whole buffer, at most the sum of their sizes.
        chunk: bytes per ``preadv``: a cancel waits for one chunk at most.
        cancel: checked before every chunk.
        reader: the threads that read; None reads in MLX's own I/O threads.

    Returns:
        The arrays by key, evaluated; each holds exactly its spans' bytes.

    Raises:
        FillCancelled: `cancel` was set.
        FillError: a read failed or a file was shorter than its span (cause chained).
        RuntimeError: MLX refused the file or could not allocate (its message kept).
    """
    if len({r.key for r in requests}) != len(requests):
        raise ValueError("array keys must be unique")
    layout = _layout(requests, pack_upto)
    arrays: dict[str, mx.array] = {}
    buffers: list[mx.array] = []
    if layout.buffers:
        vfile = VirtualFile(layout, chunk=max(1, chunk), cancel=cancel, reader=reader)
        ours = sys.getrefcount(vfile)
        try:
            loaded = mx.load(vfile, format="safetensors")  # type: ignore[arg-type]
        except RuntimeError:
            error, vfile.error = vfile.error, None
            # Its frames (the reader thread's included, which may still be running when
            # the error arrives) hold `vfile`: keep the error, not the frames.
            cause: BaseException | None = error
            while cause is not None:
                cause.__traceback__ = None
                cause = cause.__cause__ or cause.__context__
            _settle(vfile, ours)
            del vfile  # nor may the traceback of what is raised below
            if isinstance(error, (FillError, FillCancelled)):
                raise error from error.__cause__
            if error is not None:
                raise FillError(f"reading failed: {error!r}") from error
            raise
        _settle(vfile, ours)
        calls = vfile.calls
        del vfile
        assert isinstance(loaded, dict)
        if calls == 0:
            raise FillError("MLX did not read through the file object")
        buffers = [loaded[str(i)] for i in range(len(layout.buffers))]
        del loaded
    # Each array is one strided view of its buffer seen as its dtype (one view per buffer
    # and dtype, shared): one MLX operation an array instead of a slice, a view and a
    # reshape (1.6 against 3.5 us an array, evaluation included, measured).
    typed: dict[tuple[int, mx.Dtype], mx.array] = {}
    places = layout.places
    for request in requests:
        dtype = request.dtype
        if request.nbytes == 0:
            arrays[request.key] = mx.zeros(request.shape, dtype)
            continue
        index, offset = places[request.key]
        whole = typed.get((index, dtype))
        if whole is None:
            whole = buffers[index]
            if dtype != mx.uint8:
                whole = whole.view(dtype)
            typed[index, dtype] = whole
        # Offsets are multiples of the element size: 0, or 64-byte aligned when packed.
        arrays[request.key] = mx.as_strided(whole, request.shape, None, offset // dtype.size)
    mx.eval(list(arrays.values()))
    _finish_digests(requests, layout, buffers)
    return arrays


def _settle(vfile: VirtualFile, ours: int) -> None:
    """Keep `vfile` until MLX has dropped its references to it.

    MLX drops them in its own threads, which take the GIL to do so, a millisecond or so
    after ``mx.load`` returned. One doing so while the interpreter shuts down would abort
    the process, so an exit handler waits for the stragglers (at most 2 s) first; holding
    them here also makes the last reference, and the freeing, ours.
    """
    with _HELD_LOCK:
        _prune()
        if sys.getrefcount(vfile) > ours + 1:  # + this frame's argument
            _MLX_HELD.append(vfile)


def _prune() -> int:
    """Drop the held files MLX has let go of; return how many MLX still holds."""
    # A file nobody else holds has 3 references while tested: the list, `f`, the argument.
    _MLX_HELD[:] = [f for f in _MLX_HELD if sys.getrefcount(f) > 3]
    return len(_MLX_HELD)


def _wait_for_mlx_threads() -> int:
    """Wait (at most 2 s) until MLX's threads hold no file object; return how many do."""
    deadline = time.monotonic() + 2.0
    while True:
        with _HELD_LOCK:
            held = _prune()
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.001)


_MLX_HELD: list[VirtualFile] = []
_HELD_LOCK = threading.Lock()
atexit.register(_wait_for_mlx_threads)


def _finish_digests(
    requests: Sequence[ArrayRequest], layout: _Layout, buffers: list[mx.array]
) -> None:
    """Hash again, from the arrays, every digest whose bytes were read out of order."""
    late: dict[int, tuple[Digest, list[tuple[int, memoryview]]]] = {}
    for request in requests:
        if request.nbytes == 0:
            continue
        index, offset = layout.places[request.key]
        for span in request.spans:
            digest = span.digest
            if digest is not None and not digest.complete:
                views = late.setdefault(id(digest), (digest, []))[1]
                mem = memoryview(buffers[index]).cast("B")  # type: ignore[arg-type, unused-ignore]
                views.append((span.offset, mem[offset : offset + span.length]))
            offset += span.length
    for digest, views in late.values():
        digest.restart()
        for at, view in sorted(views, key=lambda item: item[0]):
            digest.feed(at, view)


def lower_thread_priority() -> str:
    """Put the calling thread at the lowest CPU priority the OS allows; say which.

    ``SCHED_IDLE`` (Linux) runs the thread only when no normal thread wants the CPU, so an
    event loop thread waking up preempts it at once (measured: p99 loop lag 4.0 → 1.6 ms
    against nice 10). Elsewhere, or if refused, nice 19. An unprivileged thread cannot
    raise its priority again: only threads of this library's own pools call this.
    """
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, policy, os.sched_param(0))
            return "idle"
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 19)
        return "nice"
    return "normal"


_PROBE: list[bool] = []
_PROBE_LOCK = threading.Lock()


def mlx_fills_through_readinto() -> bool:
    """Whether this MLX fills a file object's arrays through ``readinto``, bit-exact.

    Checked once per process on a two-array file; False sends loads back to
    ``mx.load(path)``.
    """
    with _PROBE_LOCK:
        if not _PROBE:
            _PROBE.append(_probe())
        return _PROBE[0]


def _probe() -> bool:
    data = bytes(range(1, 201))
    requests = [
        ArrayRequest("a", mx.uint16, (2, 3), [Span(-1, 0, 12, data=data)]),
        ArrayRequest("b", mx.uint8, (100,), [Span(-1, 100, 100, data=data)]),
    ]
    try:
        arrays = fill_arrays(requests, pack_upto=16)
    except (RuntimeError, ValueError, TypeError, FillError):
        return False
    # The stubs of MLX's 3.11 wheels lack __buffer__ (3.12+ have it): the ignore may be unused.
    views = [memoryview(arrays[k]) for k in ("a", "b")]  # type: ignore[arg-type, unused-ignore]
    got = [bytes(v) for v in views]
    return got == [data[:12], data[100:200]]


def reader_pool(name: str, threads: int, priority: str = "responsive") -> ThreadPoolExecutor:
    """A long-lived pool of threads, one per `name` and `priority` for the process.

    ``"responsive"`` threads run at the lowest priority (`lower_thread_priority`);
    ``"throughput"`` threads keep the creating thread's.
    """
    with _POOLS_LOCK:
        pool = _POOLS.get((name, priority))
        if pool is None:
            pool = _POOLS[name, priority] = ThreadPoolExecutor(
                threads,
                thread_name_prefix=f"asyncweights-{name}",
                initializer=_lower if priority == "responsive" else None,
            )
            start_every_thread(pool, threads)
        return pool


def start_every_thread(pool: ThreadPoolExecutor, threads: int) -> None:
    """Start all of `pool`'s threads now, so that the set of threads stays fixed for good.

    ThreadPoolExecutor starts a thread on a submit that finds none idle; whether one is idle at
    that moment is a race (seen on 3.12: a thread more after some loads). Tasks that wait on one
    barrier are each given a thread of their own, so all `threads` exist afterwards.
    """
    barrier = threading.Barrier(threads, timeout=10.0)
    futures = [pool.submit(_meet, barrier) for _ in range(threads)]
    for future in futures:
        future.result()


def _meet(barrier: threading.Barrier) -> None:
    # A thread that could not start in time breaks the barrier: the pool still works, lazily.
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()


def _lower() -> None:
    lower_thread_priority()


_POOLS: dict[tuple[str, str], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
