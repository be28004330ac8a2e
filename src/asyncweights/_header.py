"""Reading and validating safetensors headers before any tensor data is touched.

The rules are those of docs/format.md#header-validation: MLX accepts overlapping offsets,
trailing bytes, negative or float dimensions and wraps dimensions of 2^32, so every header is
checked here first, and MLX only ever sees files that passed.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from math import prod
from typing import Annotated, Any, Literal

import mlx.core as mx
import msgspec

from ._errors import HeaderError, UnsupportedDTypeError
from ._files import StoreFile, open_file
from ._json import FAST_BYTES, JSONError, gc_paused, loads_stepwise, release
from ._limits import Limits

__all__ = [
    "DTYPES",
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "MAX_HEADER",
    "BlobHeader",
    "DType",
    "TensorEntry",
    "dtype_name",
    "parse_header",
    "read_header",
]

#: MLX's bound: the header length must be below 100,000,000 bytes
#: (docs/format.md#header-validation).
MAX_HEADER = 100_000_000


@dataclass(frozen=True, slots=True)
class DType:
    """One safetensors dtype as MLX loads it: the one table reader and writer share.

    Attributes:
        name: the dtype string in a header (``"BF16"``).
        size: bytes per element.
        mlx: the MLX dtype it loads as; MLX loads both FP8 kinds as raw bytes (``uint8``).
        format: the `memoryview` format of the same width (the buffer protocol cannot
            spell bfloat16, float16 or complex64; their bytes are viewed as the MLX dtype).
        floating: a floating-point dtype, which a ``dtype=`` conversion applies to.
    """

    name: str
    size: int
    mlx: mx.Dtype
    format: Literal["B", "H", "I", "Q"]
    floating: bool = False


#: Every dtype string MLX loads (mlx ``io/safetensors.cpp``), by name.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 1, mx.bool_, "B"),
        DType("U8", 1, mx.uint8, "B"),
        DType("I8", 1, mx.int8, "B"),
        DType("F8_E4M3", 1, mx.uint8, "B"),
        DType("F8_E8M0", 1, mx.uint8, "B"),
        DType("U16", 2, mx.uint16, "H"),
        DType("I16", 2, mx.int16, "H"),
        DType("F16", 2, mx.float16, "H", floating=True),
        DType("BF16", 2, mx.bfloat16, "H", floating=True),
        DType("U32", 4, mx.uint32, "I"),
        DType("I32", 4, mx.int32, "I"),
        DType("F32", 4, mx.float32, "I", floating=True),
        DType("U64", 8, mx.uint64, "Q"),
        DType("I64", 8, mx.int64, "Q"),
        DType("C64", 8, mx.complex64, "Q"),
    )
}
#: Item size in bytes by dtype string.
DTYPE_SIZES: dict[str, int] = {name: d.size for name, d in DTYPES.items()}
#: The floating-point dtype strings.
FLOAT_DTYPES = frozenset(name for name, d in DTYPES.items() if d.floating)
# The first name of each MLX dtype: U8 for uint8, not an FP8 kind.
_NAMES: dict[mx.Dtype, str] = {}
for _d in DTYPES.values():
    _NAMES.setdefault(_d.mlx, _d.name)
del _d


def dtype_name(dtype: mx.Dtype) -> str:
    """The safetensors dtype string of an MLX dtype.

    Raises:
        ValueError: no safetensors dtype MLX loads has it (float64).
    """
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"MLX dtype {dtype} has no safetensors name MLX can load") from None


_MAX_DIM = 2**31 - 1  # MLX keeps dimensions as int32
_ENTRY_FIELDS = ('"dtype"', '"shape"', '"data_offsets"')


class TensorEntry(msgspec.Struct, frozen=True, gc=False):
    """One tensor of a blob: its key, dtype string, shape and byte range in the data section.

    A frozen `msgspec.Struct` rather than a frozen dataclass: one is made per tensor while
    planning, and a Struct is made in a fifteenth of the time.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class BlobHeader(msgspec.Struct, frozen=True, gc=False):
    """A validated safetensors header: tensors by key, metadata, and where the data starts."""

    file_size: int
    data_start: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    #: the validated prefix and header bytes, so a later read can prove it sees the same file
    raw: bytes | bytearray = b""


