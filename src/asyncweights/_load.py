"""The async pipeline: `load_weights` and `stream_weights`.

    plan the next group (its headers,  ─► workers: one thread call per group ─► bounded stream
    names, quantization; one at a time)   (fill + dtype + one mx.eval)    of evaluated groups
                                                                          ─► Weights | iterator

A plain load plans as it goes (`_read.StreamPlanner`): each worker plans the next group, then
loads it while the other worker plans the one after, and the whole-model checks run before
the stream ends. A load planned whole first (`make_plan`: `WeightCache`, a `Shard`, a budget)
hands its groups to the same workers.

A group is loaded and evaluated inside one worker-thread call: MLX streams are per thread
since 0.31.2, so a lazy array made on one thread cannot be evaluated on another, and a
lazily loaded blob keeps its file open until evaluated, which is why groups are bounded by
open files as well as bytes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace

import anyio
import anyio.to_thread
import mlx.core as mx
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import (
    AsyncWeightsError,
    ComponentNotFoundError,
    DuplicateTensorError,
    LoadError,
    ShardError,
    as_typed,
    typed_error,
)
from ._gguf import GGUFFile
from ._header import BlobHeader
from ._limits import Limits
from ._manifest import Layer, Manifest
from ._names import ModelName
from ._plan import BlobPlan, Hints, Plan, blob_paths, plan_gguf, plan_tensors, select_layers
from ._progress import Phase, Progress, ProgressCallback, ProgressReporter
from ._pull import PullSession, component_layers, load_units, open_session, run_pull
from ._quant import model_hints
from ._read import (
    Loaded,
    StreamPlanner,
    close_files,
    files_per_group,
    gguf_header,
    load_group,
    read_heads,
    reader_threads,
)
from ._shard import Shard
from ._store import Model, ModelStore
from ._weights import Tensor, TensorInfo, Weights

__all__ = [
    "load_plan",
    "load_pulled",
    "load_weights",
    "make_plan",
    "open_model",
    "stream_weights",
]

#: Worker calls reading headers at once while planning. Header reads are short and hold the
#: GIL for most of their time: more than two contend (measured); on a cold disk two already
#: overlap the reads.
_HEADER_WORKERS = 2
#: Blob headers read per worker call while planning.
_HEADER_BATCH = 64

ModelRef = str | os.PathLike[str] | ModelName | Manifest | Model
StoreRef = str | os.PathLike[str] | ModelStore | None


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
        pull: fetch the model from its registry while loading (see `pull`): each run of
            blobs verified and committed to the store so far is planned and read while the
            next ones download. The call returns once the whole model is in the store (its
            manifest written last). `model` must be a name.
        registry: with `pull`, the base URL to fetch from instead of the name's host
            (``http://`` only when spelled so).
        shard: load only this rank's part (`Shard`): each split tensor's slice is read by
            byte ranges straight into its array (about ``1/world`` of its bytes), and
            ``weights.info[name].shard`` says which part; a pipeline `Shard` loads only its
            layers. Not with `pull`. GGUF models cannot be sharded (`ShardError`).

    Returns:
        The tensors, with per-tensor facts in ``weights.info``.

    Headers are checked group by group as the load goes (each blob's before any of its data
    is read, through the descriptor the data is then read from), so a blob that breaks a
    rule in a later group fails the load after earlier groups were read; a `shard` load, or
    a ``limits.max_bytes`` the manifest's blob sizes do not prove met, checks every header
    first (docs/format.md#header-validation).

    Raises:
        AsyncWeightsError: a subclass naming the model, tensor, digest and file at fault.
            Nothing partially loaded is returned; cancellation frees everything.
    """
    pipeline = _pipeline(
        model, component, store, dtype, verify, on_progress, limits, pull, registry, shard
    )
    return await _weights(pipeline)


async def load_plan(
    plan: Plan,
    *,
    dtype: mx.Dtype | None = None,
    verify: bool = False,
    on_progress: ProgressCallback | None = None,
    limits: Limits | None = None,
) -> Weights:
    """Load what `make_plan` planned, as `load_weights` would, without planning again (the
    cache plans first to reserve its memory). The plan is used once: it holds bytes that
    planning read."""
    pipeline = _pipeline(
        plan.model, plan.component, None, dtype, verify, on_progress, limits, planned=plan
    )
    return await _weights(pipeline)


async def load_pulled(
    session: PullSession,
    component: str | None,
    *,
    dtype: mx.Dtype | None = None,
    verify: bool = False,
    on_progress: ProgressCallback | None = None,
    limits: Limits | None = None,
) -> Weights:
    """`load_weights(..., pull=True)` for a pull whose manifest was already fetched
    (`PullSession.fetch_manifest`; the cache keys a load by its digest first)."""
    pipeline = _pipeline(
        session.label, component, None, dtype, verify, on_progress, limits, pulling=session
    )
    return await _weights(pipeline)


