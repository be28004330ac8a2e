"""Getting a blob's tensor bytes into MLX arrays: two paths, both blocking (worker threads).

* Small blobs are read whole with one ``pread`` and copied into MLX arrays: about 8 µs a
  blob, against about 40 µs for ``mx.load`` (which reparses the header and keeps a file
  handle until evaluated). The bytes read are the bytes hashed when verifying.
* Large blobs go through ``mx.load``, whose parallel ``pread`` into fresh MLX buffers was
  measured fastest for bulk data (about 2x a read into pre-zeroed MLX memory here).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from ._errors import (
    AsyncWeightsError,
    BlobError,
    DigestMismatchError,
)
from ._files import StoreFile, _read_error, open_file
from ._ggml import TARGETS, convert_blocks, read_raw
from ._gguf import GGUFFile
from ._header import DTYPES
from ._plan import BlobPlan

__all__ = ["read_direct", "read_gguf", "read_lazy", "read_shard", "verify_file"]


def read_direct(blob: BlobPlan, model: str, *, verify: bool) -> dict[str, mx.array]:
    """Build a small blob's arrays from its bytes: those planning read, else read now."""
    data: bytes | bytearray | None = blob.data
    blob.data = None  # loaded once; the arrays below own copies
    if data is None:
        data = _read_again(blob, model)
    if verify:
        _check_digest(hashlib.sha256(data), blob, model)
    view = memoryview(data)
    arrays: dict[str, mx.array] = {}
    start = blob.header.data_start
    for tensor in blob.tensors:
        if tensor.key in arrays:
            continue
        entry = tensor.entry
        fmt, dtype = DTYPES[entry.dtype].format, DTYPES[entry.dtype].mlx
        # The buffer arrives with its shape; only dtypes the buffer protocol cannot spell
        # (bfloat16, float16, complex64) need a view. MLX copies the bytes.
        part = view[start + entry.begin : start + entry.end]
        # MLX copies any buffer-protocol object (its stubs list none, hence the ignores).
        if entry.shape and all(entry.shape):
            raw = mx.array(part.cast(fmt, entry.shape))  # type: ignore[arg-type]
        else:  # memoryview cannot cast to a scalar or an empty shape
            raw = mx.array(part.cast(fmt)).reshape(entry.shape)  # type: ignore[arg-type]
        arrays[tensor.key] = raw if raw.dtype == dtype else raw.view(dtype)
    return arrays


def _read_again(blob: BlobPlan, model: str) -> bytes:
    """Read a small blob whole, proving it is still the file whose header was validated."""
    header = blob.header
    try:
        with open_file(blob.path, "blob") as f:
            data = f.read_all() if f.size == header.file_size else None
    except AsyncWeightsError as exc:
        exc.add_context(model=model, digest=blob.digest)
        raise
    if data is None or data[: header.data_start] != header.raw:
        # Not the file whose header was validated: never load bytes nobody checked.
        raise BlobError(
            "blob changed while loading", model=model, digest=blob.digest, path=blob.path
        )
    return data


def read_lazy(blob: BlobPlan, model: str) -> dict[str, mx.array]:
    """Open a blob with ``mx.load``: arrays are read when evaluated, in MLX's thread pool."""
    path = os.fspath(blob.path)
    try:
        loaded = mx.load(path, format="safetensors")
    except RuntimeError as exc:
        # MLX's message has no errno: open the file ourselves to learn the real cause.
        try:
            open_file(path, "blob", expected_size=blob.header.file_size).close()
        except AsyncWeightsError as typed:
            typed.add_context(model=model, digest=blob.digest)
            raise typed from exc
        raise BlobError(
            f"cannot open blob: {exc}", model=model, digest=blob.digest, path=blob.path
        ) from exc
    assert isinstance(loaded, dict)
    arrays: dict[str, mx.array] = loaded
    for tensor in blob.tensors:
        array = arrays.get(tensor.key)
        if (
            array is None
            or tuple(array.shape) != tensor.entry.shape
            or array.dtype != DTYPES[tensor.entry.dtype].mlx
        ):
            raise BlobError(
                "blob changed while loading", model=model, tensor=tensor.name,
                digest=blob.digest, path=blob.path,
            )  # fmt: skip
    return arrays


def read_shard(blob: BlobPlan, model: str) -> dict[str, mx.array]:
    """Read a sharded load's tensors of one blob: each tensor's spans (its whole bytes, or
    the rank's slice) read with ``preadv`` straight into a fresh MLX array.

    The file is opened once and proved to be the one planned (its size and header bytes).
    Each array is allocated, evaluated, and filled through its writable buffer; a row
    split is one read, stacked experts one read per expert, a column split one read per row
    (each as large as the rank's part of the row: measured faster than reading whole rows
    and slicing them while a rank keeps at least 1/8 of a row, see bench/README.md).
    """
    header = blob.header
    arrays: dict[str, mx.array] = {}
    try:
        with open_file(blob.path, "blob", expected_size=header.file_size) as f:
            if f.read(header.data_start, 0) != header.raw:
                raise BlobError(
                    "blob changed while loading", model=model, digest=blob.digest, path=blob.path
                )
            for tensor in blob.tensors:
                if tensor.key in arrays:
                    continue
                entry = tensor.entry
                kind = DTYPES[entry.dtype]
                piece = tensor.slice
                if piece is None:
                    shape, spans = entry.shape, [(0, entry.nbytes)]
                else:
                    shape, spans = piece.shape, piece.spans(kind.size)
                nbytes = sum(n for _, n in spans)
                flat = mx.zeros((nbytes,), dtype=mx.uint8)
                mx.eval(flat)
                if nbytes:
                    view = memoryview(flat).cast("B")  # type: ignore[arg-type, unused-ignore]
                    try:
                        _read_spans(f, view, header.data_start + entry.begin, spans)
                    except _ShortRead:
                        raise BlobError(
                            "blob changed while loading: file ended early", model=model,
                            tensor=tensor.name, digest=blob.digest, path=blob.path,
                        ) from None  # fmt: skip
                    finally:
                        view.release()
                array = flat if kind.mlx == mx.uint8 else flat.view(kind.mlx)
                arrays[tensor.key] = array.reshape(shape)
    except AsyncWeightsError as exc:
        exc.add_context(model=model, digest=blob.digest)
        raise
    mx.eval(list(arrays.values()))
    return arrays


