"""The strategies: each loads (or reads) one generated model once and reports what it saw.

Every function takes the model's `ModelPaths` and returns a dict of figures; `run_one.py`
calls exactly one per process, so each run starts with a fresh heap and a fresh MLX. Heavy
imports happen inside the functions: a strategy pays only for what it uses (peak RSS).

Timed regions start before the manifest (or file) is opened and stop once every array is
evaluated; all arrays stay alive until the clock stops. GB/s always divides the model's
blob bytes, so ratios between strategies are ratios of wall time.
"""

from __future__ import annotations

import gc
import hashlib
import json
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from generate import ModelPaths
from probes import (
    FdSampler,
    LoopTicker,
    blob_fds,
    busy_threads,
    open_fds,
    peak_rss_bytes,
    rss_bytes,
    ru_maxrss_bytes,
)

Figures = dict[str, Any]
_RAW_BUFFER = 16 << 20


@dataclass(frozen=True)
class Strategy:
    """A strategy, what it is, and which files it reads (for warming and eviction)."""

    run: Callable[[ModelPaths], Figures]
    group: str  # "asyncweights" | "baseline" | "limit" | "check"
    files: str  # "blobs" | "single" | "none"
    doc: str


def _tensor_blobs(paths: ModelPaths) -> list[str]:
    """Blob paths of every tensor layer, read from the manifest (part of the timed work)."""
    with open(paths.manifest, "rb") as f:
        manifest = json.load(f)
    blobs = os.path.join(paths.store, "blobs")
    return [
        os.path.join(blobs, layer["digest"].replace(":", "-"))
        for layer in manifest["layers"]
        if layer["mediaType"] == "application/vnd.ollama.image.tensor"
    ]


def _timed(paths: ModelPaths, load: Callable[[], object]) -> Figures:
    """Run ``load`` with MLX peak memory reset and the fd sampler on; keep its result alive."""
    import mlx.core as mx

    mx.reset_peak_memory()
    rss0 = rss_bytes()
    usage0 = os.times()
    with FdSampler() as fds:
        start = time.perf_counter()
        result = load()
        wall = time.perf_counter() - start
    usage1 = os.times()
    figures = _common(paths, wall, fds, usage0, usage1, rss0)
    del result
    return figures


def _common(
    paths: ModelPaths, wall: float, fds: FdSampler, usage0: os.times_result,
    usage1: os.times_result, rss0: int,
) -> Figures:  # fmt: skip
    import mlx.core as mx

    peak = peak_rss_bytes()
    return {
        "wall_s": wall,
        "gbps": paths.blob_bytes / wall / 1e9,
        "peak_rss_mib": peak / 2**20,
        "rss_before_mib": rss0 / 2**20,
        "ru_maxrss_mib": ru_maxrss_bytes() / 2**20,
        "rss_over_model_mib": (peak - paths.tensor_bytes) / 2**20,
        "load_rss_over_model_mib": (peak - rss0 - paths.tensor_bytes) / 2**20,
        "mlx_peak_mib": mx.get_peak_memory() / 2**20,
        "max_fds": fds.max,
        "max_fds_extra": fds.extra,
        "cpu_user_s": usage1.user - usage0.user,
        "cpu_sys_s": usage1.system - usage0.system,
    }


# -- baselines ---------------------------------------------------------------------------------


def _load_dict(path: str) -> dict[str, Any]:
    """``mx.load`` of a safetensors file: lazy arrays by key (the file stays open until eval)."""
    import mlx.core as mx

    arrays = mx.load(path, format="safetensors")
    assert isinstance(arrays, dict)
    return arrays


def seed(paths: ModelPaths) -> Figures:
    import mlx.core as mx

    def load() -> list[mx.array]:
        arrays: list[mx.array] = []
        for blob in _tensor_blobs(paths):
            arrays += _load_dict(blob).values()
        mx.eval(arrays)
        return arrays

    return _timed(paths, load)


def single(paths: ModelPaths) -> Figures:
    import mlx.core as mx

    def load() -> dict[str, mx.array]:
        arrays = _load_dict(paths.single)
        mx.eval(list(arrays.values()))
        return arrays

    return _timed(paths, load)


