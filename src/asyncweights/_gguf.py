"""GGUF files: the GGML type table and a strict header parser (pure; blocking reads only).

The layout and the reader's rules follow llama.cpp: ``ggml/src/gguf.cpp`` at
067d44f6c48459f7a82dbafc6fbd0bae97755a4e (magic, versions, key/value types, tensor infos,
``general.alignment``) and the type ids and block sizes of ``gguf-py/gguf/constants.py`` at
ef035f779276d5f5636a0fd8cbeff6a83d646d2b. Where llama.cpp is lenient (it only checks a tensor
against the next one), the checks here are the ones every loader can rely on: each tensor
lies inside the file, starts on the alignment and overlaps no other; the file ends with the
last tensor (plus padding below the alignment); counts, string lengths and nesting are capped
before anything is allocated. Every violation raises `HeaderError` (the caller adds the
model, digest and file).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

from ._errors import BlobError, HeaderError, LoadError

__all__ = [
    "FILE_TYPES",
    "GGML_TYPES",
    "GGUFArray",
    "GGUFFile",
    "GGUFTensorInfo",
    "parse_gguf",
    "parse_gguf_fd",
    "read_gguf_header",
]

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: caps checked before anything is allocated: real files stay far below them
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_STRING = 1 << 26  # 64 MiB: chat templates are kilobytes
MAX_ARRAY = 1 << 28
MAX_NESTING = 8
MAX_HEADER = 1 << 30  # metadata and tensor infos together
#: ggml's GGML_MAX_NAME (names must be shorter) and GGML_MAX_DIMS
MAX_NAME = 64
MAX_DIMS = 4
_MAX_DIM = 2**31 - 1  # MLX keeps dimensions as int32


class GGMLType(NamedTuple):
    """One GGML tensor type: its name, elements per block and bytes per block."""

    name: str
    block_size: int
    type_size: int


#: GGML type id -> (name, block elements, block bytes), from gguf-py's GGML_QUANT_SIZES
#: (Q8_1 from ggml-common.h's block_q8_1: two f16 and 32 int8).
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    9: GGMLType("Q8_1", 32, 36),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66),
    17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98),
    19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, 56),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 54),
    35: GGMLType("TQ2_0", 256, 66),
    39: GGMLType("MXFP4", 32, 17),
    40: GGMLType("NVFP4", 64, 36),
    41: GGMLType("Q1_0", 128, 18),
}

#: ``general.file_type`` values (llama.cpp's ``llama_ftype``, gguf-py's LlamaFileType): what
#: most tensors of the file are; 1-D tensors stay F32.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}  # fmt: skip

# GGUF metadata value types: id -> (name, struct format or "" for string/array, item size)
_STRING, _ARRAY = 8, 9
_VALUE_TYPES: dict[int, tuple[str, str, int]] = {
    0: ("UINT8", "<B", 1),
    1: ("INT8", "<b", 1),
    2: ("UINT16", "<H", 2),
    3: ("INT16", "<h", 2),
    4: ("UINT32", "<I", 4),
    5: ("INT32", "<i", 4),
    6: ("FLOAT32", "<f", 4),
    7: ("BOOL", "<B", 1),
    8: ("STRING", "", 8),  # the least a string takes: its 8-byte length
    9: ("ARRAY", "", 12),  # the least an array takes: its type and count
    10: ("UINT64", "<Q", 8),
    11: ("INT64", "<q", 8),
    12: ("FLOAT64", "<d", 8),
}
_NUMPY = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
    10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file.

    Attributes:
        name: the tensor's GGUF name (``blk.0.attn_q.weight``).
        ggml_type: the GGML type name (``"Q4_K"``).
        dims: GGML's dimensions, fastest-varying first (``ne[0]`` is the row length).
        shape: the same tensor in MLX's row-major order (``dims`` reversed).
        offset: byte offset from the start of the data section.
        nbytes: bytes the tensor takes in the file.
    """

    name: str
    ggml_type: str
    dims: tuple[int, ...]
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def count(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.dims:
            n *= d
        return n


class GGUFArray(Sequence[Any]):
    """A metadata array, decoded only when read (tokenizer vocabularies stay bytes).

    Attributes:
        item_type: the GGUF value type of the items (``"STRING"``, ``"FLOAT32"``, ``"ARRAY"``…).
    """

    __slots__ = ("_buf", "_count", "_end", "_items", "_start", "_type", "item_type")

    def __init__(self, buf: bytes, item_type: int, count: int, start: int, end: int) -> None:
        self._buf = buf
        self._type = item_type
        self._count = count
        self._start = start
        self._end = end
        self._items: list[Any] | None = None
        self.item_type = _VALUE_TYPES[item_type][0]

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<GGUFArray {self.item_type}[{self._count}]>"

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        return self.tolist()[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def numpy(self) -> Any:
        """A numeric array as a ``numpy.ndarray`` (a copy; bools as ``bool``).

        Typed `Any`: numpy is imported on first use, not with asyncweights (it is needed
        for GGUF models only).

        Raises:
            TypeError: the items are strings or arrays.
        """
        if self._type not in _NUMPY:
            raise TypeError(f"a GGUF array of {self.item_type} has no numpy form")
        import numpy as np  # only for GGUF arrays: `import asyncweights` stays numpy-free

        out = np.frombuffer(self._buf, _NUMPY[self._type], self._count, self._start).copy()
        return out.astype(bool) if self._type == 7 else out

    def tolist(self) -> list[Any]:
        """Every item decoded (strings as ``str``, undecodable bytes kept as surrogates)."""
        if self._items is None:
            if self._type in _NUMPY:
                self._items = self.numpy().tolist()
            else:
                cursor = _Cursor(self._buf, len(self._buf))
                cursor.pos = self._start
                self._items = [cursor.value(self._type, 1, decode=True) for _ in range(self._count)]
        return self._items

    @property
    def nbytes(self) -> int:
        """Bytes the array takes in the file."""
        return self._end - self._start


@dataclass(frozen=True, slots=True)
class GGUFFile:
    """A validated GGUF header.

    Attributes:
        version: 2 or 3.
        alignment: ``general.alignment`` or 32.
        metadata: key -> value (int, float, bool, str, or a lazily decoded `GGUFArray`).
        tensors: name -> `GGUFTensorInfo`, in file order.
        data_start: absolute offset of the data section.
        file_size: the file's size in bytes.
        raw: the header bytes, to prove a later read sees this file.
        infos_start: where the tensor infos start in `raw` (the bytes that place the data).
    """

    version: int
    alignment: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    data_start: int
    file_size: int
    raw: bytes
    infos_start: int = 0

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` (``"llama"``, ``"qwen2"`` …), if a string."""
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def file_type(self) -> str | None:
        """``general.file_type`` by name (``"Q4_K_M"``), its number if unknown, else None."""
        value = self.metadata.get("general.file_type")
        if type(value) is not int:
            return None
        return FILE_TYPES.get(value, str(value))

    @property
    def parameter_count(self) -> int:
        """Elements of every tensor."""
        return sum(t.count for t in self.tensors.values())

    def type_histogram(self) -> dict[str, int]:
        """Tensors per GGML type, most frequent first."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class _Short(Exception):
    """The parse needs bytes beyond those read so far (`need` of them in all)."""

    def __init__(self, need: int) -> None:
        self.need = need


class _Cursor:
    """Reads little-endian values from a buffer; `limit` is the file's size."""

    __slots__ = ("buf", "limit", "pos")

    def __init__(self, buf: bytes, limit: int) -> None:
        self.buf = buf
        self.limit = limit
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        """Advance over `n` bytes; return where they start."""
        start = self.pos
        end = start + n
        if end > len(self.buf):
            if end > self.limit:
                raise HeaderError(
                    f"GGUF header cut short: {what} at byte {start} needs {n} bytes, "
                    f"the file has {self.limit}"
                )
            raise _Short(end)
        self.pos = end
        return start

    def u32(self, what: str) -> int:
        value: int = _U32.unpack_from(self.buf, self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack_from(self.buf, self.take(8, what))[0]
        return value

    def string(self, what: str, cap: int = MAX_STRING) -> bytes:
        n = self.u64(f"length of {what}")
        if n > cap:
            raise HeaderError(f"{what} is {n} bytes long, over the limit of {cap}")
        start = self.take(n, what)
        return bytes(self.buf[start : start + n])

    def value(self, vtype: int, depth: int, *, decode: bool, what: str = "value") -> Any:
        if vtype == _STRING:
            raw = self.string(what)
            return raw.decode("utf-8", "surrogateescape") if decode else raw
        if vtype == _ARRAY:
            return self.array(depth, decode=decode, what=what)
        _, fmt, size = _VALUE_TYPES[vtype]
        value = struct.unpack_from(fmt, self.buf, self.take(size, what))[0]
        if vtype == 7:
            if value > 1:
                raise HeaderError(f"{what}: BOOL value {value} is neither 0 nor 1")
            return bool(value)
        return value

    def array(self, depth: int, *, decode: bool, what: str) -> GGUFArray:
        if depth > MAX_NESTING:
            raise HeaderError(f"{what}: arrays nested deeper than {MAX_NESTING}")
        item_type = self.u32(f"{what}: array item type")
        if item_type not in _VALUE_TYPES:
            raise HeaderError(f"{what}: unknown GGUF value type {item_type} in an array")
        count = self.u64(f"{what}: array length")
        least = _VALUE_TYPES[item_type][2]
        if count > MAX_ARRAY or count * least > self.limit - self.pos:
            raise HeaderError(
                f"{what}: array of {count} {_VALUE_TYPES[item_type][0]} items does not fit "
                f"in the file (limit {MAX_ARRAY} items)"
            )
        start = self.pos
        if item_type in _NUMPY:
            self.take(count * least, what)
            if item_type == 7:
                import numpy as np  # only for GGUF files (see GGUFArray.numpy)

                bad = np.frombuffer(self.buf, np.uint8, count, start) > 1
                if bad.any():
                    first = int(np.flatnonzero(bad)[0])
                    raise HeaderError(f"{what}: BOOL item {first} is neither 0 nor 1")
        elif item_type == _STRING:
            self._skip_strings(count, what)
        else:
            for _ in range(count):
                self.array(depth + 1, decode=False, what=what)
        return GGUFArray(self.buf, item_type, count, start, self.pos)

    def _skip_strings(self, count: int, what: str) -> None:
        buf, pos, limit, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        for _ in range(count):
            if pos + 8 > limit:
                self.pos = pos
                n = self.u64(f"{what}: string length")
            else:
                n = unpack(buf, pos)[0]
                pos += 8
                self.pos = pos
            if n > MAX_STRING:
                raise HeaderError(f"{what}: a string of {n} bytes, over the limit of {MAX_STRING}")
            if pos + n > limit:
                self.take(n, what)
            pos += n
            self.pos = pos


def parse_gguf(buf: bytes, file_size: int) -> GGUFFile:
    """Validate a GGUF header given its first bytes and the file's total size.

    Args:
        buf: the file's first bytes: at least the whole header, or the parse asks for more
            (internally) and this raises HeaderError when the file itself is too short.
        file_size: the file's size in bytes.

    Raises:
        HeaderError: any rule broken, naming the tensor when one is at fault.
        _Short: (internal) `buf` ends before the header does.
    """
    cur = _Cursor(buf, file_size)
    if file_size < 4 or len(buf) < 4:
        cur.take(4, "magic")
    magic = bytes(buf[:4])
    cur.pos = 4
    if magic != MAGIC:
        raise HeaderError(f"not a GGUF file: magic {magic!r}, expected b'GGUF'")
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        raise HeaderError(
            f"big-endian GGUF file (version reads {version:#010x}, {swapped} byte-swapped): "
            "only little-endian files are supported"
        )
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_tensors > MAX_TENSORS:
        raise HeaderError(f"tensor count {n_tensors} is over the limit of {MAX_TENSORS}")
    if n_kv > MAX_KV:
        raise HeaderError(f"metadata count {n_kv} is over the limit of {MAX_KV}")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key_raw = cur.string(f"metadata key {i}", cap=65535)
        key = _text(key_raw, f"metadata key {i}")
        if not key:
            raise HeaderError(f"metadata key {i} is empty")
        if key in metadata:
            raise HeaderError(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"type of {key!r}")
        if vtype not in _VALUE_TYPES:
            raise HeaderError(f"metadata {key!r} has unknown GGUF value type {vtype}")
        metadata[key] = cur.value(vtype, 1, decode=True, what=f"metadata {key!r}")
        if key == "general.alignment" and vtype != 4:
            raise HeaderError(
                f"general.alignment must be UINT32, not {_VALUE_TYPES[vtype][0]}"
            )  # gguf.cpp
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise HeaderError(f"general.alignment {alignment} is not a power of 2")
    infos_start = cur.pos
    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = _text(cur.string(f"name of tensor {i}", cap=MAX_NAME * 4), f"tensor {i} name")
        if len(name.encode()) >= MAX_NAME:
            raise HeaderError(
                f"tensor name is {len(name.encode())} bytes, GGML allows fewer than {MAX_NAME}",
                tensor=name,
            )
        if name in names:
            raise HeaderError("duplicate tensor name", tensor=name)
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise HeaderError(f"{n_dims} dimensions, GGML allows at most {MAX_DIMS}", tensor=name)
        dims = tuple(cur.u64(f"dimensions of {name!r}") for _ in range(n_dims))
        type_id = cur.u32(f"type of {name!r}")
        offset = cur.u64(f"offset of {name!r}")
        infos.append((name, type_id, dims, offset))
        if cur.pos > MAX_HEADER:
            raise HeaderError(f"GGUF header is over the limit of {MAX_HEADER} bytes")
    header_end = cur.pos
    data_start = -(-header_end // alignment) * alignment
    tensors = _tensors(infos, alignment, data_start, file_size)
    data_end = max((data_start + t.offset + t.nbytes for t in tensors.values()), default=header_end)
    if data_end > file_size:  # _tensors checks each; this is the header-only case
        raise HeaderError(f"GGUF header ends at byte {data_end}, past the {file_size}-byte file")
    if file_size - data_end >= alignment:
        raise HeaderError(
            f"{file_size - data_end} trailing bytes after the last tensor "
            f"(at most {alignment - 1} of padding allowed)"
        )
    return GGUFFile(
        version=version,
        alignment=alignment,
        metadata=metadata,
        tensors=tensors,
        data_start=data_start,
        file_size=file_size,
        raw=bytes(buf[:header_end]),
        infos_start=infos_start,
    )


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{what} is not UTF-8 (byte {exc.start})") from None


def _tensors(
    infos: list[tuple[str, int, tuple[int, ...], int]],
    alignment: int,
    data_start: int,
    file_size: int,
) -> dict[str, GGUFTensorInfo]:
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, type_id, dims, offset in infos:
        ggml = GGML_TYPES.get(type_id)
        if ggml is None:
            raise HeaderError(f"unknown GGML type {type_id}", tensor=name)
        if any(d > _MAX_DIM for d in dims):
            raise HeaderError(f"dimensions {list(dims)} are not all below 2^31", tensor=name)
        if dims and dims[0] % ggml.block_size:
            raise HeaderError(
                f"row of {dims[0]} elements is not a multiple of the {ggml.name} block size "
                f"{ggml.block_size}",
                tensor=name,
            )
        count = 1
        for d in dims:
            count *= d
        if count >= 2**63:
            raise HeaderError(f"{count} elements overflow a 64-bit count", tensor=name)
        if not dims and ggml.block_size != 1:
            raise HeaderError(f"a scalar cannot be {ggml.name}", tensor=name)
        nbytes = count // ggml.block_size * ggml.type_size
        if offset % alignment:
            raise HeaderError(f"offset {offset} is not a multiple of {alignment}", tensor=name)
        if data_start + offset + nbytes > file_size:
            raise HeaderError(
                f"data [{offset}, {offset + nbytes}) runs past the end of the "
                f"{file_size - data_start}-byte data section",
                tensor=name,
            )
        tensors[name] = GGUFTensorInfo(name, ggml.name, dims, dims[::-1], offset, nbytes)
    end, previous = 0, None
    for t in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if t.offset < end and t.nbytes:
            raise HeaderError(
                f"data [{t.offset}, {t.offset + t.nbytes}) overlaps tensor {previous!r}",
                tensor=t.name,
            )
        if t.offset + t.nbytes > end:
            end, previous = t.offset + t.nbytes, t.name
    return tensors


_FIRST_READ = 1 << 20  # most headers without a big vocabulary fit; tokenizers take more reads


def parse_gguf_fd(fd: int, file_size: int) -> GGUFFile:
    """Read and validate the header of an open GGUF file of `file_size` bytes (blocking)."""
    want = min(file_size, _FIRST_READ)
    buf = b""
    while True:
        if len(buf) < want:
            buf += _pread_exact(fd, want - len(buf), len(buf))
            if len(buf) < want:
                raise BlobError(f"file shrank while its GGUF header was read ({len(buf)} bytes)")
        try:
            return parse_gguf(buf, file_size)
        except _Short as short:
            if short.need > MAX_HEADER:
                raise HeaderError(f"GGUF header is over the limit of {MAX_HEADER} bytes") from None
            want = min(file_size, max(short.need, 2 * len(buf)))


def read_gguf_header(path: str | os.PathLike[str], *, expected_size: int | None) -> GGUFFile:
    """Open a GGUF blob (a regular file of the manifest's size), parse its header (blocking).

    Raises:
        BlobMissingError, BlobError (not a regular file), SizeMismatchError, HeaderError,
        LoadError (an OS error, errno kept). The caller adds model and digest.
    """
    from ._files import open_file

    with open_file(path, "blob", expected_size=expected_size) as f:
        try:
            return parse_gguf_fd(f.fd, f.size)
        except OSError as exc:
            raise LoadError(
                f"cannot read blob: {exc.strerror}", path=path, errno=exc.errno
            ) from exc
        except BlobError as exc:
            exc.add_context(path=path)
            raise


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 30), offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)
