"""The loader service: `WeightCache` shares, reference-counts and evicts loaded weights.

    lease(model, component, dtype, verify)
      └► key = (sha256 of the manifest bytes, component, dtype, verify)
           ├► ready entry ─────► hit: one more lease on the shared `Weights`
           ├► load in flight ──► join it as a waiter, watching its progress
           └► neither ─────────► new entry, loaded by a task in the cache's task group:
                                 plan ─► make room (evict LRU unleased) ─► load that plan

An entry lives in one of two maps: `_loading` (joinable loads) or `_ready` (insertion order
is the LRU order). A load whose last waiter leaves is cancelled and leaves `_loading` at
once, so a later lease starts afresh instead of joining a load that is going away.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Literal

import anyio
import anyio.to_thread
import mlx.core as mx
from anyio.abc import TaskGroup

from ._errors import (
    AsyncWeightsError,
    BudgetError,
    InvalidNameError,
    LoadError,
)
from ._header import FLOAT_DTYPES
from ._limits import Limits
from ._load import ModelRef, StoreRef, load_plan, load_pulled, make_plan
from ._manifest import Manifest
from ._names import ModelName
from ._plan import Plan
from ._progress import Progress, ProgressCallback
from ._pull import PullSession, component_layers, open_session
from ._pull import pull as pull_model
from ._shard import Shard
from ._store import Model, ModelStore
from ._weights import Weights

__all__ = ["CacheEntry", "CacheKey", "CacheStats", "WeightCache"]

#: How long a waiter that abandons a load waits, shielded, for its files and threads to go.
_ABANDON_WAIT = 5.0

State = Literal["loading", "ready", "failed"]


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What makes two loads the same load.

    Attributes:
        digest: ``sha256:<hex>`` of the manifest's bytes, so a re-pulled model that keeps
            its name is a new key.
        component: the component, or None for every tensor.
        dtype: the requested dtype's name, or None.
        verify: whether blob digests were checked while loading.
        shard: `Shard.key` of a sharded load, or None for the whole model.
    """

    digest: str
    component: str | None
    dtype: str | None
    verify: bool
    shard: str | None = None


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A snapshot of one entry of the cache.

    Attributes:
        model: the model as first named by a lease.
        name: the normalized model name (``name:tag``), or None when it came from a path.
        key: its `CacheKey`.
        state: ``"loading"`` or ``"ready"``.
        nbytes: bytes held when ready, bytes reserved while loading.
        leases: leases held now. waiters: tasks waiting for the load now.
        progress: the latest progress event of the load (the final one once ready).
    """

    model: str
    name: str | None
    key: CacheKey
    state: State
    nbytes: int
    leases: int
    waiters: int
    progress: Progress | None


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since the cache opened, and what it holds now.

    Attributes:
        loads: loads started. hits: leases served by a ready entry. joins: leases and
            watchers that joined a load already in flight. failures: loads that raised.
        cancellations: loads cancelled because their last waiter left. evictions: entries
            dropped to make room or by `WeightCache.evict`.
        waiters, leases: tasks waiting for a load, and leases held, now.
        entries, loading: ready entries and loads in flight, now.
        bytes_held: bytes of the ready entries. bytes_reserved: estimates of loads in flight.
        max_bytes: the budget, or None.
    """

    loads: int
    hits: int
    joins: int
    failures: int
    cancellations: int
    evictions: int
    waiters: int
    leases: int
    entries: int
    loading: int
    bytes_held: int
    bytes_reserved: int
    max_bytes: int | None


class _Watch:
    """One waiter's view of a load's progress: the newest event not yet seen, then the end.

    A slow waiter never holds the load back: events it has not taken yet are replaced by
    newer ones, so it sees them in order and always sees the last.
    """

    def __init__(self, latest: Progress | None) -> None:
        self._pending = latest
        self._closed = False
        self._wake = anyio.Event()

    def push(self, event: Progress) -> None:
        self._pending = event
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def next(self) -> Progress | None:
        """The next event, or None once the load has ended and every event was taken."""
        while self._pending is None:
            if self._closed:
                return None
            await self._wake.wait()
            self._wake = anyio.Event()
        event, self._pending = self._pending, None
        return event