def st_numpy(paths: ModelPaths) -> Figures:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
    import mlx.core as mx
    from safetensors.numpy import load_file

    def load() -> list[mx.array]:
        arrays = []
        for blob in _tensor_blobs(paths):
            arrays += [mx.array(v) for v in load_file(blob).values()]
        mx.eval(arrays)
        return arrays

    return _timed(paths, load)


# -- asyncweights ------------------------------------------------------------------------------


def _aw_run(paths: ModelPaths, backend: str, body: Callable[[], Any]) -> Figures:
    """Run an async load under ``backend`` with the 1 ms ticker beside it."""
    import anyio
    import mlx.core as mx

    ticker = LoopTicker()
    out: Figures = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await anyio.sleep(0.01)  # the ticker is ticking before the clock starts
            mx.reset_peak_memory()
            rss0 = rss_bytes()
            usage0 = os.times()
            with FdSampler() as fds:
                start = time.perf_counter()
                extra, result = await body()
                wall = time.perf_counter() - start
            usage1 = os.times()
            tg.cancel_scope.cancel()
        out.update(_common(paths, wall, fds, usage0, usage1, rss0), **extra)
        out.update(ticker.summary())
        del result

    anyio.run(main, backend=backend)
    out["backend"] = backend
    return out


def _bench_limits() -> Any:
    """`Limits` from ``AW_BENCH_LIMITS`` (``read_chunk=262144,workers=3``), else None."""
    import asyncweights as aw

    knobs = os.environ.get("AW_BENCH_LIMITS")
    if not knobs:
        return None
    values: dict[str, Any] = {}
    for item in knobs.split(","):
        key, _, text = item.partition("=")
        values[key] = None if text == "None" else text if key == "priority" else int(text)
    return aw.Limits(**values)


def aw_load(
    paths: ModelPaths, backend: str = "asyncio", verify: bool = False, throughput: bool = False
) -> Figures:
    import asyncweights as aw

    limits = aw.Limits.throughput() if throughput else _bench_limits()

    async def body() -> tuple[Figures, object]:
        w = await aw.load_weights(paths.name, store=paths.store, verify=verify, limits=limits)
        return {"tensors": len(w)}, w

    return _aw_run(paths, backend, body)


def aw_reload(paths: ModelPaths) -> Figures:
    """A load through `WeightCache`, eviction, and the same load again: the reload's time."""
    import asyncweights as aw

    async def body() -> tuple[Figures, object]:
        async with aw.WeightCache(2 * paths.tensor_bytes, store=paths.store) as cache:
            start = time.perf_counter()
            async with cache.lease(paths.name):
                first = time.perf_counter() - start
            cache.evict()
            start = time.perf_counter()
            async with cache.lease(paths.name):
                again = time.perf_counter() - start
        return {"first_load_s": first, "reload_s": again, "reload_speedup": first / again}, None

    return _aw_run(paths, "asyncio", body)


def aw_stream(paths: ModelPaths, backend: str = "asyncio") -> Figures:
    """Streams and drops each tensor, as a converter would: memory stays bounded."""
    import asyncweights as aw

    async def body() -> tuple[Figures, object]:
        start = time.perf_counter()
        first = None
        count = 0
        limits = _bench_limits()
        async with aw.stream_weights(paths.name, store=paths.store, limits=limits) as tensors:
            async for _ in tensors:
                if first is None:
                    first = time.perf_counter() - start
                count += 1
        return {"tensors": count, "first_tensor_ms": None if first is None else first * 1e3}, None

    return _aw_run(paths, backend, body)


