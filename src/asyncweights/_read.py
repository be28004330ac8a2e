"""Everything of a load that blocks, run in worker threads; nothing here awaits.

Planning reads (`read_heads`, `gguf_header`), loading and evaluating one group of blobs
(`load_group`, in the long-lived `reader_threads`), and hashing blobs beside the
evaluation (`Hashing`). The async side, `_load`, only schedules these calls.

Getting a blob's tensor bytes into MLX arrays:

`fill_group` is the read path for safetensors blobs: each blob of a group is opened once,
proven to be the file whose header planning validated, and its tensors' byte ranges are
read straight into fresh MLX memory by `fill_arrays` (every tensor of the group packed into
one buffer by default), hashing those very bytes when verifying. Should MLX stop filling
through ``readinto``, the two older paths below take over:

* Small blobs are read whole with one ``pread`` and copied into MLX arrays: about 8 µs a
  blob, against about 40 µs for ``mx.load`` (which reparses the header and keeps a file
  handle until evaluated). The bytes read are the bytes hashed when verifying.
* Large blobs go through ``mx.load``, whose parallel ``pread`` into fresh MLX buffers was
  measured fastest for bulk data (about 2x a read into pre-zeroed MLX memory here).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ._errors import (
    AsyncWeightsError,
    BlobError,
    BlobMissingError,
    BudgetError,
    DigestMismatchError,
    LoadError,
    QuantizationError,
)
from ._files import StoreFile, _read_error, open_file
from ._gguf import GGUFFile, read_gguf_header
from ._header import DTYPES, BlobHeader, head_of
from ._limits import Limits
from ._manifest import Layer
from ._plan import (
    BlobPlan,
    Hints,
    Namer,
    PlannedTensor,
    load_units,
    model_quantization,
    resolve_tensors,
    set_nbytes,
)
from ._quant import Quantization
from ._vfile import (
    ArrayRequest,
    Digest,
    FillError,
    Span,
    fill_arrays,
    mlx_fills_through_readinto,
    reader_pool,
    start_every_thread,
)
from ._weights import Tensor, TensorInfo

__all__ = [
    "StreamPlanner",
    "close_files",
    "fill_group",
    "mlx_error",
    "open_blob",
    "read_direct",
    "read_gguf",
    "read_lazy",
    "read_shard",
    "verify_file",
]


#: threads that read for every load of the process (idle priority when responsive): one
#: read in flight per group being loaded, so more than any sensible `Limits.workers`
_FILL_THREADS = 16
_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)


def open_blob(blob: BlobPlan, model: str) -> StoreFile:
    """Open a blob for reading and prove it is the file whose header planning validated.

    Returns:
        The open file (the caller closes it); every byte loaded comes through its fd.

    Raises:
        BlobMissingError, LoadError (with errno): the file cannot be opened or read.
        BlobError: not a regular file, or its size or header differs from what was
            planned ("blob changed while loading").
    """
    header = blob.header
    try:
        f = open_file(blob.path, "blob")
    except AsyncWeightsError as exc:
        exc.add_context(model=model, digest=blob.digest)
        raise
    try:
        same = f.size == header.file_size and f.read(header.data_start, 0) == header.raw
    except AsyncWeightsError as exc:
        f.close()
        exc.add_context(model=model, digest=blob.digest)
        raise
    if not same:
        f.close()
        raise BlobError(
            "blob changed while loading", model=model, digest=blob.digest, path=blob.path
        )
    return f


def fill_group(
    group: list[BlobPlan],
    model: str,
    *,
    verify: bool,
    limits: Limits,
    cancel: threading.Event | None,
) -> list[tuple[PlannedTensor, mx.array]]:
    """Read a group's tensors into evaluated MLX arrays, each blob through one descriptor.

    Blobs whose bytes planning kept are copied from those bytes; the others are opened
    here (`open_blob`). With `verify`, each blob's SHA-256 covers the validated header
    and exactly the bytes that landed in the arrays.

    Raises:
        BlobError (changed or shrunk under the load), DigestMismatchError, BlobMissingError,
        LoadError (I/O, with errno), BudgetError (MLX could not allocate).
    """
    files: list[StoreFile] = [blob.file for blob in group if blob.file is not None]
    requests: list[ArrayRequest] = []
    digests: list[Digest] = []
    keys: list[tuple[PlannedTensor, str]] = []
    read_from: list[tuple[StoreFile, BlobPlan]] = []
    try:
        for index, blob in enumerate(group):
            data, blob.data = blob.data, None  # loaded once; the arrays own copies
            fd = -1
            if data is None:
                # The descriptor planning validated the header through, else a fresh open
                # proved to be the same file.
                f, blob.file = blob.file, None
                if f is None:
                    f = open_blob(blob, model)
                    files.append(f)  # a held one is in `files` already
                read_from.append((f, blob))
                fd = f.fd
                if _WILLNEED is not None:
                    # Start the kernel reading the whole group while the first blob is
                    # copied: cold loads overlap disk reads (1.29 -> 1.36x seed measured).
                    os.posix_fadvise(fd, blob.header.data_start, 0, _WILLNEED)
            header = blob.header
            digest = None
            if verify:
                digest = Digest(blob.digest, header.raw, header.file_size, tag=blob)
                digests.append(digest)
            made: set[str] = set()
            for tensor in blob.tensors:
                entry = tensor.entry
                key = f"{index}/{tensor.key}"
                keys.append((tensor, key))
                if key in made:
                    continue
                made.add(key)
                start = header.data_start + entry.begin
                span = Span(fd, start, entry.end - entry.begin, data, digest, tag=blob)
                requests.append(ArrayRequest(key, DTYPES[entry.dtype].mlx, entry.shape, [span]))
            if digest is not None:
                # Hash every byte of the file: tensors the load does not take included.
                for entry in header.entries.values():
                    if entry.key not in made and f"{index}/{entry.key}" not in made:
                        start = header.data_start + entry.begin
                        span = Span(fd, start, entry.end - entry.begin, data, digest, tag=blob)
                        shape = (entry.end - entry.begin,)
                        requests.append(
                            ArrayRequest(f"{index}//{entry.key}", mx.uint8, shape, [span])
                        )
        try:
            arrays = fill_arrays(
                requests,
                pack_upto=1 << 62 if limits.pack_bytes is None else limits.pack_bytes,
                chunk=limits.chunk_bytes,
                cancel=cancel,
                reader=reader_pool("fill", _FILL_THREADS, limits.priority),
            )
        except FillError as exc:
            raise _fill_error(exc, group, model) from exc.__cause__ or exc
        except RuntimeError as exc:
            raise mlx_error(exc, group, model) from exc
        for f, blob in read_from if not verify else ():
            # Written in place while it was read: the arrays may mix two versions (with
            # `verify` the digest below is exact and says so).
            if not f.unchanged():
                raise BlobError(
                    "blob changed while loading", model=model, digest=blob.digest, path=blob.path
                )
    finally:
        for f in files:
            f.close()
    for digest in digests:
        if not digest.matches:
            blob = digest.tag
            raise DigestMismatchError(
                f"blob bytes hash to {digest.actual()}",
                model=model, digest=blob.digest, path=blob.path,
            )  # fmt: skip
    return [(tensor, arrays[key]) for tensor, key in keys]


def _fill_error(exc: FillError, group: list[BlobPlan], model: str) -> AsyncWeightsError:
    blob = exc.span.tag if exc.span is not None else (group[0] if len(group) == 1 else None)
    cause = exc.__cause__
    if isinstance(blob, BlobPlan) and "file ended early" in str(exc):
        return BlobError(
            "blob changed while loading", model=model, digest=blob.digest, path=blob.path
        )
    return LoadError(
        f"cannot read blob: {cause.strerror}" if isinstance(cause, OSError) else str(exc),
        model=model,
        digest=None if blob is None else blob.digest,
        path=None if blob is None else blob.path,
        errno=cause.errno if isinstance(cause, OSError) else None,
    )


def mlx_error(exc: RuntimeError, group: list[BlobPlan], model: str) -> AsyncWeightsError:
    """MLX's RuntimeError from loading or evaluating a group, as a typed error."""
    if "Unable to allocate" in str(exc):
        return BudgetError(f"out of memory evaluating tensors: {exc}", model=model)
    only = group[0] if len(group) == 1 else None
    return LoadError(
        f"reading tensors failed: {exc}",
        model=model,
        digest=None if only is None else only.digest,
        path=None if only is None else only.path,
    )


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
    (each as large as the rank's part of the row). Per-row reads were measured against
    reading whole rows and slicing them (bench/README.md, "Loading across machines"): as much
    CPU or less, and only 1/world of the bytes.
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
    from ._ggml import TARGETS, convert_blocks, read_raw  # numpy: GGUF models only

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


# --------------------------------------------------------------------------- planning reads


def read_heads(
    batch: list[str],
    *,
    label: str,
    paths: dict[str, str],
    sizes: dict[str, int],
    names: dict[str, str | None],
    budget: list[int],
    limits: Limits,
    headers: dict[str, BlobHeader],
    contents: dict[str, bytes | bytearray],
) -> None:
    """Read and validate the headers of a batch of blobs into `headers` (blocking).

    A blob of at most ``limits.direct_read_bytes`` is read whole, into `contents`, while
    `budget` (shared by the batches of one plan; a rough bound is enough) allows.
    """
    for digest in batch:
        whole = limits.direct_read_bytes if budget[0] >= sizes[digest] else 0
        headers[digest], data, _ = read_head(
            label, digest, paths, sizes[digest], names[digest], whole, limits, keep_open=False
        )
        if data is not None:
            contents[digest] = data
            budget[0] -= len(data)


def read_head(
    label: str,
    digest: str,
    paths: dict[str, str],
    size: int,
    name: str | None,
    whole_upto: int,
    limits: Limits,
    *,
    keep_open: bool,
) -> tuple[BlobHeader, bytes | bytearray | None, StoreFile | None]:
    """One blob's validated header (blocking), and its bytes when read whole.

    With `keep_open`, a blob not read whole stays open and is returned: its header was
    proved through that descriptor, and the load reads the data through it. ``paths`` is
    updated where a blob is found under Ollama's old name.

    Raises:
        BlobMissingError, BlobError, SizeMismatchError, HeaderError, LoadError (errno).
    """
    path = paths[digest]
    try:
        try:
            f = open_file(path, "blob", expected_size=size)
        except BlobMissingError:
            # Ollama before 0.1.30 named blobs sha256:<hex>; read them where they are.
            old = path[: -len(digest)] + "sha256:" + digest[7:]
            if not os.path.exists(old):
                raise
            path = paths[digest] = old
            f = open_file(path, "blob", expected_size=size)
        try:
            header, data = head_of(f, whole_upto=whole_upto, limits=limits, fresh=keep_open)
        except BaseException:
            f.close()
            raise
        if data is not None or not keep_open:
            f.close()
            return header, data, None
        return header, None, f
    except AsyncWeightsError as exc:
        exc.add_context(model=label, digest=digest, path=path, tensor=name)
        raise
    except OSError as exc:
        raise LoadError(
            f"cannot read blob header: {exc.strerror}",
            model=label,
            tensor=name,
            digest=digest,
            path=path,
            errno=exc.errno,
        ) from exc


class StreamPlanner:
    """Plans a safetensors load group by group, in load order, for a streamed load.

    Each `next_group` call (blocking; one at a time, in a worker thread) reads and checks
    the headers of the next group's blobs only, names their tensors and resolves their
    quantization, so the first group is loaded while later headers are still unread.
    Layers are taken in `load_units` (a packed weight with its scales and biases), and a
    group is cut only between units, bounded as `group_blobs` bounds them (bytes from the
    manifest's sizes, open files). Small blobs are read whole (up to
    ``min(direct_read_bytes, prefetch_bytes)``); every other blob stays open
    on the descriptor its header was proved through (`BlobPlan.file`), which the load reads
    from and closes: each blob is opened once.

    What needs every header is checked when the last group has been handed out, before
    `next_group` returns None: duplicate names are checked as each layer is named, and
    quantization read across groups must agree with the per-group reading.
    """

    def __init__(
        self,
        label: str,
        component: str | None,
        layers: list[Layer],
        paths: dict[str, str],
        hints: Hints,
        limits: Limits,
        files: int,
    ) -> None:
        self._label = label
        self._paths = paths
        self._hints = hints
        self._limits = limits
        self._files = files
        self._namer = Namer(label, component)
        self._sizes = {layer.digest: layer.size for layer in layers}
        self._names = {layer.digest: layer.name for layer in reversed(layers)}
        self._first = {layer.digest: i for i, layer in reversed(list(enumerate(layers)))}
        self._next: list[Layer] | None = None
        self._cap = max(1, limits.group_bytes // 32)
        self._units = iter(_small_first(load_units(layers), self._sizes, self._cap))
        # Small blobs are read whole (and closed) while planning. Only the groups in flight
        # hold such bytes, so `prefetch_bytes` bounds each blob rather than the model.
        self._whole = min(limits.direct_read_bytes, limits.prefetch_bytes)
        self._found: list[Quantization] = []
        self._group_of: dict[str, int] = {}  # tensor name -> group index
        #: every blob handed out, in load order, and the groups
        self.blobs: list[BlobPlan] = []
        self.groups: list[list[BlobPlan]] = []
        self.quantization: Quantization | None = None
        self._finished = False

    def next_group(self) -> list[BlobPlan] | None:
        """The next group, planned and with its headers checked; None once every group was
        handed out and the whole-model checks passed.

        Raises:
            The errors of `read_head`, `Namer.add` and `resolve_tensors`.
        """
        if self._finished:
            return None
        group: list[BlobPlan] = []
        size = held = 0
        try:
            while True:
                unit = self._next if self._next is not None else next(self._units, None)
                self._next = None
                if unit is None:
                    break
                if len(unit) == 1:  # the common unit: one layer, no set or generators
                    digest = unit[0].digest
                    unit_bytes = 0 if digest in self._namer.blobs else self._sizes[digest]
                    unit_held = int(unit_bytes > self._whole)
                else:
                    fresh = {x.digest for x in unit if x.digest not in self._namer.blobs}
                    unit_bytes = sum(self._sizes[d] for d in fresh)
                    unit_held = sum(self._sizes[d] > self._whole for d in fresh)
                if group and (
                    size + unit_bytes > self._cap or (unit_held and held + unit_held > self._files)
                ):
                    self._next = unit  # the next group's first unit
                    break
                for layer in unit:
                    self._add(layer, group)
                size += unit_bytes
                held += unit_held
        except BaseException:
            close_files(group)
            raise
        if not group:
            self._finish()
            return None
        return self._hand_out(group)

    def _add(self, layer: Layer, group: list[BlobPlan]) -> None:
        namer = self._namer
        digest = layer.digest
        known = namer.blobs.get(digest)
        if known is not None:  # read for this group already
            namer.add(layer, known.header, known.path)
            return
        header, data, f = read_head(
            self._label, digest, self._paths, self._sizes[digest], self._names[digest],
            self._whole, self._limits, keep_open=True,
        )  # fmt: skip
        try:
            blob = namer.add(layer, header, self._paths[digest])
        except BaseException:
            if f is not None:
                f.close()
            raise
        if blob is None:  # named for this component by an earlier group already
            if f is not None:
                f.close()
            return
        blob.data, blob.file = data, f
        group.append(blob)

    def _hand_out(self, group: list[BlobPlan]) -> list[BlobPlan]:
        namer = self._namer
        out: list[BlobPlan] = []
        for blob in group:
            del namer.blobs[blob.digest]  # a later layer of this digest gets its own plan
            set_nbytes(blob)
            if blob.tensors:
                out.append(blob)
            elif blob.file is not None:
                blob.file.close()
                blob.file = None
        index = len(self.groups)
        try:
            self._found += resolve_tensors(self._label, out, *self._hints)
        except BaseException:
            close_files(out)
            raise
        for blob in out:
            for tensor in blob.tensors:
                self._group_of[tensor.name] = index
        self.groups.append(out)
        self.blobs += out
        self._cap = min(self._limits.group_bytes, self._cap * 2)
        return out

    def _finish(self) -> None:
        """The checks that need every header, once every group was handed out."""
        self._finished = True
        group_of = self._group_of
        split = False
        for name, index in group_of.items():
            if not name.endswith(_QUANT_SUFFIXES):  # one call for the common case
                continue
            for suffix in _QUANT_SUFFIXES:
                if name.endswith(suffix):
                    base = group_of.get(name[: -len(suffix)])
                    split = split or (base is not None and base != index)
        if split:
            # A weight and a companion were planned in different groups: read the model
            # whole and make sure each group was read the same way.
            tensors = [t for blob in self.blobs for t in blob.tensors]
            before = [(t.companion, t.quantization, t.companions) for t in tensors]
            for tensor in tensors:
                tensor.companion, tensor.quantization, tensor.companions = False, None, None
            self._found = resolve_tensors(self._label, self.blobs, *self._hints)
            for tensor, was in zip(tensors, before, strict=True):
                if (tensor.companion, tensor.quantization, tensor.companions) != was:
                    raise QuantizationError(
                        "a quantized weight and its companions were loaded in different "
                        "groups and read differently; load with a Limits.group_bytes that "
                        "holds them, or through WeightCache, which plans the model whole",
                        model=self._label, tensor=tensor.name, digest=tensor.digest,
                    )  # fmt: skip
        self.quantization = model_quantization(*self._hints, self._found)
        self.blobs.sort(key=lambda blob: self._first[blob.digest])


def _small_first(units: list[list[Layer]], sizes: dict[str, int], cap: int) -> list[list[Layer]]:
    """`units` with the first one that fits the first group moved to the front.

    The first tensor of a stream waits for the first group: when the model starts with a
    large blob (an embedding table), a small unit among the next few goes first, and the
    large one is read beside it by the other worker. Only the stream's order changes:
    `load_weights` returns tensors in manifest order either way.
    """
    for i, unit in enumerate(units[:_LOOKAHEAD]):
        if sum({layer.digest: sizes[layer.digest] for layer in unit}.values()) <= cap:
            return [unit, *units[:i], *units[i + 1 :]] if i else units
    return units


#: units looked at for a small first one
_LOOKAHEAD = 64

#: the suffixes `resolve_tensors` looks a weight's companions up by
_QUANT_SUFFIXES = ("_scale", "_qbias", ".global_scale", "_scale_2")


def gguf_header(label: str, component: str, layer: Layer, path: Path) -> GGUFFile:
    """Read and check the header of a GGUF layer's blob (blocking)."""
    try:
        return read_gguf_header(path, expected_size=layer.size)
    except AsyncWeightsError as exc:
        exc.add_context(model=label, digest=layer.digest, path=path)
        raise
    except OSError as exc:
        raise LoadError(
            f"cannot read GGUF header of component {component!r}: {exc.strerror}",
            model=label, digest=layer.digest, path=path, errno=exc.errno,
        ) from exc  # fmt: skip


def files_per_group(limits: Limits) -> int:
    """Blob files one group may hold open: the cap shared by the workers, within RLIMIT_NOFILE."""
    cap = limits.max_open_files
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 16
        cap = min(cap, max(limits.workers, (soft - in_use) // 2))
    return max(1, cap // limits.workers)


# ----------------------------------------------------------------------------- group loads


@dataclass(frozen=True, slots=True)
class Loaded:
    """One evaluated group, ready for the consumer: built in the worker, so the event loop
    only files references away."""

    tensors: list[Tensor]
    nbytes: int


class Hashing:
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


_READERS: dict[int | None, ThreadPoolExecutor] = {}
_READERS_LOCK = threading.Lock()


def reader_threads(nice: int | None) -> ThreadPoolExecutor:
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

            def start() -> None:
                if nice is not None:
                    lower_priority()
                # The thread's MLX stream (and its native thread) is made now, at the
                # thread's priority, instead of whenever a load first lands on this thread.
                # Best effort: an initializer that raises breaks the pool for good (every
                # later submit is BrokenThreadPool), and a failed warm-up only means the
                # stream is made by the first load on this thread instead.
                with contextlib.suppress(Exception):
                    mx.eval(mx.zeros((1,)))

            pool = _READERS[nice] = ThreadPoolExecutor(
                _READER_THREADS, thread_name_prefix="asyncweights-reader", initializer=start
            )
            # Every thread started at once: ThreadPoolExecutor otherwise starts one on a
            # submit that finds none idle, a race a load wins now and then (a thread, and an
            # MLX stream with its native thread, more per load until the pool is full).
            start_every_thread(pool, _READER_THREADS)
        return pool


#: Group calls in flight across the process at most; more wait their turn. Throughput loads
#: use 4 workers, so two of them, or a load beside a cache's, run at full width.
_READER_THREADS = 8


def load_group(
    group: list[BlobPlan],
    dtype: mx.Dtype | None,
    verify: bool,
    model: str,
    limits: Limits,
    cancel: threading.Event | None = None,
) -> Loaded:
    """Load and evaluate one group of blobs (runs in a worker thread; blocking)."""
    loaded: list[tuple[PlannedTensor, mx.array]] = []
    lazy: list[BlobPlan] = []
    try:
        if mlx_fills_through_readinto() and all(
            blob.gguf is None and not blob.sharded for blob in group
        ):
            loaded = fill_group(group, model, verify=verify, limits=limits, cancel=cancel)
            return _finish_group(loaded, group, dtype, model)
        close_files(group)  # the older paths open by path (and prove the header again)
        return _load_group_into(loaded, lazy, group, dtype, verify, model, limits)
    except BaseException as exc:
        # The traceback keeps the frames below alive, and with them lazy arrays that hold
        # their blob files open: drop them so MLX closes the files now.
        loaded.clear()
        clear_chain_frames(exc)
        raise


def close_files(group: list[BlobPlan]) -> None:
    """Close the descriptors planning left open in a group's blobs (idempotent)."""
    for blob in group:
        held, blob.file = blob.file, None
        if held is not None:
            held.close()


def clear_chain_frames(exc: BaseException) -> None:
    """Clear the finished frames of `exc`'s traceback and of every exception it chains.

    A group's error is usually raised ``from`` the error MLX or a read raised deeper down
    (``fill_arrays``, ``mx.eval``): that cause's traceback holds frames the error's own does
    not, and their locals (the group's virtual files, lazy arrays) keep the blob files open
    for as long as anyone holds the error, which a caller logging it, a future or an idle
    worker thread may do. Frames still executing are skipped by ``traceback.clear_frames``.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += (current.__cause__, current.__context__)
        if isinstance(current, BaseExceptionGroup):
            pending += current.exceptions


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
) -> Loaded:
    """Convert a filled group's tensors to `dtype` where asked, evaluated, as `Tensor` s."""
    if dtype is not None:
        loaded = [(tensor, _convert(tensor, array, dtype)) for tensor, array in loaded]
        try:
            mx.eval([array for _, array in loaded])
        except RuntimeError as exc:
            raise mlx_error(exc, group, model) from exc
    return Loaded(
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
) -> Loaded:
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
    hashing = Hashing(lazy, model) if verify and lazy else None
    try:
        mx.eval([array for _, array in loaded])
    except RuntimeError as exc:
        raise mlx_error(exc, lazy, model) from exc
    finally:
        if hashing is not None:
            hashing.join()
    if hashing is not None:
        hashing.check()
    return Loaded(
        [Tensor(tensor.name, array, _info(tensor, array)) for tensor, array in loaded],
        sum(blob.nbytes for blob in group),
    )