class _Invalid(Exception):
    """A rule broken; turned into HeaderError with the blob's facts by the caller."""

    def __init__(self, reason: str, tensor: str | None = None, *, dtype: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tensor = tensor
        self.dtype = dtype


def parse_header(
    prefix_and_header: bytes | bytearray, file_size: int, limits: Limits | None = None
) -> BlobHeader:
    """Validate the first ``8 + n`` bytes of a safetensors file whose total size is known.

    Args:
        limits: the caps on header bytes, tensors and name length (`Limits` defaults).

    Raises:
        HeaderError: any rule broken or cap exceeded (UnsupportedDTypeError for an unknown
            dtype).
    """
    try:
        header = _parse(prefix_and_header, file_size, limits or _DEFAULT_LIMITS)
        check_caps(header, limits or _DEFAULT_LIMITS)
        return header
    except _Invalid as exc:
        cls = UnsupportedDTypeError if exc.dtype else HeaderError
        raise cls(exc.reason, tensor=exc.tensor) from None


def check_caps(header: BlobHeader, limits: Limits) -> None:
    """Check a parsed header (maybe parsed earlier, under other caps) against `limits`.

    Raises:
        _Invalid: the tensor count or a tensor name is over its cap.
    """
    if len(header.entries) > limits.max_tensors:
        raise _Invalid(
            f"header has {len(header.entries)} tensors, over Limits.max_tensors "
            f"({limits.max_tensors})"
        )
    cap = limits.max_name_bytes
    for key in header.entries:
        if len(key) > cap // 4 and len(key.encode()) > cap:
            raise _Invalid(
                f"tensor name of {len(key.encode())} bytes, over Limits.max_name_bytes ({cap})",
                key[:64] + "…",
            )


def _header_length(prefix: bytes | bytearray, file_size: int, limits: Limits) -> int:
    """Check the 8-byte length prefix against MLX's bound and the file size; return it."""
    if len(prefix) < 8 or file_size < 8:
        raise _Invalid(f"file too short for a safetensors header ({file_size} bytes)")
    n = int.from_bytes(prefix[:8], "little")
    if n == 0:
        raise _Invalid("header length is 0")
    if n >= MAX_HEADER:
        raise _Invalid(f"header length {n} is not below the limit of {MAX_HEADER} bytes")
    if n > limits.max_header_bytes:
        raise _Invalid(
            f"header length {n} is over Limits.max_header_bytes ({limits.max_header_bytes})"
        )
    if 8 + n > file_size:
        raise _Invalid(f"header length {n} runs past the end of the {file_size}-byte file")
    return n


def _parse(raw: bytes | bytearray, file_size: int, limits: Limits) -> BlobHeader:
    n = _header_length(raw, file_size, limits)
    if len(raw) < 8 + n:
        raise _Invalid(f"header cut short: {max(0, len(raw) - 8)} of {n} bytes")
    data_len = file_size - 8 - n
    if n <= FAST_BYTES:
        text = bytes(raw[8 : 8 + n])
        fast = _parse_common(text, data_len)
        if fast is not None:
            metadata, entries = fast
        else:
            metadata, entries = _entries(_decode_json(text))
            _check_tiling(sorted(entries.values(), key=lambda e: (e.begin, e.end)), data_len)
    else:
        # Far above a real blob's header: every step bounded, so the event loop stays free
        # (see _json): decoded in steps, the tree freed piecewise, offsets ordered by a heap
        # filled and drained in a Python loop rather than by one sort.
        with gc_paused():
            doc = _decode_big(memoryview(raw)[8 : 8 + n])
            entries = {}
            heap: list[tuple[int, int, int, TensorEntry]] = []
            try:
                metadata, entries = _entries(doc, in_place=True)
                _check_tiling(_in_offset_order(entries, heap), data_len)
            except _Invalid:
                release([doc, entries, heap])  # not in one dealloc when the error unwinds
                raise
            finally:
                release(heap)
    return BlobHeader(
        file_size=file_size,
        data_start=8 + n,
        entries=entries,
        metadata=metadata,
        # Exactly the prefix and header: kept as read (no copy) when that is all `raw` is.
        raw=raw if len(raw) == 8 + n else bytes(raw[: 8 + n]),
    )


# ---------------------------------------------------------------------- the common shape
#
# Nearly every header has one shape: Ollama's Go writer (``{"<key>":{"dtype":..,"shape":[..],
# "data_offsets":[..]}}`` padded with spaces), ``mx.save_safetensors`` (keys sorted) and the
# ``safetensors`` package (a ``__metadata__`` of strings first). `_parse_common` decodes that
# shape straight into typed Structs and returns None for anything else or any rule broken:
# every error, and every header of another shape, comes from the full parser with its own
# wording. The fast path only ever accepts, never rejects.


# The range rules msgspec checks while decoding (a value out of range fails the fast path).
_Dim = Annotated[int, msgspec.Meta(ge=0, le=_MAX_DIM)]
_Begin = Annotated[int, msgspec.Meta(ge=0)]


class _Fields(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    dtype: str
    shape: tuple[_Dim, ...]
    data_offsets: tuple[_Begin, int]


_COMMON = msgspec.json.Decoder(dict[str, _Fields])
_WS = rb"[ \t\n\r]*"
_PLAIN = rb'"[^"\\\x00-\x1f]*"'  # a JSON string without escapes or control characters
# A leading ``__metadata__`` of plain strings (or ``null``, as ``mx.save_safetensors`` writes
# without metadata); the rest of the object follows its comma.
_META = re.compile(
    rb"%(w)s\{%(w)s\"__metadata__\"%(w)s:%(w)s(?:null|\{((?:%(w)s%(s)s%(w)s:%(w)s%(s)s%(w)s"
    rb"(?:,%(w)s%(s)s%(w)s:%(w)s%(s)s%(w)s)*)?)\})%(w)s,(?=%(w)s\")" % {b"w": _WS, b"s": _PLAIN}
)
_PAIR = re.compile(rb"(%s)%s:%s(%s)" % (_PLAIN, _WS, _WS, _PLAIN))
_FIELD_NAMES = (b'"dtype"', b'"shape"', b'"data_offsets"')


def _parse_common(
    text: bytes, data_len: int
) -> tuple[dict[str, str], dict[str, TensorEntry]] | None:
    """A header of the common shape, valid, exactly as the full parser returns it; else None.

    Accepted only when every rule holds: UTF-8, no escape, no duplicate key, a known dtype,
    dimensions in [0, 2^31), offsets that match the shape and tile the data section exactly,
    and a ``__metadata__`` (first, if any) of plain strings.
    """
    if b"\\" in text:
        return None  # an escaped key could hide a duplicate from the count below
    if not text.isascii():
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return None
    metadata: dict[str, str] = {}
    if b'"__metadata__"' in text:
        meta = _META.match(text)
        if meta is None:
            return None
        pairs = _PAIR.findall(meta.group(1) or b"")
        metadata = {key[1:-1].decode(): value[1:-1].decode() for key, value in pairs}
        if len(metadata) != len(pairs):
            return None  # a duplicate key: the full parser words it
        text = b"{" + text[meta.end() :]
        if b'"__metadata__"' in text:
            return None
    try:
        doc = _COMMON.decode(text)
    except msgspec.DecodeError:  # ValidationError included
        return None
    # Each entry spells each field name once and no key is a field name: any duplicate
    # (which the decoder would merge, keeping the last) shows as a count over len(doc).
    for name in _FIELD_NAMES:
        if text.count(name) != len(doc):
            return None
    sizes = DTYPE_SIZES
    entries: dict[str, TensorEntry] = {}
    for key, fields in doc.items():
        dtype = fields.dtype
        size = sizes.get(dtype)
        begin, end = fields.data_offsets
        shape = fields.shape
        if size is None or end - begin != prod(shape, start=size):
            return None  # an unknown dtype; offsets reversed, or not the shape's size
        entries[key] = TensorEntry(key, dtype, shape, begin, end)
    if len(entries) == 1:
        (only,) = entries.values()
        if only.begin != 0 or only.end != data_len:
            return None
        return metadata, entries
    covered = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != covered:
            return None
        covered = entry.end
    return (metadata, entries) if covered == data_len else None


def _entries(doc: Any, *, in_place: bool = False) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    if not isinstance(doc, dict):
        raise _Invalid(f"header is a JSON {type(doc).__name__}, not an object")
    meta_raw = doc.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if meta_raw is not None:
        if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
            raise _Invalid("__metadata__ must be an object of strings")
        metadata = meta_raw
    if not in_place:
        return metadata, {key: _entry(key, value) for key, value in doc.items()}
    # Each value replaced in place: the dict never grows, so a header of 262,144 tensors
    # costs no second 262,144-key dict and none of its growth steps (6.5 ms the largest).
    # (A fresh dict of untracked entries is untracked by the cyclic GC; this one is, until
    # the collector's first pass over it.)
    for key, value in doc.items():
        doc[key] = _entry(key, value)
    entries: dict[str, TensorEntry] = doc
    return metadata, entries


def _in_offset_order(
    entries: dict[str, TensorEntry], heap: list[tuple[int, int, int, TensorEntry]]
) -> Iterator[TensorEntry]:
    """The entries by (begin, end), as ``sorted`` gives them, one bounded step at a time
    (`heap` is the caller's, so the caller frees it)."""
    for i, entry in enumerate(entries.values()):
        heapq.heappush(heap, (entry.begin, entry.end, i, entry))
    while heap:
        yield heapq.heappop(heap)[3]


def _check_tiling(ordered: Iterable[TensorEntry], data_len: int) -> None:
    """The offsets, in (begin, end) order, tile the data section exactly (no gap, overlap
    or trailing byte)."""
    covered = 0
    for entry in ordered:
        if entry.begin != covered:
            what = "overlaps another tensor" if entry.begin < covered else "leaves a gap before it"
            raise _Invalid(f"data_offsets [{entry.begin}, {entry.end}] {what}", entry.key)
        covered = entry.end
    if covered != data_len:
        if covered > data_len:
            raise _Invalid(f"data_offsets end at {covered}, past the {data_len}-byte data section")
        raise _Invalid(f"{data_len - covered} trailing bytes after the last tensor")


def _decode_big(text: memoryview) -> Any:
    """A header over `FAST_BYTES`, decoded in bounded steps, duplicate keys checked as read."""
    try:
        return loads_stepwise(text, unique_keys=True)
    except JSONError as exc:
        raise _Invalid(_header_reason(exc.reason), exc.key) from None


def _decode_json(text: bytes) -> Any:
    # UTF-8 is checked here, before the JSON parser: the safetensors format requires it, and
    # the error must not depend on how a given msgspec release words its own message.
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(f"header is not UTF-8 (byte {exc.start} of the JSON)") from None
    try:
        doc = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise _Invalid(f"header is not valid JSON: {exc}") from None
    except RecursionError:
        raise _Invalid("header JSON is nested too deeply") from None
    if isinstance(doc, dict) and _may_have_duplicates(decoded, doc):
        # msgspec keeps the last of duplicate keys; the slow parser tells for sure.
        _reject_duplicates(decoded)
    return doc


def _header_reason(reason: str) -> str:
    """`_json`'s reason worded as the one-call path words it, about the header."""
    if reason.startswith("duplicate key"):
        return f"{reason} in header"
    if reason.startswith("not UTF-8"):
        return "header is " + reason.replace(")", " of the JSON)")
    if reason.startswith("JSON nested"):
        return "header JSON is nested" + reason[len("JSON nested") :]
    if reason.startswith("not"):
        return f"header is {reason}"
    return f"header has a {reason}"


def _may_have_duplicates(decoded: str, doc: dict[str, Any]) -> bool:
    """Cheap, exact-enough screen: each tensor entry spells each field name once.

    An escaped key (``"\\u0064type"``) would hide from the count, so any backslash sends the
    header to the exact check.
    """
    if "\\" in decoded:
        return True
    tensors = len(doc) - ("__metadata__" in doc)
    if decoded.count('"__metadata__"') > 1:
        return True
    meta = doc.get("__metadata__")
    if isinstance(meta, dict) and meta:
        return True
    return any(decoded.count(name) != tensors for name in _ENTRY_FIELDS)


def _reject_duplicates(decoded: str) -> None:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise _Invalid(f"duplicate key {key!r} in header", key)
            seen[key] = value
        return seen

    # msgspec accepted the text; only duplicates matter here.
    with contextlib.suppress(ValueError, RecursionError):
        json.loads(decoded, object_pairs_hook=pairs)


def _entry(key: str, value: Any) -> TensorEntry:
    if not isinstance(value, dict):
        raise _Invalid("tensor entry is not an object", key)
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype is None or shape is None or offsets is None:
        raise _Invalid("tensor entry needs dtype, shape and data_offsets", key)
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        supported = ", ".join(sorted(DTYPE_SIZES))
        raise _Invalid(f"unsupported dtype {dtype!r}; supported: {supported}", key, dtype=True)
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
        raise _Invalid(f"shape {shape!r} is not a list of integers in [0, 2^31)", key)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
    ):
        raise _Invalid(f"data_offsets {offsets!r} is not two non-negative integers", key)
    begin, end = offsets
    if end < begin:
        raise _Invalid(f"data_offsets [{begin}, {end}] are reversed", key)
    count = 1
    for d in shape:
        count *= d
    if count * DTYPE_SIZES[dtype] != end - begin:
        raise _Invalid(
            f"data_offsets span {end - begin} bytes but {dtype} {shape} needs "
            f"{count * DTYPE_SIZES[dtype]}",
            key,
        )
    return TensorEntry(key, dtype, tuple(shape), begin, end)


_DEFAULT_LIMITS = Limits()
_FIRST_READ = 4096  # most headers are a few hundred bytes: one read fetches them


def read_header(
    path: str | os.PathLike[str], *, expected_size: int | None, limits: Limits | None = None
) -> BlobHeader:
    """Read and validate a blob's header, checking its size against the manifest (blocking).

    Raises:
        BlobMissingError: no such file.
        BlobError: the path is not a regular file (a directory, FIFO or device).
        SizeMismatchError: the file's size differs from `expected_size`.
        HeaderError: the header breaks a rule.
        LoadError: any other OS error, with its errno.
    """
    return read_blob_head(path, expected_size=expected_size, whole_upto=0, limits=limits)[0]


def read_blob_head(
    path: str | os.PathLike[str],
    *,
    expected_size: int | None,
    whole_upto: int,
    limits: Limits | None = None,
) -> tuple[BlobHeader, bytes | bytearray | None]:
    """Like `read_header`; a blob of at most `whole_upto` bytes is read whole, in one call.

    Returns:
        The validated header, and the whole file's bytes when it was read whole (its header
        is the one validated: the data can be loaded later without opening the file again).
    """
    with open_file(path, "blob", expected_size=expected_size) as f:
        return head_of(f, whole_upto=whole_upto, limits=limits)


def head_of(
    f: StoreFile, *, whole_upto: int, limits: Limits | None = None, fresh: bool = False
) -> tuple[BlobHeader, bytes | bytearray | None]:
    """The validated header of an open blob (and its bytes when read whole), through `f`.

    Args:
        fresh: read the header bytes through `f` even when a header of the same file
            identity was parsed before, and use that one only if the bytes are equal: the
            header is then proved on this very descriptor (a load reads the data through it).

    Raises:
        HeaderError: the header breaks a rule.
        BlobError, LoadError: the file shrank or could not be read.
    """
    key = f.path
    limits = limits or _DEFAULT_LIMITS
    data: bytes | bytearray | None = None
    signature = f.identity
    cached = _CACHE.get(key, signature)
    if f.size <= whole_upto:
        data = f.read_all()
        if cached is not None and data[: cached.data_start] == cached.raw:
            header = cached
        else:
            header = parse_header(data, len(data), limits)
            _CACHE.put(key, signature, header)
    elif cached is not None and (not fresh or f.read(cached.data_start, 0) == cached.raw):
        header = cached
    else:
        raw: bytes | bytearray = f.read(_FIRST_READ, 0)
        if len(raw) >= 8:
            n = int.from_bytes(raw[:8], "little")
            # Only a length within the caps is read: the cap is checked before the bytes.
            fits = 0 < n < MAX_HEADER and n <= limits.max_header_bytes
            if 8 + n > len(raw) and fits and 8 + n <= f.size:
                raw = f.read(8 + n, 0)  # one pread from the start: no copy, no join
        header = parse_header(raw, f.size, limits)
        _CACHE.put(key, signature, header)
    if header is cached and cached is not None:
        try:
            check_caps(header, limits)  # parsed before, perhaps under larger caps
        except _Invalid as exc:
            raise HeaderError(exc.reason, tensor=exc.tensor, path=key) from None
    return header, data


class _HeaderCache:
    """Parsed headers by file, valid while the file's identity and mtime are unchanged."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, tuple[tuple[int, ...], BlobHeader]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, signature: tuple[int, ...]) -> BlobHeader | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != signature:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: str, signature: tuple[int, ...], header: BlobHeader) -> None:
        with self._lock:
            self._items[key] = (signature, header)
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# Thread-safe and loop-agnostic: it holds plain data keyed by file identity.
_CACHE = _HeaderCache(capacity=65_536)
