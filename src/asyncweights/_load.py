"""The async pipeline: `load_weights` and `stream_weights`.

    plan (headers, names, groups) ─► workers: one thread call per group ─► bounded stream
    (mx.load + dtype + one mx.eval)        of evaluated groups ─► Weights | async iterator

A group is loaded and evaluated inside one worker-thread call: MLX streams are per thread
since 0.31.2, so a lazy array made on one thread cannot be evaluated on another, and a
lazily loaded blob keeps its file open until evaluated, which is why groups are bounded by
open files as well as bytes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import anyio
import anyio.to_thread
import mlx.core as mx
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import (
    AsyncWeightsError,
    DuplicateTensorError,
    LoadError,
    ShardError,
    as_typed,
    typed_error,
)
from ._limits import Limits
from ._manifest import Manifest
from ._names import ModelName
from ._plan import BlobPlan, Plan, PlannedTensor, make_plan
from ._progress import Phase, Progress, ProgressCallback, ProgressReporter
from ._pull import PullSession, component_layers, open_session, run_pull, segment_ends
from ._read import (
    fill_group,
    mlx_error,
    read_direct,
    read_gguf,
    read_lazy,
    read_shard,
    verify_file,
)
from ._shard import Shard
from ._store import Model, ModelStore
from ._vfile import mlx_fills_through_readinto
from ._weights import Tensor, TensorInfo, Weights

__all__ = ["load_weights", "stream_weights"]

ModelRef = str | os.PathLike[str] | ModelName | Manifest | Model
StoreRef = str | os.PathLike[str] | ModelStore | None


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One evaluated group, ready for the consumer: built in the worker, so the event loop
    only files references away."""

    tensors: list[Tensor]
    nbytes: int


async def load_weights(
    model: ModelRef,
    component: str | None = None,
    *,
    store: StoreRef = None,
    dtype: mx.Dtype | None = None,
    verify: bool = False,
    on_progress: ProgressCallback | None = None,
    limits: Limits | None = None,
    pull: bool = False,
    registry: str | None = None,
    shard: Shard | None = None,
) -> Weights:
    """Load the tensors of one component of a model into evaluated MLX arrays.

    Args:
        model: a name (``"z-image"``, ``"ns/name:tag"``, ``"host/ns/name:tag"``), a path
            to a manifest file, a decoded `Manifest`, or an opened `Model`.
        component: ``"text_encoder"``, ``"transformer"``, ``"vae"`` …; its prefix is
            stripped from the names. None or ``""`` loads every tensor with full names.
        store: the models root or a `ModelStore`; defaults to ``$OLLAMA_MODELS``, else
            ``~/.ollama/models``.
        dtype: convert floating-point tensors to this dtype; packed quantized weights,
            their scales and biases, and integer tensors keep theirs.
        verify: check each blob's SHA-256 against its digest while loading.
        on_progress: a plain or async callable receiving `Progress` events.
        limits: memory, file and thread bounds; see `Limits`.
        pull: fetch the model from its registry while loading (see `pull`): the load is
            planned as soon as the manifest and the blob headers arrive, and each group is
            read as soon as its blobs are verified and committed to the store. The call
            returns once the whole model is in the store. `model` must be a name.
        registry: with `pull`, the base URL to fetch from instead of the name's host
            (``http://`` only when spelled so).
        shard: load only this rank's part (`Shard`): each split tensor's slice is read by
            byte ranges straight into its array (about ``1/world`` of its bytes), and
            ``weights.info[name].shard`` says which part; a pipeline `Shard` loads only its
            layers. Not with `pull`. GGUF models cannot be sharded (`ShardError`).

    Returns:
        The tensors, with per-tensor facts in ``weights.info``.

    Raises:
        AsyncWeightsError: a subclass naming the model, tensor, digest and file at fault.
            Nothing partially loaded is returned; cancellation frees everything.
    """
    arrays: dict[str, mx.array] = {}
    info: dict[str, TensorInfo] = {}
    try:
        async with _pipeline(
            model, component, store, dtype, verify, on_progress, limits, pull, registry, shard
        ) as (plan, groups):
            await _collect(groups, arrays, info)
    except BaseException as exc:
        # A traceback that outlives the load (asyncio keeps some) must not pin its arrays.
        arrays.clear()
        info.clear()
        traceback.clear_frames(exc.__traceback__)
        raise
    order = [t.name for blob in plan.blobs for t in blob.tensors]
    return Weights(
        {name: arrays[name] for name in order},
        {name: info[name] for name in order},
        model=plan.model,
        component=plan.component,
        quantization=plan.quantization,
        metadata=plan.metadata,
    )