class _Entry:
    """One key's load and, once loaded, its shared weights."""

    def __init__(self, key: CacheKey, label: str, name: str | None) -> None:
        self.key = key
        self.label = label
        self.name = name
        self.state: State = "loading"
        self.scope = anyio.CancelScope()
        self.finished = anyio.Event()  # the load task ended: its files and threads are gone
        self.weights: Weights | None = None
        self.error: AsyncWeightsError | None = None
        self.reserved = 0
        self.nbytes = 0
        self.waiters = 0
        self.leases = 0
        self.latest: Progress | None = None
        self.watches: set[_Watch] = set()
        self.session: PullSession | None = None  # the pull a load started by a lease runs

    async def publish(self, event: Progress) -> None:
        # An async callback: `load_weights` calls it on the event loop, no thread hop.
        self.latest = event
        for watch in self.watches:
            watch.push(event)

    def watch(self) -> _Watch:
        watch = _Watch(self.latest)
        if self.state == "loading":
            self.watches.add(watch)
        else:
            watch.close()
        return watch

    def take(self) -> Weights:
        """One more lease on the weights, or the load's error (a copy: one per waiter)."""
        if self.weights is None:
            error = self.error or LoadError("load ended without weights", model=self.label)
            raise _clone(error) from error
        self.leases += 1
        return self.weights

    def snapshot(self) -> CacheEntry:
        return CacheEntry(
            model=self.label,
            name=self.name,
            key=self.key,
            state=self.state,
            nbytes=self.nbytes if self.state == "ready" else self.reserved,
            leases=self.leases,
            waiters=self.waiters,
            progress=self.latest,
        )


