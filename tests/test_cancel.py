"""Cancellation at every checkpoint of a load, on asyncio and trio.

The harness counts scheduler steps (every time any task resumes: trio's
``Instrument.before_task_step``, asyncio's ``Handle._run``) and cancels the caller's scope at
the k-th one, for k = 1, 2, … until a load runs to the end without reaching k. After each
cancelled load: the cancellation came out unwrapped (the scope caught it), nothing was
returned, no descriptor points into the store, no thread is in loader code, and MLX's active
memory is back where it started.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import mlx.core as mx
import pytest
import trio

import asyncweights as aw
from asyncweights.testing import BuiltModel, StoreBuilder, random_weights

from .conftest import blob_fds, busy_load_threads

MODEL = "toy"
# Small groups and one worker call per blob make many checkpoints; one blob is above the
# direct-read size so the mx.load path is cancelled too.
LIMITS = aw.Limits(group_bytes=2048, workers=2, buffered_groups=1, progress_interval=0)


def assert_clean(store: Path, memory_before: int, where: object = None) -> None:
    """No store file open, no loader thread (within 5 s), MLX memory back to the start."""
    deadline = time.monotonic() + 5
    gc.collect()
    while blob_fds(store) or busy_load_threads():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"left behind at {where}: {blob_fds(store)}, threads {busy_load_threads()}"
            )
        time.sleep(0.005)
    mx.clear_cache()
    assert mx.get_active_memory() <= memory_before, (mx.get_active_memory(), memory_before, where)


def same_bits(a: mx.array, b: mx.array) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(memoryview(mx.contiguous(a))) == bytes(memoryview(mx.contiguous(b)))  # type: ignore[arg-type]
    )


def assert_complete(result: dict[str, mx.array], expected: dict[str, mx.array]) -> None:
    assert sorted(result) == sorted(expected)
    for name, array in expected.items():
        assert same_bits(result[name], array), name


class _Counter:
    def __init__(self, k: int, cancel: Callable[[], None]) -> None:
        self.k = k
        self.count = 0
        self._cancel = cancel

    def step(self) -> None:
        self.count += 1
        if self.count == self.k:
            self._cancel()


class _TrioSteps(trio.abc.Instrument):
    def __init__(self, counter: _Counter) -> None:
        self.counter = counter

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.counter.step()


@contextmanager
def cancel_at_step(backend: str, k: int, scope: anyio.CancelScope) -> Iterator[_Counter]:
    """Cancel `scope` when the k-th task step (a checkpoint resuming) is about to run."""
    counter = _Counter(k, scope.cancel)
    if backend == "trio":
        instrument = _TrioSteps(counter)
        trio.lowlevel.add_instrument(instrument)
        try:
            yield counter
        finally:
            trio.lowlevel.remove_instrument(instrument)
        return
    handle = asyncio.events.Handle
    real_run = handle._run

    def counted(self: asyncio.Handle) -> None:
        counter.step()
        real_run(self)

    handle._run = counted  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        handle._run = real_run  # type: ignore[method-assign]


@pytest.fixture
def model(builder: StoreBuilder) -> BuiltModel:
    shapes = {f"model.layers.{i}.w": (8, 64) for i in range(6)}
    shapes["model.embed.weight"] = (128, 160)  # 40 KiB of bf16 at 2 bytes: one bigger blob
    shapes["model.lm_head.weight"] = (256, 160)  # 80 KiB: read through mx.load
    w = random_weights(shapes, seed=7)
    return builder.add_model(
        MODEL,
        w,
        pack={"model.layers.0": ["model.layers.0.w", "model.layers.1.w"]},
        quantize={"model.layers.2.w": "int8"},
    )


async def _load(store: Path, **kwargs: Any) -> dict[str, mx.array]:
    weights = await aw.load_weights(MODEL, store=store, limits=LIMITS, **kwargs)
    return dict(weights)


async def _stream(store: Path, **kwargs: Any) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}

    async def consume() -> None:
        async with aw.stream_weights(MODEL, store=store, limits=LIMITS, **kwargs) as tensors:
            async for tensor in tensors:
                out[tensor.name] = tensor.array

    try:
        await consume()
    except BaseException as exc:
        # The tensors this consumer took are its own; drop them (and the finished frames
        # that held them) so that the memory check sees only what the library might keep:
        # on asyncio a traceback can outlive the cancellation.
        out.clear()
        traceback.clear_frames(exc.__traceback__)
        raise
    return out


async def _load_with_progress(store: Path) -> dict[str, mx.array]:
    events: list[aw.Progress] = []

    async def on_progress(event: aw.Progress) -> None:
        events.append(event)
        await anyio.lowlevel.checkpoint()

    return await _load(store, on_progress=on_progress)


def _sync_progress(event: aw.Progress) -> None:
    time.sleep(0.001)


APIS: dict[str, Callable[[Path], Awaitable[dict[str, mx.array]]]] = {
    "load": _load,
    "stream": _stream,
    "load-async-progress": _load_with_progress,
    "stream-thread-progress-verify": lambda store: _stream(
        store, on_progress=_sync_progress, verify=True
    ),
}


@pytest.mark.parametrize("api", APIS.values(), ids=APIS.keys())
async def test_cancel_at_every_checkpoint(
    anyio_backend: str,
    model: BuiltModel,
    store_root: Path,
    api: Callable[[Path], Awaitable[dict[str, mx.array]]],
) -> None:
    expected = model.expected
    mx.eval(list(expected.values()))
    gc.collect()
    mx.clear_cache()
    memory_before = mx.get_active_memory()
    k = 0
    cancelled = 0
    while True:
        k += 1
        result: dict[str, mx.array] | None = None
        with anyio.CancelScope() as scope, cancel_at_step(anyio_backend, k, scope) as counter:
            result = await api(store_root)
        if scope.cancelled_caught:
            cancelled += 1
            assert result is None
        else:
            # The cancel came after the last checkpoint (or never): the result is whole.
            assert result is not None
            assert_complete(result, expected)
        result = None
        assert_clean(store_root, memory_before, (k, scope.cancelled_caught))
        if counter.count < k:  # the load finished before reaching step k: every step done
            break
        assert k < 5000, "the load never finishes"
    assert cancelled >= 10, (k, cancelled)  # the sweep really cut loads at many points


@pytest.mark.parametrize("stop_after", [1, 2, 4, 7])
async def test_leaving_a_stream_early_frees_everything(
    model: BuiltModel, store_root: Path, stop_after: int
) -> None:
    gc.collect()
    mx.clear_cache()
    memory_before = mx.get_active_memory()
    seen = 0
    async with aw.stream_weights(MODEL, store=store_root, limits=LIMITS) as tensors:
        async for _ in tensors:
            seen += 1
            if seen == stop_after:
                break
    assert seen == stop_after
    _ = None
    assert_clean(store_root, memory_before)


async def test_consumer_error_inside_a_stream_comes_out_unwrapped(
    model: BuiltModel, store_root: Path
) -> None:
    gc.collect()
    mx.clear_cache()
    memory_before = mx.get_active_memory()

    async def consume() -> None:
        async with aw.stream_weights(MODEL, store=store_root, limits=LIMITS) as tensors:
            async for _ in tensors:
                raise KeyError("consumer broke")

    with pytest.raises(KeyError, match="consumer broke"):
        await consume()
    assert_clean(store_root, memory_before)


async def test_cancel_by_tiny_deadlines(model: BuiltModel, store_root: Path) -> None:
    gc.collect()
    mx.clear_cache()
    memory_before = mx.get_active_memory()
    deadline = 0.0
    while True:
        result = None
        with anyio.move_on_after(deadline) as scope:
            result = await _load(store_root)
        if not scope.cancelled_caught:
            assert result is not None
            assert_complete(result, model.expected)
            break
        assert result is None
        assert_clean(store_root, memory_before)
        deadline = deadline * 1.5 if deadline else 1e-4
        assert deadline < 30


async def test_cancelling_one_load_leaves_the_others_alone(
    model: BuiltModel, store_root: Path
) -> None:
    results: dict[int, dict[str, mx.array]] = {}

    async def one(i: int) -> None:
        results[i] = await _load(store_root)

    async with anyio.create_task_group() as tg:
        victim = anyio.CancelScope()

        async def cancelled_one() -> None:
            with victim:
                await _load(store_root)

        tg.start_soon(cancelled_one)
        for i in range(6):
            tg.start_soon(one, i)
        await anyio.lowlevel.checkpoint()
        victim.cancel()
    assert victim.cancelled_caught
    assert len(results) == 6
    for result in results.values():
        assert_complete(result, model.expected)


async def test_a_cancelled_load_frees_its_arrays_in_a_worker_thread(
    model: BuiltModel, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Freeing a partly loaded model unmaps every page it filled (tens of ms a GiB): the event
    # loop's thread must not be the one doing it.
    from asyncweights import _load as load_module

    freed: list[tuple[int, int, int]] = []
    real_free = load_module._free

    def recording_free(arrays: dict[str, mx.array]) -> None:
        given = len(arrays)
        real_free(arrays)
        freed.append((threading.get_ident(), given, len(arrays)))

    monkeypatch.setattr(load_module, "_free", recording_free)
    gc.collect()
    mx.clear_cache()
    memory_before = mx.get_active_memory()
    loop_thread = threading.get_ident()
    with anyio.CancelScope() as scope:

        async def on_progress(event: aw.Progress) -> None:
            if event.completed_tensors:  # one group in: cancel with arrays already loaded
                scope.cancel()

        await _load(store_root, on_progress=on_progress)
    assert scope.cancelled_caught
    assert len(freed) == 1
    thread, given, left = freed[0]
    assert thread != loop_thread
    assert given >= 1  # the load really held arrays when it was cancelled
    assert left == 0
    assert_clean(store_root, memory_before)
