"""Writing Ollama-style stores: safetensors blobs, JSON layers, config blobs and manifests.

The writer uses the reader's own facts: paths from `_names`, the `Layer`, `Manifest` and
`ModelConfig` Structs of `_manifest`, the dtype table of `_header`. Everything here writes
the way Ollama does (docs/format.md): content-addressed blobs under
``<root>/blobs/sha256-<hex>``, written to a temporary file that the loader ignores, fsynced and
renamed to their digest; manifests under ``<root>/manifests/<host>/<namespace>/<model>/<tag>``,
written last, the same way.

Two safetensors writer styles are reproduced byte for byte:

* ``"go"``: Go ``encoding/json``. Keys sorted, entry fields ``dtype, shape, data_offsets``,
  header padded with spaces to a multiple of 8, ``__metadata__`` only when non-empty.
* ``"mlx"``: MLX ``save_safetensors``. Keys sorted, ``__metadata__`` always present (``null``
  when empty), entry fields ``data_offsets, dtype, shape``, no padding.

In both styles the data segments follow the order of the tensors given, which need not be key
order (MLX writes in hash-map order).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple, TypeAlias

import mlx.core as mx
import msgspec

from ._header import DTYPE_SIZES, dtype_name
from ._layout import V2_HOST, encode_host, is_public
from ._manifest import MANIFEST_MEDIA_TYPE, Manifest, ModelConfig, encode_config, encode_manifest
from ._names import ModelName, blob_file_name

if TYPE_CHECKING:
    from _typeshed import StrPath

Buffer: TypeAlias = bytes | bytearray | memoryview
TensorData: TypeAlias = Buffer | Iterable[Buffer]
Style: TypeAlias = Literal["go", "mlx"]

#: The components of an image-generation model, in Ollama's order (docs/format.md#layer-order).
COMPONENTS = ("text_encoder", "transformer", "vae")
#: Config layers Ollama imports for such a model, in its order (docs/format.md#config-layers).
IMAGEGEN_CONFIGS = (
    "model_index.json",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "transformer/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
)

_TEMP_SUFFIX = ".tmp"
#: Every temporary file this package writes starts with this, then ``<pid>-``.
TEMP_PREFIX = ".asyncweights-"
_TEMP_NAME = re.compile(r"\.asyncweights-[0-9]+-[A-Za-z0-9_]+\.tmp")
#: Seconds a temporary file must be untouched before another process may take it as stale.
STALE_TEMP_AGE = 600.0
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class RawTensor:
    """One tensor to write: its key, safetensors dtype, shape and raw little-endian bytes.

    ``data`` is a bytes-like object, or an iterable of bytes-like chunks (produced lazily, so a
    big tensor never has to sit in memory whole). Its total length must equal ``nbytes``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: TensorData

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown safetensors dtype {self.dtype!r} for {self.name!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape} of {self.name!r}")

    @property
    def nbytes(self) -> int:
        """The byte length that the dtype and shape call for."""
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


class Blob(NamedTuple):
    """A written blob: its digest ``sha256:<hex>`` and its size in bytes."""

    digest: str
    size: int


def tensor_from_array(name: str, array: mx.array, *, dtype: str | None = None) -> RawTensor:
    """Evaluate an MLX array and wrap its bytes as a `RawTensor`.

    Args:
        name: the key in the blob.
        array: any MLX array; a non-contiguous view is copied first.
        dtype: a safetensors dtype overriding the array's own, of the same item size
            (e.g. ``"F8_E4M3"`` for uint8 bytes).
    """
    array = mx.contiguous(array)
    mx.eval(array)
    # MLX arrays export the buffer protocol; the stubs of its Python 3.11 wheels do not
    # declare __buffer__ (those of 3.12+ do), hence an ignore that may be unused.
    view = memoryview(array).cast("B")  # type: ignore[arg-type, unused-ignore]
    tensor = RawTensor(name, dtype or dtype_name(array.dtype), tuple(array.shape), view)
    if tensor.nbytes != view.nbytes:
        raise ValueError(f"dtype {tensor.dtype} does not fit the {array.dtype} array {name!r}")
    return tensor