async def _collect(
    groups: _Groups, arrays: dict[str, mx.array], info: dict[str, TensorInfo]
) -> None:
    async for loaded in groups:
        for tensor in loaded.tensors:
            arrays[tensor.name] = tensor.array
            info[tensor.name] = tensor.info


@asynccontextmanager
async def stream_weights(
    model: ModelRef,
    component: str | None = None,
    *,
    store: StoreRef = None,
    dtype: mx.Dtype | None = None,
    verify: bool = False,
    on_progress: ProgressCallback | None = None,
    limits: Limits | None = None,
    pull: bool = False,
    registry: str | None = None,
    shard: Shard | None = None,
) -> AsyncIterator[AsyncIterator[Tensor]]:
    """Stream a model's tensors, already evaluated, as their groups finish.

    Use as ``async with stream_weights(...) as tensors: async for t in tensors: ...``.
    Memory in flight is bounded by `Limits`; leaving the block early cancels the load and
    frees its files, threads and buffers (and, with `pull`, stops the download, keeping
    what was verified and the partial blob for a resume). Arguments are those of
    `load_weights`; with `pull` the first tensors arrive while the download goes on.
    """
    async with _pipeline(
        model, component, store, dtype, verify, on_progress, limits, pull, registry, shard
    ) as (_, groups):
        tensors = _Tensors(groups)
        try:
            yield tensors
        finally:
            tensors.clear()  # a reference kept after the block must not pin the arrays


class _Hashing:
    """Hashes a group's lazily loaded blobs in a thread of its own while MLX reads them.

    hashlib and the file reads release the GIL, as does ``mx.eval``: the two overlap.
    """

    def __init__(self, blobs: list[BlobPlan], model: str) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(blobs, model), name="asyncweights-verify", daemon=True
        )
        self._thread.start()

    def _run(self, blobs: list[BlobPlan], model: str) -> None:
        try:
            for blob in blobs:
                verify_file(blob, model)
        except BaseException as exc:  # re-raised by check() in the worker
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def check(self) -> None:
        if self._error is not None:
            raise self._error


def _info(tensor: PlannedTensor, array: mx.array) -> TensorInfo:
    return TensorInfo(
        name=tensor.name,
        dtype=array.dtype,
        shape=tuple(array.shape),
        nbytes=array.nbytes,
        digest=tensor.digest,
        key=tensor.key,
        source_dtype=tensor.entry.dtype if tensor.source is None else tensor.source.ggml_type,
        quantization=tensor.quantization,
        companions=tensor.companions or {},
        shard=tensor.slice,
    )


async def open_model(model: ModelRef, store: StoreRef, limits: Limits | None = None) -> Model:
    """Resolve the `model` and `store` arguments of the public functions to a `Model`."""
    if isinstance(model, Model):
        return model
    if not isinstance(store, ModelStore):
        store = ModelStore(store)
    return await store.open(model, limits=limits)