def aw_cancel(paths: ModelPaths, backend: str = "asyncio") -> Figures:
    """Cancels a load once 30% of the bytes are in, and looks at what remains."""
    import anyio
    import mlx.core as mx

    import asyncweights as aw

    out: Figures = {"backend": backend}
    blobs_dir = os.path.join(paths.store, "blobs")

    async def main() -> None:
        gc.collect()
        fds0, threads0, active0 = open_fds(), threading.active_count(), mx.get_active_memory()
        reached = anyio.Event()
        fraction = 0.0
        returned = 0.0
        finished = False

        async def on_progress(p: aw.Progress) -> None:
            nonlocal fraction
            if p.total_bytes and p.completed_bytes >= 0.3 * p.total_bytes and not reached.is_set():
                fraction = p.completed_bytes / p.total_bytes
                reached.set()

        async def load(scope: anyio.CancelScope) -> None:
            nonlocal returned, finished
            with scope:
                await aw.load_weights(
                    paths.name, store=paths.store, on_progress=on_progress,
                    limits=aw.Limits(progress_interval=0.0),
                )  # fmt: skip
                finished = True
            returned = time.perf_counter()

        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, scope)
            await reached.wait()
            cancelled = time.perf_counter()
            scope.cancel()
        out["finished_before_cancel"] = finished
        out["cancel_at_fraction"] = fraction
        out["cancel_latency_ms"] = (returned - cancelled) * 1e3
        out["after_blob_fds"] = blob_fds(blobs_dir)
        out["after_extra_fds"] = open_fds() - fds0
        out["after_busy_threads"] = busy_threads()
        out["after_extra_threads"] = threading.active_count() - threads0
        gc.collect()
        # A file still open here was held by garbage in a reference cycle, not by a live load.
        out["after_gc_blob_fds"] = blob_fds(blobs_dir)
        out["after_mlx_active_mib"] = (mx.get_active_memory() - active0) / 2**20
        await anyio.sleep(0.2)
        gc.collect()
        out["settled_blob_fds"] = blob_fds(blobs_dir)
        out["settled_busy_threads"] = busy_threads()
        out["settled_mlx_active_mib"] = (mx.get_active_memory() - active0) / 2**20

    anyio.run(main, backend=backend)
    return out


def aw_nofile64(paths: ModelPaths) -> Figures:
    """A plain load with RLIMIT_NOFILE lowered to 64 (soft and hard) in this process."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    figures = aw_load(paths)
    figures["nofile"] = 64
    return figures


# -- limits ------------------------------------------------------------------------------------


def _balanced(blobs: list[str], threads: int) -> list[list[str]]:
    """Split files across threads so that each reads about the same bytes."""
    shares: list[list[str]] = [[] for _ in range(threads)]
    sizes = [0] * threads
    for blob in sorted(blobs, key=os.path.getsize, reverse=True):
        i = sizes.index(min(sizes))
        shares[i].append(blob)
        sizes[i] += os.path.getsize(blob)
    return shares


def _fresh_map(size: int) -> mmap.mmap:
    """Fresh anonymous memory as malloc gets it for a large block: private, not shared.

    ``mmap.mmap(-1, n)`` defaults to ``MAP_SHARED``, which the kernel backs with shmem: first
    touch costs more there (measured on the 2-core VM: two threads reading "big" into shared
    mappings 0.88-1.27 s and 1.5-1.6 s of system time, into private ones 0.59-0.68 s and
    1.15-1.3 s, seed-style 0.67 s and 1.13-1.25 s).
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    return mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)


def _raw(paths: ModelPaths, threads: int, fresh: bool) -> Figures:
    """Read every blob whole with ``readinto``, in ``threads`` threads balanced by bytes.

    Reused memory: one 16 MiB buffer per thread. Fresh memory: a new private anonymous
    mapping per blob, all kept (4 KiB pages, no THP madvise: what MLX's allocator gets from
    malloc). Private, as `_fresh_map` says why.
    """
    blobs = _tensor_blobs(paths)
    shares = _balanced(blobs, threads)
    kept: list[list[mmap.mmap]] = [[] for _ in range(threads)]

    def read(i: int) -> None:
        buf = bytearray(_RAW_BUFFER)
        for blob in shares[i]:
            with open(blob, "rb", buffering=0) as f:
                if fresh:
                    size = os.fstat(f.fileno()).st_size
                    m = _fresh_map(max(size, 1))
                    f.readinto(memoryview(m)[:size])
                    kept[i].append(m)
                else:
                    while f.readinto(buf):
                        pass

    def load() -> None:
        workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    rss0 = rss_bytes()
    usage0 = os.times()
    with FdSampler() as fds:
        start = time.perf_counter()
        load()
        wall = time.perf_counter() - start
    usage1 = os.times()
    figures = _common(paths, wall, fds, usage0, usage1, rss0)
    for maps in kept:
        for m in maps:
            m.close()
    return figures