class WeightCache:
    """Loads weights once, shares them between concurrent users, and evicts what is unused.

    Use as ``async with WeightCache(max_bytes=...) as cache:``; loads run in a task group
    the cache owns, so they outlive any one request but not the cache.

    Args:
        max_bytes: the most bytes the ready entries and the loads in flight may hold;
            unleased entries are evicted, least recently used first, to stay within it.
            None means no budget and no automatic eviction.
        store: the models root or a `ModelStore` model names are resolved in.
        limits: the default `Limits` of every load.
        budget_wait: seconds a load that fits in `max_bytes`, but not beside what other loads
            in flight reserve, waits for those to settle (a finished load is evictable once
            unleased) before it fails with `BudgetError`; a load kept out by leases alone
            fails at once (the lease may be the caller's own). The wait ends early when the
            load is cancelled (its last waiter leaving). 0 never waits.
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        *,
        store: StoreRef = None,
        limits: Limits | None = None,
        budget_wait: float = 30.0,
    ) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        if budget_wait < 0:
            raise ValueError("budget_wait must not be negative")
        self.max_bytes = max_bytes
        self.budget_wait = budget_wait
        self._changed: anyio.Event | None = None  # set when bytes may have been freed
        self.store = store if isinstance(store, ModelStore) else ModelStore(store)
        self.limits = limits or Limits()
        self._loading: dict[CacheKey, _Entry] = {}
        self._ready: dict[CacheKey, _Entry] = {}
        self._running: set[_Entry] = set()  # every load task not yet ended, abandoned included
        self._counts = dict.fromkeys(
            ("loads", "hits", "joins", "failures", "cancellations", "evictions"), 0
        )
        self._tg: TaskGroup | None = None
        self._closed = False
        # (MLX's buffer cache limit before, the one set) while the cache raised it
        self._cache_limit: tuple[int, int] | None = None

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<WeightCache {s.entries} ready, {s.loading} loading, {s.bytes_held} bytes held,"
            f" max_bytes={self.max_bytes}>"
        )

    async def __aenter__(self) -> WeightCache:
        if self._tg is not None or self._closed:
            raise RuntimeError("a WeightCache can be entered only once")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        if self.max_bytes:
            # Keep freed buffers in MLX's cache up to the budget: a model evicted and loaded
            # again reuses its buffers instead of faulting in fresh pages (1.8-2.8x faster
            # reloads measured). Process-wide, so only raised, and restored on close.
            previous = mx.set_cache_limit(max(self.max_bytes, mx.get_cache_memory()))
            if previous >= self.max_bytes:
                mx.set_cache_limit(previous)
            else:
                self._cache_limit = (previous, self.max_bytes)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        try:
            await self.close()
        finally:
            suppress = await self._tg.__aexit__(exc_type, exc, tb)
        return suppress

    @property
    def stats(self) -> CacheStats:
        """Counters and current holdings (a snapshot)."""
        entries = [*self._ready.values(), *self._loading.values()]
        return CacheStats(
            **self._counts,
            waiters=sum(e.waiters for e in entries),
            leases=sum(e.leases for e in entries),
            entries=len(self._ready),
            loading=len(self._loading),
            bytes_held=self._held(),
            bytes_reserved=sum(e.reserved for e in self._running),
            max_bytes=self.max_bytes,
        )

    def entries(self) -> list[CacheEntry]:
        """Snapshots of the ready entries, least recently used first, then the loads in flight."""
        return [e.snapshot() for e in (*self._ready.values(), *self._loading.values())]

    @asynccontextmanager
    async def lease(
        self,
        model: ModelRef,
        component: str | None = None,
        *,
        dtype: mx.Dtype | None = None,
        verify: bool = False,
        limits: Limits | None = None,
        on_progress: ProgressCallback | None = None,
        pull: bool = False,
        registry: str | None = None,
        shard: Shard | None = None,
    ) -> AsyncIterator[Weights]:
        """Lease the weights of `component` of `model`, loading them unless already loaded.

        Use as ``async with cache.lease("z-image", "vae") as weights:``. Leases of the
        same key share one load and one `Weights`; the weights stay cached while leased
        and must not be used after the block. Leaving while the load is in flight stops
        waiting; the load goes on for the other waiters and is cancelled with the last.

        Args:
            model, component, dtype, verify: as for `load_weights`.
            limits: this load's `Limits` (the cache's by default); not part of the key.
            on_progress: a plain or async callable that receives this waiter's `Progress`
                events, the final one included (alone, when the weights were cached).
            pull, registry: fetch the manifest from the model's registry first; the key is
                its digest, so a changed tag loads afresh. A new load pulls while it loads,
                as ``load_weights(..., pull=True)`` does: only missing blobs are downloaded,
                and each blob's tensors are loaded as it lands; its budget reservation is
                the component's blob bytes (times ``dtype.size / 2`` with a wider `dtype`),
                taken before any blob is downloaded. A hit or a joined load downloads
                nothing more. With `shard`, the model is pulled whole first, then loaded.
                Concurrent pulls of one blob share its download (a file lock).
            shard: this rank's part only (`Shard`, as for `load_weights`); part of the key,
                and the budget counts only the bytes this rank holds.

        Raises:
            BudgetError: the load does not fit in ``max_bytes`` even after evicting every
                unleased entry. AsyncWeightsError: the load failed (every waiter gets a copy).
        """
        session: PullSession | None = None
        if pull and shard is not None:  # a sharded load plans from every header: pull first
            self._check_open()
            await pull_model(
                model,  # type: ignore[arg-type]  # anything but a name is refused there
                store=self.store,
                registry=registry,
                verify=verify,
                on_progress=on_progress,
                limits=limits or self.limits,
            )
        elif pull:
            self._check_open()
            session = await self._pull_manifest(model, registry, verify, limits)
        try:
            entry = await self._attach(model, component, dtype, verify, limits, shard, session)
        except BaseException:
            if session is not None:
                await session.client.aclose()
            raise
        if session is not None and entry.session is not session:
            await session.client.aclose()  # a hit or a joined load: this pull is not needed
        hit = entry.state != "loading"
        weights = entry.take() if hit else await self._wait(entry, on_progress)
        try:
            if hit and on_progress is not None and entry.latest is not None:
                await _deliver(on_progress, entry.latest, entry.label)
            yield weights
        finally:
            entry.leases -= 1
            self._touch(entry)
            self._fit()

    @asynccontextmanager
    async def progress(
        self,
        model: ModelRef,
        component: str | None = None,
        *,
        dtype: mx.Dtype | None = None,
        verify: bool = False,
        limits: Limits | None = None,
    ) -> AsyncIterator[AsyncIterator[Progress]]:
        """Load a key (or join its load in flight) and stream the load's progress.

        Use as ``async with cache.progress("z-image", "vae") as events: async for e in
        events: ...``. The stream ends after the final event; it raises the load's error
        if the load fails. A key already cached streams its final event alone. The block
        counts as a waiter of the load, like a lease, without holding the weights after.
        """
        entry = await self._attach(model, component, dtype, verify, limits)
        if entry.state != "loading":
            yield _Events(None, entry.latest)
            return
        entry.waiters += 1
        events = _Events(entry)
        try:
            yield events
        finally:
            events.close()
            await self._leave(entry)

    def evict(self, model: str | None = None) -> list[CacheEntry]:
        """Drop unleased ready entries now: those of `model` (a name or a manifest digest), or all.

        Leased entries and loads in flight are kept. Returns the entries dropped.

        Raises:
            InvalidNameError: `model` is neither a model name nor a digest.
        """
        wanted: str | None = None
        if model is not None and not model.startswith("sha256:"):
            wanted = str(ModelName.parse(model))
        dropped = []
        for entry in list(self._ready.values()):
            if entry.leases or entry.waiters:
                continue
            if model is None or entry.name == wanted or entry.key.digest == model:
                dropped.append(entry.snapshot())
                self._drop(entry)
        return dropped

    async def close(self) -> None:
        """Cancel the loads in flight, wait (bounded) until they end, and release every entry."""
        if self._closed:
            return
        self._closed = True
        if self._cache_limit is not None:
            previous, ours = self._cache_limit
            self._cache_limit = None
            limit = mx.set_cache_limit(previous)
            if limit != ours:  # someone changed it since: theirs stays
                mx.set_cache_limit(limit)
        for entry in list(self._running):
            entry.error = LoadError("the cache was closed while loading", model=entry.label)
            entry.scope.cancel()
        with anyio.move_on_after(_ABANDON_WAIT, shield=True):
            for entry in list(self._running):
                await entry.finished.wait()
        for entry in list(self._ready.values()):
            self._drop(entry, counted=False)

    # -- joining, waiting, leaving ---------------------------------------------------------

    async def _attach(
        self,
        model: ModelRef,
        component: str | None,
        dtype: mx.Dtype | None,
        verify: bool,
        limits: Limits | None,
        shard: Shard | None = None,
        session: PullSession | None = None,
    ) -> _Entry:
        """The entry of the key: ready (a hit), or loading (joined or started here).

        With a `session` (its manifest fetched) the key is the pulled manifest's, and a load
        started here pulls while it loads with that session (`_Entry.session`).
        """
        self._check_open()
        if session is not None:
            assert session.model is not None
            opened, digest = session.model, session.model.digest
        else:
            opened, digest = await self._open(model)
        self._check_open()
        component = component or None
        key = CacheKey(
            digest,
            component,
            None if dtype is None else str(dtype),
            verify,
            None if shard is None else shard.key,
        )
        # From here to the return there is no checkpoint: the maps cannot change under us.
        if (entry := self._ready.get(key)) is not None:
            self._counts["hits"] += 1
            self._touch(entry)
            return entry
        if (entry := self._loading.get(key)) is not None:
            self._counts["joins"] += 1
            return entry
        entry = _Entry(key, opened.label, _name_of(model, opened))
        entry.session = session
        self._loading[key] = entry
        self._running.add(entry)
        self._counts["loads"] += 1
        assert self._tg is not None
        self._tg.start_soon(self._load, entry, opened, component, dtype, verify, limits, shard)
        return entry

    async def _pull_manifest(
        self, model: ModelRef, registry: str | None, verify: bool, limits: Limits | None
    ) -> PullSession:
        """A pull of `model` into the cache's store, its manifest fetched (nothing else)."""
        limits = limits or self.limits
        session = open_session(model, self.store, registry, limits, verify)
        try:
            await session.fetch_manifest()
        except BaseException:
            await session.client.aclose()
            raise
        return session

    async def _wait(self, entry: _Entry, on_progress: ProgressCallback | None) -> Weights:
        """Wait for the load as one of its waiters, then take a lease on its weights."""
        entry.waiters += 1
        try:
            watch = entry.watch()
            try:
                while (event := await watch.next()) is not None:
                    if on_progress is not None:
                        await _deliver(on_progress, event, entry.label)
            finally:
                entry.watches.discard(watch)
            return entry.take()
        finally:
            await self._leave(entry)

    async def _leave(self, entry: _Entry) -> None:
        """One waiter goes; the last one of a load in flight cancels it and waits for its end."""
        entry.waiters -= 1
        if entry.waiters or entry.state != "loading":
            self._notify()  # a ready entry no one waits on can be evicted now
            return
        if self._loading.get(entry.key) is entry:
            del self._loading[entry.key]
        self._counts["cancellations"] += 1
        entry.scope.cancel()
        # Shielded and bounded: the waiter is often being cancelled itself.
        with anyio.move_on_after(_ABANDON_WAIT, shield=True):
            await entry.finished.wait()

    # -- the load task -------------------------------------------------------------------

    async def _load(
        self,
        entry: _Entry,
        model: Model,
        component: str | None,
        dtype: mx.Dtype | None,
        verify: bool,
        limits: Limits | None,
        shard: Shard | None = None,
    ) -> None:
        limits = limits or self.limits
        weights: Weights | None = None
        session = entry.session
        try:
            with entry.scope:
                if session is not None:
                    # Reserved from the manifest, before any blob is downloaded: there are
                    # no headers to plan from until the blobs land.
                    await self._reserve(entry, _pull_estimate(model, component, dtype))
                    weights = await load_pulled(
                        session,
                        component,
                        dtype=dtype,
                        verify=verify,
                        on_progress=entry.publish,
                        limits=limits,
                    )
                elif shard is None:
                    plan = await make_plan(model, component, limits)
                else:
                    # Headers only, as a sharded `load_weights` plans: no blob read whole.
                    headers_only = replace(limits, prefetch_bytes=0)
                    plan = await make_plan(shard.select_layers(model), component, headers_only)
                    await anyio.to_thread.run_sync(shard.apply, plan, limits)
                await self._reserve(entry, _estimate(plan, dtype))
                # The plan made for the reservation is the one loaded: headers read once.
                weights = await load_plan(
                    plan, dtype=dtype, verify=verify, on_progress=entry.publish, limits=limits
                )
        except AsyncWeightsError as exc:
            entry.error = exc
        except Exception as exc:
            entry.error = LoadError(f"load failed: {type(exc).__name__}: {exc}", model=model.label)
            entry.error.__cause__ = exc
        finally:
            if session is not None:
                entry.session = None
                await session.client.aclose()  # shielded; the pull's own exit closed it already
            self._settle(entry, weights)

    def _settle(self, entry: _Entry, weights: Weights | None) -> None:
        """Record how a load ended, wake its waiters, and keep the budget."""
        self._running.discard(entry)
        entry.reserved = 0
        if self._loading.get(entry.key) is entry:
            del self._loading[entry.key]
        if weights is not None and not entry.scope.cancel_called:
            entry.state = "ready"
            entry.weights = weights
            entry.nbytes = weights.nbytes
            self._ready[entry.key] = entry
        else:
            if weights is not None:
                weights.release()
            entry.state = "failed"
            if entry.error is None:
                entry.error = LoadError("load cancelled", model=entry.label)
            elif not entry.scope.cancel_called:
                self._counts["failures"] += 1
        for watch in entry.watches:
            watch.close()
        entry.watches.clear()
        entry.finished.set()
        self._fit()

    # -- the budget ------------------------------------------------------------------------

    def _held(self) -> int:
        return sum(e.nbytes for e in self._ready.values())

    async def _reserve(self, entry: _Entry, need: int) -> None:
        """Make room for `need` more bytes by evicting LRU unleased entries.

        When only other loads in flight or leases stand in the way, wait (up to
        `budget_wait` seconds, cancellably) for them to settle, then try again.

        Raises:
            BudgetError: `need` is over `max_bytes`, or still does not fit after the wait.
        """
        limit = self.max_bytes
        if limit is None:
            entry.reserved = need
            return
        if need > limit:
            raise BudgetError(
                f"load needs {need} bytes, over the cache's max_bytes of {limit}", model=entry.label
            )
        deadline = anyio.current_time() + self.budget_wait
        while True:
            reserved = sum(e.reserved for e in self._running)
            pinned = reserved + sum(e.nbytes for e in self._ready.values() if e.leases or e.waiters)
            if need <= limit - pinned:
                # No checkpoint from the check to here: nothing can take the room meanwhile.
                self._evict_until(limit - reserved - need)
                entry.reserved = need
                return
            # Only loads in flight (and finished ones whose waiters are still leaving) are
            # waited for: a lease may be held by the very task asking (waiting for it would
            # deadlock), so leases alone fail at once.
            others = any(e is not entry and e.reserved for e in self._running) or any(
                e.waiters and not e.leases for e in self._ready.values()
            )
            left = deadline - anyio.current_time()
            if not others or left <= 0:
                waited = f" after waiting {self.budget_wait:g} s" if others else ""
                raise BudgetError(
                    f"load needs {need} bytes, but only {limit - pinned} of the cache's max_bytes"
                    f" of {limit} can be freed (the rest is leased or loading){waited}",
                    model=entry.label,
                )
            if self._changed is None:
                self._changed = anyio.Event()
            with anyio.move_on_after(left):
                await self._changed.wait()

    def _notify(self) -> None:
        """Wake loads waiting for room: bytes may have been freed."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _fit(self) -> None:
        self._notify()
        if self.max_bytes is not None:
            self._evict_until(self.max_bytes - sum(e.reserved for e in self._running))

    def _evict_until(self, room: int) -> None:
        """Evict unleased ready entries, least recently used first, until they fit in `room`."""
        held = self._held()
        for entry in list(self._ready.values()):
            if held <= room:
                return
            if not entry.leases and not entry.waiters:
                held -= entry.nbytes
                self._drop(entry)

    def _drop(self, entry: _Entry, *, counted: bool = True) -> None:
        del self._ready[entry.key]
        if counted:
            self._counts["evictions"] += 1
        if entry.weights is not None:
            entry.weights.release()
            entry.weights = None
        entry.state = "failed"
        entry.error = LoadError("weights were evicted", model=entry.label)

    def _touch(self, entry: _Entry) -> None:
        if self._ready.get(entry.key) is entry:
            self._ready[entry.key] = self._ready.pop(entry.key)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the WeightCache is closed")
        if self._tg is None:
            raise RuntimeError("use the WeightCache as `async with WeightCache(...) as cache:`")

    # -- resolving the key ---------------------------------------------------------------

    async def _open(self, model: ModelRef) -> tuple[Model, str]:
        """The model and the digest of its manifest bytes (`Model.digest`)."""
        opened = (
            model if isinstance(model, Model) else await self.store.open(model, limits=self.limits)
        )
        return opened, opened.digest


class _Events:
    """`WeightCache.progress`' stream: a plain iterator, so leaving it early leaves no
    half-run async generator behind (trio warns about those)."""

    def __init__(self, entry: _Entry | None, replay: Progress | None = None) -> None:
        self._entry = entry
        self._replay = replay
        self._watch = None if entry is None else entry.watch()

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Progress:
        if self._watch is None:
            event, self._replay = self._replay, None
            if event is None:
                raise StopAsyncIteration
            return event
        assert self._entry is not None
        event = await self._watch.next()
        if event is not None:
            return event
        self.close()
        if self._entry.weights is None:
            entry = self._entry
            error = entry.error or LoadError("load ended without weights", model=entry.label)
            raise _clone(error) from error
        raise StopAsyncIteration

    def close(self) -> None:
        if self._entry is not None and self._watch is not None:
            self._entry.watches.discard(self._watch)


async def _deliver(callback: ProgressCallback, event: Progress, label: str) -> None:
    """Call a waiter's callback as `load_weights` would: awaited, or in a worker thread."""
    try:
        if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            getattr(callback, "__call__", None)  # noqa: B004
        ):
            result = callback(event)
            if inspect.isawaitable(result):
                await result
        else:
            await anyio.to_thread.run_sync(callback, event, abandon_on_cancel=True)
    except Exception as exc:
        raise LoadError(
            f"progress callback raised {type(exc).__name__}: {exc}", model=label
        ) from exc


