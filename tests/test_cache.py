"""WeightCache: single flight, waiters and cancellation, leases, LRU eviction, budget, progress."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import mlx.core as mx
import pytest

import asyncweights as aw
import asyncweights._cache as cache_module
import asyncweights._load as load_module
from asyncweights._read import load_group
from asyncweights.testing import BuiltModel, StoreBuilder, random_weights

from .conftest import wait_quiet

KiB = 1 << 10
#: 8 tensors of 128 KiB in 128 KiB groups: 8 groups, each slowed down by GROUP_DELAY.
LIMITS = aw.Limits(group_bytes=128 * KiB, workers=1, progress_interval=0)
GROUP_DELAY = 0.03
MODEL_BYTES = 8 * 128 * KiB


class Calls:
    """Counts the `load_weights` calls the cache makes."""

    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    counter = Calls()
    real = load_module.load_plan

    async def counted(*args: Any, **kwargs: Any) -> aw.Weights:
        counter.count += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "load_plan", counted)
    return counter


@pytest.fixture(autouse=True)
def slow_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make each group take GROUP_DELAY seconds in its worker, so loads can be caught mid-way."""
    real: Callable[..., Any] = load_group

    def slow(*args: Any) -> Any:
        time.sleep(GROUP_DELAY)
        return real(*args)

    monkeypatch.setattr(load_module, "load_group", slow)


def add_model(builder: StoreBuilder, name: str, seed: int = 0) -> BuiltModel:
    shapes = {f"transformer/blocks.{i}.weight": (64, 1024) for i in range(8)}
    shapes["vae/decoder.weight"] = (64, 1024)
    return builder.add_model(name, random_weights(shapes, seed=seed))


@pytest.fixture
def toy(builder: StoreBuilder) -> BuiltModel:
    return add_model(builder, "toy:latest")


def cache(store_root: Path, max_bytes: int | None = None) -> aw.WeightCache:
    return aw.WeightCache(max_bytes, store=store_root, limits=LIMITS)