async def _weights(pipeline: AbstractAsyncContextManager[tuple[Plan, _Groups]]) -> Weights:
    """Collect a pipeline's groups into `Weights`, in plan order."""
    arrays: dict[str, mx.array] = {}
    info: dict[str, TensorInfo] = {}
    try:
        async with pipeline as (plan, groups):
            await _collect(groups, arrays, info)
    except BaseException as exc:
        # A traceback that outlives the load (asyncio keeps some) must not pin its arrays.
        info.clear()
        traceback.clear_frames(exc.__traceback__)
        # Freeing what was loaded costs the kernel ~70 ms a GiB here (every page unmapped):
        # done in a worker thread, so a cancelled load does not stall the event loop for it
        # (measured: 41-115 ms of loop lag at a cancel 30% into the big bench model).
        if arrays:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_free, arrays)
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


def _free(arrays: dict[str, mx.array]) -> None:
    """Drop `arrays` one at a time: between two, the thread lets go of the GIL if asked."""
    while arrays:
        arrays.popitem()


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
    `load_weights`; with `pull` the first tensors arrive while the download goes on, in the
    order their blobs land.

    The first tensors arrive as soon as their own blobs' headers pass; later headers are
    checked as the stream goes. An error found later (a header that breaks a rule, a blob
    missing, a name defined twice, quantization companions read differently across groups)
    is raised from the iteration, after the tensors already yielded, as the same typed
    `AsyncWeightsError` `load_weights` raises; the tensors yielded before stay valid.
    """
    async with _pipeline(
        model, component, store, dtype, verify, on_progress, limits, pull, registry, shard
    ) as (_, groups):
        tensors = _Tensors(groups)
        try:
            yield tensors
        finally:
            tensors.clear()  # a reference kept after the block must not pin the arrays


async def make_plan(model: Model, component: str | None, limits: Limits) -> Plan:
    """Plan the load of `component` (None or "" for every tensor) of `model`: read what the
    planner needs (config hints, every blob's header, in worker threads), then plan.

    Raises:
        ComponentNotFoundError, BlobError and its subclasses, DuplicateTensorError,
        QuantizationError, BudgetError, UnsupportedModelError.
    """
    component = component or None
    if model.kind == "gguf":
        return await _plan_gguf(model, component, limits)
    model.check_loadable()
    layers = select_layers(model.label, model.tensor_layers, model.components, component)
    hints = await _model_hints(model)
    paths = blob_paths(os.fspath(model.store.blobs_dir), model.label, layers)
    headers, contents = await _read_headers(model.label, layers, paths, limits)

    def plan() -> Plan:
        # Off the event loop: files_per_group lists /proc/self/fd, and naming every tensor
        # is tens of milliseconds of CPU for thousands of blobs.
        files = files_per_group(limits)
        return plan_tensors(
            model.label, component, layers, headers, contents, paths, hints, limits, files
        )

    return await anyio.to_thread.run_sync(plan)


async def _model_hints(model: Model) -> Hints:
    """Read what the model says of its quantization: ``model_index.json`` and the config."""
    index = None
    if "model_index.json" in model.config_names:
        index = await model.read_config("model_index.json")
    config = await model.config()
    return model_hints(index, config.file_type)


async def _read_headers(
    label: str, layers: list[Layer], paths: dict[str, str], limits: Limits
) -> tuple[dict[str, BlobHeader], dict[str, bytes | bytearray]]:
    """Every distinct blob's validated header, read in batches by worker threads; small
    blobs are read whole, up to a budget."""
    sizes = {layer.digest: layer.size for layer in layers}
    names = {layer.digest: layer.name for layer in reversed(layers)}  # the first layer's name
    digests = list(sizes)
    headers: dict[str, BlobHeader] = {}
    contents: dict[str, bytes | bytearray] = {}
    read = functools.partial(
        read_heads, label=label, paths=paths, sizes=sizes, names=names,
        budget=[limits.prefetch_bytes], limits=limits, headers=headers, contents=contents,
    )  # fmt: skip
    batches = [digests[i : i + _HEADER_BATCH] for i in range(0, len(digests), _HEADER_BATCH)]
    limiter = anyio.CapacityLimiter(_HEADER_WORKERS)

    async def run(batch: list[str]) -> None:
        await anyio.to_thread.run_sync(read, batch, limiter=limiter)

    try:
        async with anyio.create_task_group() as tg:
            for batch in batches:
                tg.start_soon(run, batch)
    except BaseExceptionGroup as group:
        error = typed_error(group, model=label)
        if error is None:
            raise
        raise error from error.__cause__
    return headers, contents


async def _plan_gguf(model: Model, component: str | None, limits: Limits) -> Plan:
    """Read the GGUF headers of the layers to load (worker threads), then plan."""
    chosen = [(c, layer) for c, layer in model.gguf_components if component in (None, c)]
    if not chosen:
        available = [c for c, _ in model.gguf_components]
        raise ComponentNotFoundError(component or "", available, model=model.label)
    read: list[tuple[str, Layer, str, GGUFFile]] = []
    for comp, layer in chosen:
        path = model.store.blob_path(layer.digest)
        gguf = await anyio.to_thread.run_sync(gguf_header, model.label, comp, layer, path)
        read.append((comp, layer, os.fspath(path), gguf))

    def plan() -> Plan:
        return plan_gguf(model.label, component, read, limits, files_per_group(limits))

    return await anyio.to_thread.run_sync(plan)


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
    planned: Plan | None = None,
    pulling: PullSession | None = None,
) -> AsyncIterator[tuple[Plan, _Groups]]:
    limits = limits or Limits()
    started = time.monotonic()
    session: PullSession | None = pulling
    if shard is not None and pull:
        raise ShardError("a sharded load cannot pull: pull the model first, then load")
    if planned is not None:
        label = planned.model
    elif session is not None:
        label = session.label
    elif pull:
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
    send, receive = anyio.create_memory_object_stream[Loaded](limits.buffered_groups)
    consumer_error: Exception | None = None
    streamed: tuple[StreamPlanner, tuple[int, int]] | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            try:
                if planned is not None:
                    plan = planned
                elif session is None and shard is not None:
                    # Headers only: no small blob read whole while planning.
                    plan = await make_plan(model, component, replace(limits, prefetch_bytes=0))
                    await anyio.to_thread.run_sync(shard.apply, plan, limits)
                elif session is None:
                    streamed = await _streamed_planner(model, component or None, limits)
                    if streamed is None:
                        plan = await make_plan(model, component, limits)
                    else:
                        # Filled in group by group as headers are checked, whole at the end.
                        plan = Plan(model.label, component or None, [], None, [])
                else:
                    session.reporter = reporter
                    model = await tg.start(run_pull, session, component)
                    # Filled in segment by segment as blobs arrive, whole at the end.
                    plan = Plan(model.label, component or None, [], None, [])
            except BaseException:
                reporter.close(None)
                raise
            if streamed is not None:
                planner, estimate = streamed
                groups = _Groups(plan, receive, reporter, started, estimate=estimate)
                tg.start_soon(_produce_streamed, planner, plan, groups, dtype, verify, limits, send)
            elif session is None:
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


def _drain(receive: MemoryObjectReceiveStream[Loaded]) -> None:
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
        receive: MemoryObjectReceiveStream[Loaded],
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

    async def __anext__(self) -> Loaded:
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
    send: MemoryObjectSendStream[Loaded],
) -> None:
    indices = iter(range(len(plan.groups)))
    readers = reader_threads(limits.reader_nice)
    # Set when the load is cancelled: reads stop at the next chunk (fill path).
    cancel = threading.Event()

    async def worker() -> None:
        for index in indices:  # shared: each worker takes the next group not yet taken
            group = plan.groups[index]
            await _load_one(group, readers, cancel, dtype, verify, plan.model, limits, send)

    async with send, anyio.create_task_group() as tg:
        for _ in range(min(limits.workers, len(plan.groups))):
            tg.start_soon(worker)


async def _load_one(
    group: list[BlobPlan],
    readers: ThreadPoolExecutor,
    cancel: threading.Event,
    dtype: mx.Dtype | None,
    verify: bool,
    model: str,
    limits: Limits,
    send: MemoryObjectSendStream[Loaded],
) -> None:
    """Load one group in a reader thread and send it on."""
    args = (group, dtype, verify, model, limits, cancel)
    # Results travel in a box we empty ourselves: a traceback or an idle thread that
    # outlives a cancelled load must not pin a group's arrays.
    box = [readers.submit(load_group, *args)]
    # Worker threads wait on an event, never on the future: a thread abandoned by a cancel
    # must not hold the group's result for a moment after the load ends.
    done = threading.Event()
    box[0].add_done_callback(_setter(done))
    try:
        try:
            await anyio.to_thread.run_sync(done.wait, abandon_on_cancel=True)
        except BaseException:
            # Cancelled: stop the reads, then wait for the group call to end (one chunk at
            # most) so that nothing outlives the load.
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


async def _streamed_planner(
    model: Model, component: str | None, limits: Limits
) -> tuple[StreamPlanner, tuple[int, int]] | None:
    """A planner for a streamed load of `model`, with the progress totals the manifest gives
    (blob bytes, layers), or None where the load must be planned whole first: a GGUF model,
    or a budget (`Limits.max_bytes`) the manifest's blob sizes do not prove is met, which
    must refuse the load before any tensor is read.

    Raises:
        ComponentNotFoundError, UnsupportedModelError, and the errors of reading the config.
    """
    if model.kind == "gguf":
        return None
    model.check_loadable()
    layers = select_layers(model.label, model.tensor_layers, model.components, component)
    blob_bytes = sum({layer.digest: layer.size for layer in layers}.values())
    if limits.max_bytes is not None and blob_bytes > limits.max_bytes:
        return None
    hints = await _model_hints(model)
    paths = blob_paths(os.fspath(model.store.blobs_dir), model.label, layers)
    files = await anyio.to_thread.run_sync(files_per_group, limits)
    planner = StreamPlanner(model.label, component, layers, paths, hints, limits, files)
    return planner, (blob_bytes, len(layers))


async def _produce_streamed(
    planner: StreamPlanner,
    plan: Plan,
    groups: _Groups,
    dtype: mx.Dtype | None,
    verify: bool,
    limits: Limits,
    send: MemoryObjectSendStream[Loaded],
) -> None:
    """Plan and load at once: each worker plans the next group (one planning call at a
    time, in a worker thread), then loads it while the other plans the one after. A
    group's blob files are opened by its planning and closed by its load, so at most
    `Limits.workers` groups hold files. The stream ends after the planner's whole-model
    checks, with the plan filled in and the progress totals settled."""
    readers = reader_threads(limits.reader_nice)
    cancel = threading.Event()
    planning = anyio.Lock()

    async def worker() -> None:
        while True:
            async with planning:
                group = await anyio.to_thread.run_sync(planner.next_group)
            if group is None:
                return
            await _load_one(group, readers, cancel, dtype, verify, plan.model, limits, send)

    async with send:
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(limits.workers):
                    tg.start_soon(worker)
        finally:
            for group in planner.groups:  # groups planned but never loaded (error, cancel)
                close_files(group)
        plan.blobs, plan.groups = planner.blobs, planner.groups
        plan.quantization = planner.quantization
        groups.settle(plan)


async def _produce_pulled(
    session: PullSession,
    model: Model,
    component: str | None,
    dtype: mx.Dtype | None,
    verify: bool,
    limits: Limits,
    send: MemoryObjectSendStream[Loaded],
    plan: Plan,
    groups: _Groups,
) -> None:
    """Load a model while it is pulled: plan and load the blobs committed so far, in turns.

    A full plan needs every blob's header, which would wait for the whole download (or cost
    a request per blob). Instead each turn takes every unit (`load_units`: a weight with its
    companions) whose blobs have all landed and was not loaded yet, plans those layers on
    their own and loads their groups while later blobs arrive, so tensors come in the order
    their blobs land. The first turn starts with the first unit; later ones wait for
    `Limits.group_bytes` of landed blobs (or the last ones). Names must not repeat across
    turns; at the end the whole model is planned once more (headers cached), which gives the
    model-level quantization and the order of `load_weights`, and must name exactly the
    tensors that were loaded.
    """
    layers = component_layers(model.manifest, component)
    pending = load_units(layers)
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
        turns = 0
        while pending:
            landed = session.next_commit()  # taken before the check: no landing is missed
            ready = [u for u in pending if all(session.committed(x.digest) for x in u)]
            size = sum(layer.size for unit in ready for layer in unit)
            # The first turn goes at once (the first tensor); later ones wait for a group's
            # worth of bytes, or the last blobs: a turn costs a plan, so not one per blob.
            if not ready or (turns and size < limits.group_bytes and len(ready) < len(pending)):
                await landed.wait()
                continue
            turns += 1
            taken = {id(u) for u in ready}
            pending = [u for u in pending if id(u) not in taken]
            chosen = {id(layer) for unit in ready for layer in unit}
            turn = [layer for layer in layers if id(layer) in chosen]  # manifest order
            part = msgspec.structs.replace(model.manifest, layers=[*configs, *turn])
            segment = Model(model.store, part, label=model.label, path=None, digest=model.digest)
            segment_plan = await make_plan(segment, component, limits)
            _claim(segment_plan, owners)
            await _produce(segment_plan, dtype, verify, limits, send.clone())
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