def _estimate(plan: Plan, dtype: mx.Dtype | None) -> int:
    """Bytes the loaded arrays will take: the plan's, with floating tensors converted."""
    if dtype is None:
        return plan.total_bytes
    total = 0
    for blob in plan.blobs:
        sizes: dict[str, int] = {}
        for t in blob.tensors:
            convert = not t.companion and t.quantization is None and t.entry.dtype in FLOAT_DTYPES
            count = 1
            for dim in t.entry.shape if t.slice is None else t.slice.shape:
                count *= dim
            sizes[t.key] = count * dtype.size if convert else t.entry.nbytes
        total += sum(sizes.values())
    return total


def _pull_estimate(model: Model, component: str | None, dtype: mx.Dtype | None) -> int:
    """Bytes a load while pulling may hold, from the manifest alone (no header is in yet).

    The component's distinct tensor blob bytes (their safetensors headers included: an
    over-estimate of a few KiB a blob); with `dtype`, times ``dtype.size / 2``, since a
    converted floating tensor grows at most from the 2-byte dtypes to `dtype`.
    """
    total = sum({x.digest: x.size for x in component_layers(model.manifest, component)}.values())
    if dtype is not None and dtype.size > 2:
        total = total * dtype.size // 2
    return total


def _clone(error: AsyncWeightsError) -> AsyncWeightsError:
    """A copy of a load's error for one waiter: raising one object in many tasks tangles
    their tracebacks."""
    if type(error).__init__ is AsyncWeightsError.__init__:
        # Rebuilt from its fields: copying a MemoryError subclass (BudgetError) by its
        # __reduce__ fails with "MemoryError.__new__(BudgetError) is not safe".
        return type(error)(
            error.reason,
            model=error.model,
            tensor=error.tensor,
            digest=error.digest,
            path=error.path,
            errno=error.errno,
        )
    try:
        return copy.copy(error)
    except TypeError:
        return error


def _name_of(model: ModelRef, opened: Model) -> str | None:
    """The normalized name of a model asked for by name; None for paths and manifests."""
    if isinstance(model, ModelName):
        return str(model)
    label = opened.label
    if isinstance(model, os.PathLike | Manifest) or label.startswith(("/", ".", "~", "<")):
        return None
    try:
        return str(ModelName.parse(label))
    except InvalidNameError:
        return None