class FirstBytes:
    """A progress callback that keeps every event and sets `started` once bytes are in."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.events: list[aw.Progress] = []

    async def __call__(self, event: aw.Progress) -> None:
        self.events.append(event)
        if event.completed_bytes:
            self.started.set()


def assert_exact(weights: aw.Weights, built: BuiltModel, component: str | None) -> None:
    expected = built.component(component)
    assert sorted(weights) == sorted(expected)
    for name, array in expected.items():
        assert weights[name].dtype == array.dtype
        assert mx.array_equal(weights[name], array).item(), name


def loading(events: list[aw.Progress]) -> Iterator[aw.Progress]:
    return (e for e in events if e.phase == "loading")


async def test_concurrent_leases_share_one_load(
    store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    got: list[aw.Weights] = []
    async with cache(store_root) as c:

        async def one() -> None:
            async with c.lease("toy", "transformer") as weights:
                got.append(weights)
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
        stats = c.stats
        async with c.lease("toy:latest", "transformer") as again:
            assert again is got[0]
            assert_exact(again, toy, "transformer")
        assert c.stats.hits == 1
    assert calls.count == 1
    assert (stats.loads, stats.joins, stats.hits, stats.leases, stats.waiters) == (1, 9, 0, 0, 0)
    assert all(w is got[0] for w in got)
    assert stats.bytes_held == MODEL_BYTES


async def test_key_is_manifest_digest_component_and_dtype(
    builder: StoreBuilder, store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    async with cache(store_root) as c:
        async with c.lease("toy", "transformer") as first:
            pass
        async with c.lease("toy", "vae") as vae:
            assert_exact(vae, toy, "vae")
        async with c.lease("toy", "transformer", dtype=mx.float32) as wide:
            assert wide is not first
            assert wide.nbytes == 2 * MODEL_BYTES
        # Re-pulled under the same name: new manifest bytes, new key, new load.
        repulled = add_model(builder, "toy:latest", seed=1)
        async with c.lease("toy", "transformer") as fresh:
            assert fresh is not first
            assert_exact(fresh, repulled, "transformer")
        keys = [e.key for e in c.entries()]
    assert calls.count == 4
    assert len({k.digest for k in keys}) == 2
    assert [(k.component, k.dtype) for k in keys] == [
        ("transformer", None),
        ("vae", None),
        ("transformer", str(mx.float32)),
        ("transformer", None),
    ]


async def test_an_opened_model_shares_the_key_of_its_name(
    store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    model = await aw.ModelStore(store_root).open("toy")
    async with (
        cache(store_root) as c,
        c.lease("toy", "vae") as by_name,
        c.lease(model, "vae") as by_model,
    ):
        assert by_name is by_model
    assert calls.count == 1


async def test_cancelling_one_waiter_keeps_the_load_for_the_others(
    store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    mark = FirstBytes()
    got: list[aw.Weights] = []

    async with cache(store_root) as c:
        leaver = anyio.CancelScope()

        async def stays() -> None:
            async with c.lease("toy", "transformer") as weights:
                got.append(weights)
                assert_exact(weights, toy, "transformer")

        async def leaves() -> None:
            with leaver:
                async with c.lease("toy", "transformer", on_progress=mark):
                    pytest.fail("the cancelled waiter got weights")

        async with anyio.create_task_group() as tg:
            tg.start_soon(stays)
            tg.start_soon(leaves)
            await mark.started.wait()
            assert c.stats.waiters == 2
            leaver.cancel()
        stats = c.stats
    assert leaver.cancelled_caught
    assert len(got) == 1
    assert (stats.loads, stats.joins, stats.cancellations, stats.failures) == (1, 1, 0, 0)
    assert calls.count == 1


async def test_last_waiter_leaving_cancels_the_load_and_frees_it(
    store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    mark = FirstBytes()

    async with cache(store_root) as c:
        async with anyio.create_task_group() as tg:

            async def leaves() -> None:
                async with c.lease("toy", "transformer", on_progress=mark):
                    pytest.fail("the cancelled waiter got weights")

            tg.start_soon(leaves)
            await mark.started.wait()
            tg.cancel_scope.cancel()
        # The lease returned only after the load had ended: nothing of it is left.
        wait_quiet(store_root, timeout=0.5)
        stats = c.stats
        assert mark.events[-1].completed_bytes < MODEL_BYTES
        assert (stats.loads, stats.cancellations, stats.loading, stats.entries) == (1, 1, 0, 0)
        assert (stats.bytes_held, stats.bytes_reserved, stats.waiters) == (0, 0, 0)
        async with c.lease("toy", "transformer") as weights:  # a fresh load, not a dead one
            assert_exact(weights, toy, "transformer")
        assert c.stats.loads == 2
    assert calls.count == 2
    wait_quiet(store_root)


async def test_progress_reaches_every_waiter_in_order(
    store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    seen: dict[str, list[aw.Progress]] = {"async": [], "plain": [], "stream": [], "hit": []}

    async def on_async(event: aw.Progress) -> None:
        seen["async"].append(event)

    async with cache(store_root) as c:

        async def lease(callback: Callable[[aw.Progress], Any]) -> None:
            async with c.lease("toy", "transformer", on_progress=callback):
                pass

        async def stream() -> None:
            async with c.progress("toy", "transformer") as events:
                async for event in events:
                    seen["stream"].append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(lease, on_async)
            tg.start_soon(lease, seen["plain"].append)
            tg.start_soon(stream)
        await lease(seen["hit"].append)
        async with c.progress("toy", "transformer") as events:
            replay = [e async for e in events]
    assert calls.count == 1
    for who in ("async", "plain", "stream"):
        got = seen[who]
        done = [e.completed_bytes for e in got]
        assert done == sorted(done), who
        assert len(list(loading(got))) >= 2, who
        assert got[-1].phase == "done", who
        assert got[-1].completed_bytes == got[-1].total_bytes == MODEL_BYTES, who
    # A hit reports the final event alone.
    assert seen["hit"] == replay == [seen["stream"][-1]]
    assert replay[0].to_ollama() == {
        "status": "success",
        "digest": "toy",
        "total": MODEL_BYTES,
        "completed": MODEL_BYTES,
    }


async def test_a_raising_callback_fails_only_its_own_waiter(
    store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    async def bad(event: aw.Progress) -> None:
        if event.completed_bytes:
            raise ValueError("boom")

    async with cache(store_root) as c:
        got: list[aw.Weights] = []

        async def good() -> None:
            async with c.lease("toy", "transformer") as weights:
                got.append(weights)

        async def failing() -> None:
            with pytest.raises(aw.LoadError) as info:
                async with c.lease("toy", "transformer", on_progress=bad):
                    pass  # pragma: no cover
            assert str(info.value) == "progress callback raised ValueError: boom (model 'toy')"

        async with anyio.create_task_group() as tg:
            tg.start_soon(good)
            tg.start_soon(failing)
    assert len(got) == 1
    assert calls.count == 1


async def test_unleased_entries_are_evicted_least_recently_used_first(
    builder: StoreBuilder, store_root: Path, calls: Calls
) -> None:
    for name in ("a", "b", "c"):
        add_model(builder, name, seed=name.encode()[0])
    async with cache(store_root, max_bytes=2 * MODEL_BYTES) as c:
        async with c.lease("a", "transformer"):
            pass
        async with c.lease("b", "transformer") as b:
            pass
        async with c.lease("a", "transformer"):  # a is now the most recently used
            pass
        async with c.lease("c", "transformer"):
            assert [e.name for e in c.entries()] == ["a:latest", "c:latest"]
            assert len(b) == 0  # evicted weights are released
            # Everything else is leased or needed: evicting a must make room for b.
            async with c.lease("b", "transformer"):
                assert [e.name for e in c.entries()] == ["c:latest", "b:latest"]
        stats = c.stats
        assert (stats.loads, stats.hits, stats.evictions) == (4, 1, 2)
        assert stats.bytes_held == 2 * MODEL_BYTES
        dropped = c.evict("c")
        assert [e.name for e in dropped] == ["c:latest"]
        assert [e.name for e in c.evict()] == ["b:latest"]
        assert (c.stats.entries, c.stats.bytes_held, c.stats.evictions) == (0, 0, 4)
    assert calls.count == 4


async def test_a_load_that_cannot_fit_fails_fast(
    builder: StoreBuilder, store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    add_model(builder, "other", seed=1)
    async with cache(store_root, max_bytes=MODEL_BYTES + MODEL_BYTES // 2) as c:
        async with c.lease("toy", "transformer") as held:
            with pytest.raises(aw.BudgetError) as info:
                async with c.lease("other", "transformer"):
                    pass  # pragma: no cover
            assert str(info.value) == (
                f"load needs {MODEL_BYTES} bytes, but only {MODEL_BYTES // 2} of the cache's "
                f"max_bytes of {MODEL_BYTES + MODEL_BYTES // 2} can be freed (the rest is "
                "leased or loading) (model 'other')"
            )
            assert len(held) == 8  # the leased entry was not evicted to try
        with pytest.raises(aw.BudgetError, match="over the cache's max_bytes"):
            async with c.lease("toy", "transformer", dtype=mx.float32):
                pass  # pragma: no cover
        assert c.stats.failures == 2
        async with c.lease("other", "transformer"):  # unleased now: toy is evicted
            assert [e.name for e in c.entries()] == ["other:latest"]
    assert calls.count == 2  # toy and the last other: the budget failures never loaded


async def test_a_failed_load_is_not_cached(
    builder: StoreBuilder, store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    layer = next(x for x in toy.layers if x.name == "transformer/blocks.3.weight")
    blob = store_root / "blobs" / layer.digest.replace(":", "-")
    data = blob.read_bytes()
    blob.unlink()
    async with cache(store_root) as c:
        for _ in range(2):
            with pytest.raises(aw.BlobMissingError) as info:
                async with c.lease("toy", "transformer"):
                    pass  # pragma: no cover
            assert info.value.digest == layer.digest
            assert info.value.tensor == "transformer/blocks.3.weight"
        blob.write_bytes(data)
        async with c.lease("toy", "transformer") as weights:
            assert_exact(weights, toy, "transformer")
        stats = c.stats
    assert (stats.loads, stats.failures, stats.entries) == (3, 2, 1)


async def test_every_waiter_gets_the_failure(
    store_root: Path, toy: BuiltModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = load_group
    calls = 0

    def fail_third(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise aw.LoadError("reading tensors failed: injected", model="toy")
        return slow(*args)

    monkeypatch.setattr(load_module, "load_group", fail_third)
    async with cache(store_root) as c:
        errors: list[BaseException] = []

        async def one() -> None:
            try:
                async with c.lease("toy", "transformer"):
                    pass  # pragma: no cover
            except aw.LoadError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        stats = c.stats
    assert (stats.loads, stats.joins, stats.failures, stats.entries) == (1, 2, 1, 0)
    assert len(errors) == 3
    assert len({id(e) for e in errors}) == 3  # a copy each: tracebacks stay apart
    assert {str(e) for e in errors} == {"reading tensors failed: injected (model 'toy')"}


async def test_close_cancels_loads_and_releases_entries(store_root: Path, toy: BuiltModel) -> None:
    errors: list[BaseException] = []
    mark = FirstBytes()

    async with anyio.create_task_group() as tg, cache(store_root) as c:
        async with c.lease("toy", "vae") as vae:
            pass

        async def waiter() -> None:
            try:
                async with c.lease("toy", "transformer", on_progress=mark):
                    pass  # pragma: no cover
            except aw.LoadError as exc:
                errors.append(exc)

        tg.start_soon(waiter)
        await mark.started.wait()
    assert [str(e) for e in errors] == ["the cache was closed while loading (model 'toy')"]
    assert len(vae) == 0
    wait_quiet(store_root)
    with pytest.raises(RuntimeError, match="closed"):
        async with c.lease("toy"):
            pass  # pragma: no cover


async def test_lease_needs_the_cache_entered(store_root: Path, toy: BuiltModel) -> None:
    c = cache(store_root)
    with pytest.raises(RuntimeError, match="async with WeightCache"):
        async with c.lease("toy"):
            pass  # pragma: no cover


async def test_leaving_a_progress_stream_early_leaves_only_that_watcher(
    store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    got: list[aw.Weights] = []
    async with cache(store_root) as c:

        async def stays() -> None:
            async with c.lease("toy", "transformer") as weights:
                got.append(weights)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stays)
            async with c.progress("toy", "transformer") as events:
                async for event in events:
                    if event.completed_bytes:
                        break
            assert c.stats.waiters == 1
        stats = c.stats
    assert len(got) == 1
    assert (stats.loads, stats.cancellations) == (1, 0)
    assert calls.count == 1


async def test_a_load_waits_for_a_load_in_flight_to_settle_then_evicts_it(
    builder: StoreBuilder, store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    """Issue case: a model that fits alone got BudgetError at once while another load was in
    flight, and the same request a second later worked. Now it waits for the load to settle."""
    other = add_model(builder, "other", seed=1)
    async with cache(store_root, max_bytes=MODEL_BYTES + MODEL_BYTES // 2) as c:
        started = anyio.Event()

        async def first() -> None:
            async with c.progress("toy", "transformer") as events:
                async for _ in events:
                    started.set()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await started.wait()  # toy is loading: its bytes are reserved
                assert c.stats.bytes_reserved == MODEL_BYTES
                async with c.lease("other", "transformer") as weights:
                    assert_exact(weights, other, "transformer")
                    assert [e.name for e in c.entries()] == ["other:latest"]
        assert (c.stats.failures, c.stats.evictions) == (0, 1)
    assert calls.count == 2


async def test_the_budget_wait_is_bounded_and_cancellable(
    builder: StoreBuilder, store_root: Path, toy: BuiltModel, calls: Calls
) -> None:
    add_model(builder, "other", seed=1)
    budget = MODEL_BYTES + MODEL_BYTES // 2

    async def watch(c: aw.WeightCache, started: anyio.Event) -> None:
        async with c.progress("toy", "transformer") as events:
            async for _ in events:
                started.set()

    # budget_wait elapses while toy is still loading (8 groups of 30 ms): it says it waited.
    async with aw.WeightCache(budget, store=store_root, limits=LIMITS, budget_wait=0.05) as c:
        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, c, started)
            await started.wait()
            began = time.monotonic()
            with pytest.raises(aw.BudgetError) as info:
                async with c.lease("other", "transformer"):
                    pass  # pragma: no cover
            assert time.monotonic() - began < 5
        assert str(info.value) == (
            f"load needs {MODEL_BYTES} bytes, but only {MODEL_BYTES // 2} of the cache's "
            f"max_bytes of {budget} can be freed (the rest is leased or loading) after "
            "waiting 0.05 s (model 'other')"
        )

    # A waiter that leaves while its load waits for room cancels that load at once.
    async with aw.WeightCache(budget, store=store_root, limits=LIMITS, budget_wait=60) as c:
        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, c, started)
            await started.wait()
            began = time.monotonic()
            with anyio.move_on_after(0.02):
                async with c.lease("other", "transformer"):
                    pass  # pragma: no cover
            assert time.monotonic() - began < 5
            assert c.stats.cancellations == 1
            assert [e.model for e in c.entries()] == ["toy"]  # other left no entry
        assert [e.name for e in c.entries()] == ["toy:latest"]
    wait_quiet(store_root)


def _cache_limit() -> int:
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


async def test_evicted_buffers_stay_in_mlx_cache_for_the_reload(
    store_root: Path, toy: BuiltModel
) -> None:
    # A reload after eviction reuses the buffers the evicted weights freed, up to the
    # budget, instead of faulting in fresh memory; the process-wide limit comes back after.
    mx.clear_cache()
    outer = mx.set_cache_limit(0)
    try:
        async with cache(store_root, max_bytes=4 * MODEL_BYTES) as c:
            assert _cache_limit() == 4 * MODEL_BYTES
            async with c.lease("toy", "transformer") as first:
                assert_exact(first, toy, "transformer")
            c.evict()
            kept = mx.get_cache_memory()
            assert kept >= 8 * 128 * KiB  # the 8 transformer tensors' buffers
            async with c.lease("toy", "transformer") as second:
                assert_exact(second, toy, "transformer")
                assert mx.get_cache_memory() <= kept - 8 * 128 * KiB  # taken back
        assert _cache_limit() == 0
    finally:
        mx.set_cache_limit(outer)
        mx.clear_cache()


async def test_a_lease_plans_once_reading_each_header_once(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache plans to reserve memory and then loads that same plan: one header read per
    # blob (planning twice read 10 headers for this 5-blob model).
    from asyncweights import _header, _read

    shapes = {f"blocks.{i}.weight": (4, 8) for i in range(5)}
    builder.add_model("five:latest", random_weights(shapes, seed=5))
    reads: list[str] = []
    real = _header.head_of

    def counted(f: Any, **kwargs: Any) -> Any:
        reads.append(f.path)
        return real(f, **kwargs)

    monkeypatch.setattr(_read, "head_of", counted)
    async with aw.WeightCache(store=store_root) as cache, cache.lease("five") as weights:
        assert sorted(weights) == sorted(shapes)
    assert len(reads) == 5
    assert len(set(reads)) == 5