@asynccontextmanager
async def _pipeline(
    model_ref: ModelRef,
    component: str | None,
    store: StoreRef,
    dtype: mx.Dtype | None,
    verify: bool,
    on_progress: ProgressCallback | None,
    limits: Limits | None,
    pull: bool = False,
    registry: str | None = None,
    shard: Shard | None = None,
) -> AsyncIterator[tuple[Plan, _Groups]]:
    limits = limits or Limits()
    started = time.monotonic()
    session: PullSession | None = None
    if shard is not None and pull:
        raise ShardError("a sharded load cannot pull: pull the model first, then load")
    if pull:
        session = open_session(model_ref, store, registry, limits, verify)
        label = session.label
    else:
        try:
            model = await open_model(model_ref, store, limits)
        except Exception as exc:
            if isinstance(exc, AsyncWeightsError):
                raise
            error = as_typed(exc)
            assert error is not None
            raise error from exc
        label = model.label
        if shard is not None:
            model = shard.select_layers(model)
    reporter = ProgressReporter(on_progress, limits.progress_interval, label)
    send, receive = anyio.create_memory_object_stream[_Loaded](limits.buffered_groups)
    consumer_error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            try:
                if session is None and shard is not None:
                    # Headers only: no small blob read whole while planning.
                    plan = await make_plan(model, component, replace(limits, prefetch_bytes=0))
                    await anyio.to_thread.run_sync(shard.apply, plan, limits)
                elif session is None:
                    plan = await make_plan(model, component, limits)
                else:
                    session.reporter = reporter
                    model = await tg.start(run_pull, session, component)
                    # Filled in segment by segment as blobs arrive, whole at the end.
                    plan = Plan(model.label, component or None, [], None, [])
            except BaseException:
                reporter.close(None)
                raise
            if session is None:
                groups = _Groups(plan, receive, reporter, started)
                tg.start_soon(_produce, plan, dtype, verify, limits, send)
            else:
                layers = component_layers(model.manifest, component)
                estimate = (
                    sum({layer.digest: layer.size for layer in layers}.values()),
                    len(layers),
                )
                groups = _Groups(plan, receive, reporter, started, estimate=estimate)
                args = (session, model, component, dtype, verify, limits, send, plan, groups)
                tg.start_soon(_produce_pulled, *args)
            reporter.emit(groups.event("planning"), force=True)
            try:
                yield plan, groups
            except Exception as exc:
                # The consumer's own error: stop the load and re-raise it unwrapped below,
                # not inside the task group's ExceptionGroup.
                consumer_error = exc
            finally:
                if not groups.finished:
                    # Left early, or the consumer failed: stop the workers and the reporter.
                    tg.cancel_scope.cancel()
                    reporter.close(None)
    except BaseExceptionGroup as group:
        # One typed error, never a group: OSError, MemoryError and MLX's own errors included.
        error = typed_error(group, model=label)
        if error is None:
            raise
        raise error from error.__cause__
    finally:
        send.close()
        _drain(receive)
    if consumer_error is not None:
        raise consumer_error


def _drain(receive: MemoryObjectReceiveStream[_Loaded]) -> None:
    """Drop evaluated groups still buffered, then close: the iterator may outlive the load."""
    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
        while True:
            receive.receive_nowait()
    receive.close()