def memcpy(paths: ModelPaths) -> Figures:
    """Copy bandwidth between pre-faulted buffers, and first-touch fill of fresh pages."""
    import numpy as np

    n = min(512 << 20, max(64 << 20, paths.blob_bytes // 4))
    src = np.ones(n, np.uint8)
    dst = np.zeros(n, np.uint8)
    copies = []
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        copies.append(time.perf_counter() - start)
    m = _fresh_map(n)
    fresh = np.frombuffer(m, np.uint8)
    start = time.perf_counter()
    fresh.fill(1)
    fill = time.perf_counter() - start
    del fresh
    m.close()
    best = min(copies)
    return {"wall_s": best, "gbps": n / best / 1e9, "fresh_fill_gbps": n / fill / 1e9,
            "bytes": n}  # fmt: skip


def sha256(paths: ModelPaths) -> Figures:
    """SHA-256 of an in-memory buffer on one core, and on two threads at once."""
    n = 256 << 20
    data = memoryview(os.urandom(8 << 20) * (n // (8 << 20)))

    def hash_all() -> None:
        h = hashlib.sha256()
        for off in range(0, n, 8 << 20):
            h.update(data[off : off + (8 << 20)])

    start = time.perf_counter()
    hash_all()
    one = time.perf_counter() - start
    workers = [threading.Thread(target=hash_all) for _ in range(2)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    two = time.perf_counter() - start
    return {"wall_s": one, "gbps": n / one / 1e9, "gbps_2threads": 2 * n / two / 1e9, "bytes": n}


STRATEGIES: dict[str, Strategy] = {
    "aw_load": Strategy(aw_load, "asyncweights", "blobs", "asyncweights.load_weights, asyncio"),
    "aw_load_trio": Strategy(
        lambda p: aw_load(p, "trio"), "asyncweights", "blobs", "load_weights under trio"
    ),
    "aw_load_fast": Strategy(
        lambda p: aw_load(p, throughput=True),
        "asyncweights",
        "blobs",
        "load_weights with Limits.throughput()",
    ),
    "aw_stream": Strategy(
        aw_stream, "asyncweights", "blobs", "stream_weights, asyncio; each tensor dropped"
    ),
    "aw_stream_trio": Strategy(
        lambda p: aw_stream(p, "trio"), "asyncweights", "blobs", "stream_weights under trio"
    ),
    "aw_verify": Strategy(
        lambda p: aw_load(p, verify=True), "asyncweights", "blobs", "load_weights(verify=True)"
    ),
    "seed": Strategy(seed, "baseline", "blobs", "mx.load every blob lazily, one mx.eval"),
    "single": Strategy(single, "baseline", "single", "mx.load of the one-file copy, one mx.eval"),
    "st_numpy": Strategy(
        st_numpy, "baseline", "blobs", "safetensors.numpy.load_file per blob, then mx.array"
    ),
    "raw1": Strategy(lambda p: _raw(p, 1, False), "limit", "blobs", "readinto reused, 1 thread"),
    "raw2": Strategy(lambda p: _raw(p, 2, False), "limit", "blobs", "readinto reused, 2 threads"),
    "raw1_fresh": Strategy(
        lambda p: _raw(p, 1, True), "limit", "blobs", "readinto fresh memory, 1 thread"
    ),
    "raw2_fresh": Strategy(
        lambda p: _raw(p, 2, True), "limit", "blobs", "readinto fresh memory, 2 threads"
    ),
    "memcpy": Strategy(memcpy, "limit", "none", "np.copyto between pre-faulted buffers"),
    "sha256": Strategy(sha256, "limit", "none", "hashlib.sha256 of memory, one core"),
    "aw_reload": Strategy(
        aw_reload, "check", "blobs", "WeightCache: load, evict, load again (reload time)"
    ),
    "aw_cancel": Strategy(aw_cancel, "check", "blobs", "cancel load_weights at 30% of bytes"),
    "aw_cancel_trio": Strategy(
        lambda p: aw_cancel(p, "trio"), "check", "blobs", "the same cancel under trio"
    ),
    "aw_nofile64": Strategy(aw_nofile64, "check", "blobs", "load_weights under ulimit -n 64"),
}