def encode_header(
    tensors: Sequence[RawTensor], *, style: Style, metadata: Mapping[str, str] | None = None
) -> bytes:
    """Encode the 8-byte length prefix and JSON header; data follows in the order given."""
    entries: dict[str, Any] = {}
    offset = 0
    for t in tensors:
        if t.name in entries or t.name == "__metadata__":
            raise ValueError(f"duplicate or reserved tensor name {t.name!r}")
        span = [offset, offset + t.nbytes]
        offset += t.nbytes
        shape = list(t.shape)
        if style == "go":
            entries[t.name] = {"dtype": t.dtype, "shape": shape, "data_offsets": span}
        else:
            entries[t.name] = {"data_offsets": span, "dtype": t.dtype, "shape": shape}
    meta = dict(sorted(metadata.items())) if metadata else None
    if meta is not None or style == "mlx":
        entries["__metadata__"] = meta
    header = _encoder.encode(dict(sorted(entries.items())))
    if style == "go":
        header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def iter_safetensors(
    tensors: Sequence[RawTensor], *, style: Style, metadata: Mapping[str, str] | None = None
) -> Iterator[Buffer]:
    """Yield a safetensors file as chunks: the header, then each tensor's bytes.

    Raises:
        ValueError: a tensor's data is not exactly ``nbytes`` long.
    """
    yield encode_header(tensors, style=style, metadata=metadata)
    for t in tensors:
        written = 0
        chunks = [t.data] if isinstance(t.data, bytes | bytearray | memoryview) else t.data
        for chunk in chunks:
            size = chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)
            written += size
            if written > t.nbytes:
                break
            yield chunk
        if written != t.nbytes:
            raise ValueError(f"tensor {t.name!r}: data does not match {t.nbytes} bytes")


def encode_safetensors(
    tensors: Sequence[RawTensor], *, style: Style, metadata: Mapping[str, str] | None = None
) -> bytes:
    """Encode a whole safetensors file in memory (for small tensors)."""
    return b"".join(iter_safetensors(tensors, style=style, metadata=metadata))


def blob_path(root: StrPath, digest: str) -> Path:
    """The path of a blob given its digest ``sha256:<hex>``.

    Raises:
        InvalidDigestError: (a ValueError) not ``sha256:`` and 64 hex digits.
    """
    return Path(root, "blobs", blob_file_name(digest))


def write_blob(
    root: StrPath,
    chunks: Iterable[Buffer],
    *,
    created: dict[str, int] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Blob:
    """Write bytes atomically as a content-addressed blob in ``<root>/blobs/``.

    The chunks are streamed to a temporary file in ``blobs/`` (see `temp_file`) while
    hashing, fsynced and renamed to ``sha256-<hex>``; the directory is fsynced. If that blob
    already exists the temporary file is dropped instead. On any error the temporary file is
    removed and no blob appears; an OS error names the file it concerns.

    Args:
        created: receives ``digest: st_mtime_ns`` when this call made a new blob file (so a
            failed import knows its own blobs, and which of them another writer has reused
            since: reusing an existing blob updates its mtime).
        on_bytes: called with each chunk's length once it is hashed and written.

    Returns:
        the blob's digest and size.
    """
    blobs = Path(root, "blobs")
    blobs.mkdir(parents=True, exist_ok=True)
    with temp_file(blobs) as (f, tmp_name):
        hasher = hashlib.sha256()
        size = 0
        for chunk in chunks:  # an error of the source itself passes through unchanged
            hasher.update(chunk)
            with _naming(tmp_name):
                f.write(chunk)
            n = chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)
            size += n
            if on_bytes is not None:
                on_bytes(n)
        with _naming(tmp_name):
            f.flush()
            os.fsync(f.fileno())
        blob = Blob("sha256:" + hasher.hexdigest(), size)
        final = blob_path(root, blob.digest)
        if final.exists():
            # Mark the blob as wanted: an import that made it and then fails leaves alone a
            # blob touched after it wrote it (see `created`).
            with contextlib.suppress(OSError):
                os.utime(final)
                if created is not None and blob.digest in created:  # our own, written twice
                    created[blob.digest] = os.stat(final).st_mtime_ns
        else:
            os.replace(tmp_name, final)
            if created is not None:
                created[blob.digest] = os.stat(final).st_mtime_ns
            _fsync_dir(blobs)
    return blob