class _Groups:
    """The consumer's side of the pipeline: evaluated groups, counted for progress."""

    def __init__(
        self,
        plan: Plan,
        receive: MemoryObjectReceiveStream[_Loaded],
        reporter: ProgressReporter,
        started: float,
        *,
        estimate: tuple[int, int] | None = None,
    ) -> None:
        self._receive = receive
        self._reporter = reporter
        self._started = started
        self._model = plan.model
        self._total_bytes, self._total_tensors = estimate or (
            plan.total_bytes,
            plan.total_tensors,
        )
        self._bytes = 0
        self._tensors = 0
        self._last: str | None = None
        self.finished = False

    def settle(self, plan: Plan) -> None:
        """The final totals, once a load planned segment by segment has its whole plan."""
        self._total_bytes, self._total_tensors = plan.total_bytes, plan.total_tensors

    def event(self, phase: Phase) -> Progress:
        return Progress(
            phase=phase,
            completed_bytes=self._bytes,
            total_bytes=self._total_bytes,
            completed_tensors=self._tensors,
            total_tensors=self._total_tensors,
            elapsed=time.monotonic() - self._started,
            tensor=self._last,
            model=self._model,
        )

    def __aiter__(self) -> _Groups:
        return self

    async def __anext__(self) -> _Loaded:
        try:
            loaded = await self._receive.receive()
        except anyio.EndOfStream:
            self.finished = True
            self._reporter.close(self.event("done"))
            raise StopAsyncIteration from None
        self._bytes += loaded.nbytes
        self._tensors += len(loaded.tensors)
        if loaded.tensors:
            self._last = loaded.tensors[-1].name
        self._reporter.emit(self.event("loading"))
        return loaded


class _Tensors:
    """`stream_weights`' iterator: one `Tensor` at a time out of the evaluated groups."""

    def __init__(self, groups: _Groups) -> None:
        self._groups = groups
        self._pending: list[Tensor] = []

    def __aiter__(self) -> _Tensors:
        return self

    def clear(self) -> None:
        self._pending = []

    async def __anext__(self) -> Tensor:
        while not self._pending:
            self._pending = list(reversed((await self._groups.__anext__()).tensors))
        return self._pending.pop()


async def _produce(
    plan: Plan,
    dtype: mx.Dtype | None,
    verify: bool,
    limits: Limits,
    send: MemoryObjectSendStream[_Loaded],
) -> None:
    indices = iter(range(len(plan.groups)))
    readers = _reader_threads(limits.reader_nice)
    # Set when the load is cancelled: reads stop at the next chunk (fill path).
    cancel = threading.Event()

    async def worker() -> None:
        for index in indices:  # shared: each worker takes the next group not yet taken
            args = (plan.groups[index], dtype, verify, plan.model, limits, cancel)
            # Results travel in a box we empty ourselves: a traceback or an idle thread
            # that outlives a cancelled load must not pin a group's arrays.
            box = [readers.submit(_load_group, *args)]
            # Worker threads wait on an event, never on the future: a thread abandoned by
            # a cancel must not hold the group's result for a moment after the load ends.
            done = threading.Event()
            box[0].add_done_callback(_setter(done))
            try:
                try:
                    await anyio.to_thread.run_sync(done.wait, abandon_on_cancel=True)
                except BaseException:
                    # Cancelled: stop the reads, then wait for the group call to end (one
                    # chunk at most) so that nothing outlives the load.
                    cancel.set()
                    if not box[0].cancel():  # already running
                        with anyio.CancelScope(shield=True):
                            await anyio.to_thread.run_sync(done.wait)
                    raise
                loaded = [box.pop().result()]
                await send.send(loaded.pop())
            finally:
                box.clear()
                loaded = []

    async with send, anyio.create_task_group() as tg:
        for _ in range(min(limits.workers, len(plan.groups))):
            tg.start_soon(worker)