class _ShortRead(Exception):
    pass


def _read_spans(f: StoreFile, view: memoryview, base: int, spans: list[tuple[int, int]]) -> None:
    """Fill `view` with the file's `spans` (offsets from `base`), in order.

    A column split makes one span per row: thousands of small reads, so the loop calls
    ``os.preadv`` itself (the Python around each call costs as much as the call).
    """
    if len(spans) == 1:
        offset, length = spans[0]
        if f.read_into(view, base + offset) != length:
            raise _ShortRead
        return
    fd, preadv = f.fd, os.preadv
    at = 0
    try:
        for offset, length in spans:
            end = at + length
            got = preadv(fd, [view[at:end]], base + offset)
            if got != length:  # a short read from a regular file: finish it the slow way
                rest = f.read_into(view[at + got : end], base + offset + got)
                if got + rest != length:
                    raise _ShortRead
            at = end
    except OSError as exc:
        raise _read_error(exc, f) from exc


_HASH_CHUNK = 8 << 20


def verify_file(blob: BlobPlan, model: str) -> None:
    """Hash a blob's file in chunks (hashlib releases the GIL) and compare with its digest."""
    digest = hashlib.sha256()
    try:
        with open_file(blob.path, "blob", expected_size=blob.header.file_size) as f:
            buf = bytearray(_HASH_CHUNK)
            view = memoryview(buf)
            offset = 0
            while n := f.read_into(buf, offset):
                digest.update(view[:n])
                offset += n
    except AsyncWeightsError as exc:
        exc.add_context(model=model, digest=blob.digest)
        raise
    _check_digest(digest, blob, model)


def _check_digest(digest: hashlib._Hash, blob: BlobPlan, model: str) -> None:
    actual = "sha256:" + digest.hexdigest()
    if actual != blob.digest:
        raise DigestMismatchError(
            f"blob bytes hash to {actual}", model=model, digest=blob.digest, path=blob.path
        )


# ------------------------------------------------------------------------------------- GGUF


def read_gguf(parts: list[BlobPlan], model: str) -> list[dict[str, mx.array]]:
    """Load GGUF parts (one tensor each) by byte range and convert them: arrays per part.

    Each blob file is opened once for the call and proved to be the file planned (size and
    the header bytes that place the data). Raw types are read straight into fresh MLX
    arrays; block types are read a cache-sized chunk at a time and converted (numpy) into
    fresh MLX arrays. (Not through `_vfile.fill_arrays`: with mlx 0.32.4 a process that used
    it aborted at exit in about 1 run of 4 here, "terminate called without an active
    exception"; these reads never did in the same runs.)
    """
    files: dict[str, StoreFile] = {}
    out: list[dict[str, mx.array]] = []
    try:
        for part in parts:
            assert part.gguf is not None
            if part.path not in files:
                files[part.path] = _open_gguf(part, part.gguf, model)
        for part in parts:
            info = part.tensors[0].source
            assert info is not None
            assert part.gguf is not None
            read = _reader(files[part.path], part.gguf.data_start + info.offset, part, model)
            if TARGETS[info.ggml_type].kind == "raw":
                made = [read_raw(info, read)]
            else:
                made = convert_blocks(info, read)
            out.append({t.key: a for t, a in zip(part.tensors, made, strict=True)})
    finally:
        for f in files.values():
            f.close()
    return out


def _reader(f: StoreFile, start: int, part: BlobPlan, model: str) -> Callable[[Any, int], None]:
    """``read(buffer, at)``: the tensor's bytes from `at` into `buffer`, all of them."""

    def read(buffer: Any, at: int) -> None:
        try:
            got = f.read_into(buffer, start + at)
        except AsyncWeightsError as exc:
            exc.add_context(model=model, tensor=part.tensors[0].name, digest=part.digest)
            raise
        if got != len(buffer):
            raise BlobError(
                "blob changed while loading: file ended early", model=model,
                tensor=part.tensors[0].name, digest=part.digest, path=part.path,
            )  # fmt: skip

    return read


def _open_gguf(part: BlobPlan, gguf: GGUFFile, model: str) -> StoreFile:
    """Open a GGUF blob and check it is still the file planned: its size, its first bytes
    and the tensor infos (which place every tensor's bytes)."""
    try:
        f = open_file(part.path, "blob", expected_size=gguf.file_size)
    except AsyncWeightsError as exc:
        exc.add_context(model=model, digest=part.digest)
        raise
    try:
        tail = len(gguf.raw) - gguf.infos_start
        same = (
            f.read(24, 0) == gguf.raw[:24]
            and f.read(tail, gguf.infos_start) == gguf.raw[gguf.infos_start :]
        )
    except AsyncWeightsError as exc:
        f.close()
        exc.add_context(model=model, digest=part.digest)
        raise
    if not same:
        f.close()
        raise BlobError(
            "blob changed while loading", model=model, digest=part.digest, path=part.path
        )
    return f