@contextlib.contextmanager
def temp_file(directory: Path) -> Iterator[tuple[BinaryIO, str]]:
    """A new temporary file in `directory`, locked while it is written; removed on exit.

    Its name is ``.asyncweights-<pid>-<random>.tmp``: a leading dot keeps it out of Ollama's
    listings and of manifest tags, and the prefix marks it as ours. The open file holds an
    exclusive ``flock`` until it is closed, so `remove_stale_temps` can prove that no live
    process (in any PID namespace on this kernel) still writes it. The caller renames it
    before exit to keep it; whatever is still under the name at exit is removed.
    """
    fd, tmp_name = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=_TEMP_SUFFIX, dir=directory
    )
    f = open(fd, "w+b", closefd=True)  # noqa: SIM115 (closed below, errors kept apart)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        os.fchmod(f.fileno(), 0o644)
        yield f, tmp_name
    except BaseException:
        # Closing flushes what is still buffered; on a full disk that fails again, and the
        # second error must not hide the first (the one that names the file).
        with contextlib.suppress(OSError):
            f.close()
        raise
    else:
        with _naming(tmp_name):
            f.close()
    finally:
        # The descriptor is closed (close() closes it even when its flush fails); only the
        # name can be left behind.
        Path(tmp_name).unlink(missing_ok=True)


def remove_stale_temps(directory: Path, *, min_age: float = STALE_TEMP_AGE) -> list[str]:
    """Remove temporary files that killed writers left in `directory` (blocking).

    A file is removed only when all of these hold: its name is one `temp_file` makes, it is
    a regular file not modified for `min_age` seconds, and its ``flock`` can be taken at
    once (the lock dies with the process that held it, so a live writer's file is never
    touched; the age check covers the instant between creating a file and locking it).
    Other files, Ollama's own ``*-partial``/``sha256-<digits>`` temporaries included, are
    left alone.

    Returns:
        the names removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for name in names:
        if not _TEMP_NAME.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            try:
                same = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def write_tensor_blob(
    root: StrPath,
    tensors: Sequence[RawTensor],
    *,
    style: Style,
    metadata: Mapping[str, str] | None = None,
    created: dict[str, int] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Blob:
    """Encode tensors as safetensors and write them atomically as a blob (see `write_blob`)."""
    chunks = iter_safetensors(tensors, style=style, metadata=metadata)
    return write_blob(root, chunks, created=created, on_bytes=on_bytes)


def encode_json(obj: object, *, indent: int | None = None, newline: bool = False) -> bytes:
    """Encode JSON with sorted keys, compact or indented like Go's ``MarshalIndent``."""
    data = msgspec.json.encode(obj, order="sorted")
    if indent:
        data = msgspec.json.format(data, indent=indent)
    return data + b"\n" if newline else data


def write_json_blob(root: StrPath, data: bytes) -> Blob:
    """Write a JSON layer's bytes atomically as a blob (the bytes are stored verbatim)."""
    return write_blob(root, [data])


def build_config(
    *,
    file_type: str = "",
    capabilities: Sequence[str] = ("completion",),
    requires: str = "0.19.0",
    draft: Mapping[str, str] | None = None,
) -> bytes:
    """Encode a ConfigV2 blob for a tensor model, as Ollama writes it (`encode_config`)."""
    config = ModelConfig(
        model_format="safetensors",
        file_type=file_type,
        requires=requires,
        capabilities=list(capabilities),
        draft=None if draft is None else dict(draft),
    )
    return encode_config(config)


def manifest_path(root: StrPath, name: str | ModelName) -> Path:
    """The legacy manifest path of a model name: ``<root>/manifests/<host>/<ns>/<model>/<tag>``.

    Raises:
        InvalidNameError: the name breaks Ollama's grammar.
    """
    parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
    return Path(root, "manifests", *parsed.parts)