async def _produce_pulled(
    session: PullSession,
    model: Model,
    component: str | None,
    dtype: mx.Dtype | None,
    verify: bool,
    limits: Limits,
    send: MemoryObjectSendStream[_Loaded],
    plan: Plan,
    groups: _Groups,
) -> None:
    """Load a model while it is pulled: plan and load each run of committed blobs in turn.

    A full plan needs every blob's header, which would wait for the whole download (or cost
    a request per blob). Instead the tensor layers, in manifest order (the order they are
    downloaded), are cut into segments at the first safe end (`segment_ends`) past the blobs
    committed so far; each segment is planned on its own and its groups are loaded while
    later blobs arrive. Names must not repeat across segments; at the end the whole model is
    planned once more (headers cached), which gives the model-level quantization and the
    order of `load_weights`, and must name exactly the tensors that were loaded.
    """
    layers = component_layers(model.manifest, component)
    ends = segment_ends(layers)
    configs = [layer for layer in model.manifest.layers if not layer.is_tensor]
    owners: dict[str, tuple[str, str]] = {}
    async with send:
        if not layers:  # a GGUF model, or no such component: plan once every blob is in
            await session.wait(layer.digest for layer in session.blobs)
            whole = await make_plan(model, component, limits)
            await _produce(whole, dtype, verify, limits, send.clone())
            plan.blobs, plan.quantization, plan.groups = whole.blobs, whole.quantization, []
            groups.settle(whole)
            return
        start = 0
        while start < len(layers):
            # Wait for the blobs up to the first safe end, then take in every later run of
            # blobs already committed, up to a safe end.
            end = next(e for e in ends if e > start)
            await session.wait(layer.digest for layer in layers[start:end])
            for later in ends:
                if later <= end:
                    continue
                if not all(session.committed(layer.digest) for layer in layers[end:later]):
                    break
                end = later
            part = msgspec.structs.replace(model.manifest, layers=[*configs, *layers[start:end]])
            segment = Model(model.store, part, label=model.label, path=None, digest=model.digest)
            segment_plan = await make_plan(segment, component, limits)
            _claim(segment_plan, owners)
            await _produce(segment_plan, dtype, verify, limits, send.clone())
            start = end
        whole = await make_plan(model, component, limits)
        loaded = {(t.name, t.digest, t.key) for b in whole.blobs for t in b.tensors}
        if loaded != {(n, d, k) for n, (d, k) in owners.items()}:
            raise LoadError("the model's tensors changed while it was pulled", model=model.label)
        plan.blobs, plan.quantization, plan.groups = whole.blobs, whole.quantization, []
        groups.settle(whole)


def _claim(plan: Plan, owners: dict[str, tuple[str, str]]) -> None:
    """Record a segment's tensor names; a name another segment loaded is a duplicate."""
    for blob in plan.blobs:
        for tensor in blob.tensors:
            previous = owners.get(tensor.name)
            if previous is not None and previous != (tensor.digest, tensor.key):
                raise DuplicateTensorError(
                    f"tensor defined twice, also by blob {previous[0]}",
                    model=plan.model,
                    tensor=tensor.name,
                    digest=tensor.digest,
                    path=blob.path,
                )
            owners[tensor.name] = (tensor.digest, tensor.key)


def _setter(event: threading.Event) -> Callable[[object], None]:
    def set_event(_: object) -> None:
        event.set()

    return set_event


_READERS: dict[int | None, ThreadPoolExecutor] = {}
_READERS_LOCK = threading.Lock()


def _reader_threads(nice: int | None) -> ThreadPoolExecutor:
    """The long-lived threads group calls run in, at a lower priority (nice) if asked.

    Two reasons for threads of our own rather than anyio's pool, which the anyio worker only
    waits on:
    * MLX gives every thread that evaluates a stream of its own, with a native thread that
      lives as long as the process: threads that come and go (anyio retires idle workers
      after 10 s) would leak one per thread. These threads stay, so streams do not grow.
    * MLX reads lazily loaded arrays in native threads started from the asking thread, and
      those inherit its priority: at nice 10 they leave the event-loop thread first in line
      for the CPU (p99 loop lag 8 → 4 ms measured on 2 cores). An unprivileged thread cannot
      raise its priority again, hence threads of our own, never anyio's shared ones.
    They hold no event-loop state, so one set serves every loop and backend in the process.
    """
    with _READERS_LOCK:
        pool = _READERS.get(nice)
        if pool is None:

            def lower_priority() -> None:
                if nice is None:
                    return
                with contextlib.suppress(OSError, AttributeError):  # not Linux, or refused
                    tid = threading.get_native_id()
                    current = os.getpriority(os.PRIO_PROCESS, tid)
                    os.setpriority(os.PRIO_PROCESS, tid, max(current, nice))

            pool = _READERS[nice] = ThreadPoolExecutor(
                32, thread_name_prefix="asyncweights-reader", initializer=lower_priority
            )
        return pool


