"""The range-read mechanism: MLX arrays filled from byte ranges of open files."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from asyncweights._vfile import (
    _MLX_HELD,
    ArrayRequest,
    Digest,
    FillCancelled,
    FillError,
    Span,
    VirtualFile,
    _layout,
    _wait_for_mlx_threads,
    fill_arrays,
    lower_thread_priority,
    mlx_fills_through_readinto,
    reader_pool,
)


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """An open descriptor on 3 MiB + 13 bytes of random data, and those bytes."""
    data = np.random.default_rng(7).integers(0, 256, (3 << 20) + 13, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, data
    finally:
        os.close(fd)


def raw(array: mx.array) -> bytes:
    return bytes(memoryview(array))  # type: ignore[arg-type, unused-ignore]


def test_mlx_reads_tensor_data_through_readinto() -> None:
    # The MLX behaviour the library relies on: mx.load(file object) allocates each array
    # and fills it with readinto on the object, with MLX's own writable memory.
    data = bytes(range(256)) * 3
    layout = _layout([ArrayRequest("x", mx.uint8, (768,), [Span(-1, 0, 768, data=data)])], 0)
    vfile = VirtualFile(layout, chunk=100, cancel=None, reader=None)
    loaded = mx.load(vfile, format="safetensors")  # type: ignore[arg-type]
    assert isinstance(loaded, dict)
    assert vfile.calls == 1
    assert raw(loaded["0"]) == data
    assert mlx_fills_through_readinto() is True


@pytest.mark.parametrize("pack_upto", [0, 1 << 20, 1 << 30])
@pytest.mark.parametrize("chunk", [4093, 1 << 20])
def test_fill_is_bit_exact_for_every_dtype(
    data_file: tuple[int, bytes], pack_upto: int, chunk: int
) -> None:
    fd, data = data_file
    cases = [
        ("f32", mx.float32, (3, 5), np.float32),
        ("bf16", mx.bfloat16, (7,), np.uint16),
        ("f16", mx.float16, (2, 2, 2), np.float16),
        ("i64", mx.int64, (4,), np.int64),
        ("u8", mx.uint8, (1 << 20) + 5, np.uint8),
        ("bool", mx.bool_, (9,), np.uint8),
        ("c64", mx.complex64, (3,), np.complex64),
        ("scalar", mx.int32, (), np.int32),
        ("big", mx.float32, (256, 1024), np.float32),
    ]
    requests = []
    offset = 1
    for key, dtype, shape, _ in cases:
        shape = shape if isinstance(shape, tuple) else (shape,)
        n = dtype.size * int(np.prod(shape))
        requests.append(ArrayRequest(key, dtype, shape, [Span(fd, offset, n)]))
        offset += n + 3
    reader = reader_pool("test-fill", 2)
    arrays = fill_arrays(requests, pack_upto=pack_upto, chunk=chunk, reader=reader)
    for request, (key, dtype, _, np_dtype) in zip(requests, cases, strict=True):
        array = arrays[key]
        span = request.spans[0]
        assert array.dtype == dtype
        assert tuple(array.shape) == request.shape
        expected = data[span.offset : span.offset + span.length]
        assert raw(array) == expected, key
        if dtype not in (mx.bfloat16, mx.bool_):
            want: Any = np.frombuffer(expected, np_dtype).reshape(request.shape)
            np.testing.assert_array_equal(np.array(array), want)


def test_spans_are_concatenated_so_a_column_block_loads_from_row_ranges(
    data_file: tuple[int, bytes],
) -> None:
    # A [rows, cols] float32 matrix at offset 64; take columns 3..7 of every row.
    fd, data = data_file
    rows, cols = 50, 40
    matrix = np.frombuffer(data, np.float32, rows * cols, 64).reshape(rows, cols)
    spans = [Span(fd, 64 + (r * cols + 3) * 4, 4 * 4) for r in range(rows)]
    arrays = fill_arrays([ArrayRequest("w", mx.float32, (rows, 4), spans)], chunk=5)
    np.testing.assert_array_equal(np.array(arrays["w"]), matrix[:, 3:7])


def test_in_memory_spans_and_empty_arrays(data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    blob = b"\x01\x02\x03\x04" * 8
    requests = [
        ArrayRequest("mem", mx.uint32, (2, 4), [Span(-1, 0, 32, data=blob)]),
        ArrayRequest("empty", mx.float16, (0, 3), []),
        ArrayRequest("file", mx.uint8, (10,), [Span(fd, 100, 10)]),
    ]
    arrays = fill_arrays(requests, pack_upto=64)
    assert raw(arrays["mem"]) == blob
    assert tuple(arrays["empty"].shape) == (0, 3)
    assert arrays["empty"].dtype == mx.float16
    assert raw(arrays["file"]) == data[100:110]


def test_small_arrays_share_one_buffer_and_large_ones_get_their_own(
    data_file: tuple[int, bytes],
) -> None:
    fd, _ = data_file
    requests = [
        ArrayRequest("a", mx.uint8, (10,), [Span(fd, 0, 10)]),
        ArrayRequest("b", mx.uint8, (100,), [Span(fd, 10, 100)]),
        ArrayRequest("c", mx.uint8, (5000,), [Span(fd, 110, 5000)]),
    ]
    layout = _layout(requests, pack_upto=1000)
    # c alone, then a and b at 0 and 64: 164 bytes, padded to a whole number of 8 so the
    # shared buffer can be viewed as any dtype
    assert layout.buffers == [(0, 5000), (5000, 168)]
    assert layout.data_size == 5168
    assert layout.places == {"c": (0, 0), "a": (1, 0), "b": (1, 64)}


def test_digest_hashes_the_bytes_that_land_in_the_arrays(
    data_file: tuple[int, bytes],
) -> None:
    fd, data = data_file
    prefix = data[:16]
    good = Digest("sha256:" + hashlib.sha256(data).hexdigest(), prefix, len(data))
    # Two tensors of one file: the large one in its own buffer, which MLX may read first.
    middle = 16 + 1000
    requests = [
        ArrayRequest("head", mx.uint8, (1000,), [Span(fd, 16, 1000, digest=good)]),
        ArrayRequest(
            "tail",
            mx.uint8,
            (len(data) - middle,),
            [Span(fd, middle, len(data) - middle, digest=good)],
        ),
    ]
    fill_arrays(requests, pack_upto=1000, chunk=1 << 16)
    assert good.complete
    assert good.matches
    bad = Digest("sha256:" + "0" * 64, prefix, len(data))
    span = Span(fd, 16, len(data) - 16, digest=bad)
    fill_arrays([ArrayRequest("all", mx.uint8, (len(data) - 16,), [span])], chunk=1 << 20)
    assert bad.complete
    assert not bad.matches
    assert bad.actual() == good.expected


def test_cancel_stops_between_chunks_and_frees_the_buffers(
    data_file: tuple[int, bytes],
) -> None:
    fd, _ = data_file
    cancel = threading.Event()
    calls: list[int] = []

    def ready(end: int) -> None:
        calls.append(end)
        if len(calls) == 3:
            cancel.set()  # the third chunk is read, the fourth is not

    span = Span(fd, 0, 3 << 20, ready=ready)
    mx.clear_cache()
    before = mx.get_active_memory()
    with pytest.raises(FillCancelled):
        fill_arrays([ArrayRequest("x", mx.uint8, (3 << 20,), [span])], chunk=1 << 18, cancel=cancel)
    assert calls == [1 << 18, 2 << 18, 3 << 18]
    assert mx.get_active_memory() == before


def test_short_file_and_read_errors_are_fill_errors(
    data_file: tuple[int, bytes], tmp_path: Path
) -> None:
    fd, data = data_file
    past_end = Span(fd, len(data) - 10, 20, tag="blob-a")
    with pytest.raises(FillError, match="file ended early") as info:
        fill_arrays([ArrayRequest("x", mx.uint8, (20,), [past_end])])
    assert info.value.span is past_end
    closed = os.open(tmp_path / "blob", os.O_RDONLY)
    os.close(closed)
    with pytest.raises(FillError, match="cannot read") as info:
        fill_arrays([ArrayRequest("y", mx.uint8, (8,), [Span(closed, 0, 8)])])
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EBADF


def test_spans_must_cover_the_array_exactly(data_file: tuple[int, bytes]) -> None:
    fd, _ = data_file
    with pytest.raises(ValueError, match="'x' needs 8 bytes, its spans hold 4"):
        fill_arrays([ArrayRequest("x", mx.float32, (2,), [Span(fd, 0, 4)])])


def test_reader_threads_run_at_idle_priority() -> None:
    def policy() -> tuple[int, int]:
        return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    got = reader_pool("test-priority", 1).submit(policy).result()
    if hasattr(os, "SCHED_IDLE"):
        assert got[0] == os.SCHED_IDLE
    else:
        assert got[1] == 19
    # The calling thread is left as it was.
    assert os.sched_getscheduler(0) != getattr(os, "SCHED_IDLE", -1)
    assert callable(lower_thread_priority)  # the same function every pool thread starts with


def test_exit_waits_until_mlx_threads_let_go_of_the_file_objects(
    data_file: tuple[int, bytes],
) -> None:
    # MLX drops its references to a file object in its own threads, shortly after mx.load
    # returned; one still doing so while the interpreter shuts down aborts the process.
    fd, _ = data_file
    for _ in range(20):
        fill_arrays([ArrayRequest("x", mx.uint8, (4096,), [Span(fd, 0, 4096)])])
    held = _wait_for_mlx_threads()
    assert held == 0  # what the exit handler runs
    assert _MLX_HELD == []


def test_array_request_size_is_computed_once_from_dtype_and_shape() -> None:
    spans = [Span(-1, 0, 6), Span(-1, 6, 24)]
    request = ArrayRequest("w", mx.float16, (3, 5), spans)
    assert request.nbytes == 30
    assert ArrayRequest("s", mx.float32, (), []).nbytes == 4
    assert ArrayRequest("e", mx.bfloat16, (0, 7), []).nbytes == 0
    with pytest.raises(TypeError):
        ArrayRequest("w", mx.uint8, (2,), [], nbytes=2)  # type: ignore[call-arg]
    # Two spans add up to the request's size; one span short of it is refused by name.
    assert _layout([request], 0).buffers == [(0, 30)]
    short = ArrayRequest("w", mx.float16, (3, 5), spans[:1])
    with pytest.raises(ValueError, match="'w' needs 30 bytes, its spans hold 6"):
        _layout([short], 0)