def manifest_v2_path(root: StrPath, name: str | ModelName) -> Path:
    """Where Ollama 0.40 links a name: ``<root>/manifests-v2/<host>/<ns>/<model>/<tag>``.

    The public host is spelled ``ollama.com`` (``registry.ollama.ai`` is the same host) and a
    ``:`` in the host is written ``%3A`` (Ollama ``manifest/paths.go`` ``V2PathForName``,
    ``encodeV2ManifestHost``, PR #16590).

    Raises:
        InvalidNameError: the name breaks Ollama's grammar.
    """
    parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
    host, namespace, model, tag = parsed.parts
    if is_public(host):
        host = V2_HOST
    return Path(root, "manifests-v2", encode_host(host), namespace, model, tag)


def write_manifest(
    root: StrPath, name: str | ModelName, manifest: Manifest | Mapping[str, Any] | bytes
) -> Path:
    """Write a manifest atomically as compact one-line JSON plus a newline (or bytes verbatim).

    A `Manifest` is encoded as Ollama writes it; a mapping (a test's hand-made document) as
    given.

    Returns:
        the manifest's path.
    """
    path = manifest_path(root, name)
    if isinstance(manifest, bytes):
        data = manifest
    elif isinstance(manifest, Manifest):
        data = encode_manifest(manifest) + b"\n"
    else:
        data = _encoder.encode(manifest) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_file(path.parent) as (f, tmp_name), _naming(tmp_name):
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp_name, path)
        _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """Let an OS error of a write name the file written (ENOSPC carries no file name)."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and exc.filename is None:
            exc.filename = path
        raise


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pulled_manifest(
    root: StrPath,
    name: str,
    data: bytes,
    *,
    list_data: bytes | None = None,
    list_media_type: str | None = None,
) -> Path:
    """Write a pulled manifest the way Ollama 0.40 does, each step atomic, in this order.

    1. The manifest bytes (and the list's, if the tag named one) as blobs.
    2. ``manifests-v2/<host>/<ns>/<model>/<tag>``: a relative symlink to the list's blob if
       any, else the manifest's (``../../../../blobs/sha256-<hex>``); a hard link where
       symlinks are refused, else a copy (``manifest/manifest.go`` ``linkManifest``).
    3. The legacy ``manifests/…`` file: the runnable manifest with the manifest documents
       appended as layers, so an older daemon's garbage collection keeps them
       (``WriteLegacyAnchor``).

    A reader sees either the previous model or the whole new one: every blob is in place
    before the first name points at it.

    Returns:
        the v2 path.
    """
    manifest = write_blob(root, [data])
    anchor_layers = []
    target = manifest
    if list_data is not None:
        listed = write_blob(root, [list_data])
        target = listed
        anchor_layers.append(
            {"mediaType": list_media_type or "", "digest": listed.digest, "size": listed.size}
        )
    anchor_layers.append(
        {"mediaType": MANIFEST_MEDIA_TYPE, "digest": manifest.digest, "size": manifest.size}
    )
    v2 = manifest_v2_path(root, name)
    _link_manifest(root, v2, target.digest)
    doc = msgspec.json.decode(data)
    if not isinstance(doc, dict):
        raise ValueError("a manifest must be a JSON object")
    doc["layers"] = [*doc.get("layers", []), *anchor_layers]
    write_manifest(root, name, _encoder.encode(doc))
    return v2


def _link_manifest(root: StrPath, path: Path, digest: str) -> None:
    """Point ``path`` at a manifest blob atomically: symlink, else hard link, else copy."""
    blob = blob_path(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, path.parent)
    tmp = path.parent / f".{path.name}-{os.urandom(6).hex()}{_TEMP_SUFFIX}"
    try:
        try:
            os.symlink(target, tmp)
        except OSError:
            try:
                os.link(blob, tmp)
            except OSError:
                with open(tmp, "wb") as f:
                    f.write(blob.read_bytes())
                    f.flush()
                    os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