def _load_group(
    group: list[BlobPlan],
    dtype: mx.Dtype | None,
    verify: bool,
    model: str,
    limits: Limits,
    cancel: threading.Event | None = None,
) -> _Loaded:
    """Load and evaluate one group of blobs (runs in a worker thread; blocking)."""
    loaded: list[tuple[PlannedTensor, mx.array]] = []
    lazy: list[BlobPlan] = []
    try:
        if mlx_fills_through_readinto() and all(
            blob.gguf is None and not blob.sharded for blob in group
        ):
            loaded = fill_group(group, model, verify=verify, limits=limits, cancel=cancel)
            return _finish_group(loaded, group, dtype, model)
        return _load_group_into(loaded, lazy, group, dtype, verify, model, limits)
    except BaseException as exc:
        # The traceback keeps the frames below alive, and with them lazy arrays that hold
        # their blob files open: drop them so MLX closes the files now.
        loaded.clear()
        traceback.clear_frames(exc.__traceback__)
        raise


def _convert(tensor: PlannedTensor, array: mx.array, dtype: mx.Dtype | None) -> mx.array:
    if (
        dtype is not None
        and not tensor.companion
        and tensor.quantization is None
        and array.dtype != dtype
        and mx.issubdtype(array.dtype, mx.floating)
    ):
        return array.astype(dtype)
    return array


def _finish_group(
    loaded: list[tuple[PlannedTensor, mx.array]],
    group: list[BlobPlan],
    dtype: mx.Dtype | None,
    model: str,
) -> _Loaded:
    """Convert a filled group's tensors to `dtype` where asked, evaluated, as `Tensor` s."""
    if dtype is not None:
        loaded = [(tensor, _convert(tensor, array, dtype)) for tensor, array in loaded]
        try:
            mx.eval([array for _, array in loaded])
        except RuntimeError as exc:
            raise mlx_error(exc, group, model) from exc
    return _Loaded(
        [Tensor(tensor.name, array, _info(tensor, array)) for tensor, array in loaded],
        sum(blob.nbytes for blob in group),
    )


def _load_group_into(
    loaded: list[tuple[PlannedTensor, mx.array]],
    lazy: list[BlobPlan],
    group: list[BlobPlan],
    dtype: mx.Dtype | None,
    verify: bool,
    model: str,
    limits: Limits,
) -> _Loaded:
    parts = [blob for blob in group if blob.gguf is not None]
    converted = iter(read_gguf(parts, model)) if parts else None
    for blob in group:
        if blob.sharded:
            arrays = read_shard(blob, model)
            if verify:
                lazy.append(blob)  # hashed whole (every byte of the blob), beside the reads
        elif blob.gguf is not None:
            assert converted is not None
            arrays = next(converted)
            if verify and blob.hash_whole:
                lazy.append(blob)  # hashed whole, beside the evaluation
        elif blob.header.file_size <= limits.direct_read_bytes:
            arrays = read_direct(blob, model, verify=verify)
        else:
            arrays = read_lazy(blob, model)
            lazy.append(blob)
        for tensor in blob.tensors:
            loaded.append((tensor, _convert(tensor, arrays[tensor.key], dtype)))
        del arrays
    hashing = _Hashing(lazy, model) if verify and lazy else None
    try:
        mx.eval([array for _, array in loaded])
    except RuntimeError as exc:
        raise mlx_error(exc, lazy, model) from exc
    finally:
        if hashing is not None:
            hashing.join()
    if hashing is not None:
        hashing.check()
    return _Loaded(
        [Tensor(tensor.name, array, _info(tensor, array)) for tensor, array in loaded],
        sum(blob.nbytes for blob in group),
    )
