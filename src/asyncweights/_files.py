"""One way to open a file of the store: a regular file of a known size, read through one fd.

Every file asyncweights reads (manifests, config and JSON blobs, blob headers, small blobs
read whole) is opened by `open_file`, which holds these invariants:

* ``O_NONBLOCK``: opening a FIFO planted in the store returns at once instead of waiting
  for a writer that never comes (the FIFO is then refused). ``O_CLOEXEC``: no descriptor
  leaks into a child process.
* ``fstat`` of the descriptor, not of the path: the file checked is the file read. A
  directory, FIFO, socket or device is a typed error before any byte is read.
* The size is compared with what the manifest says, or with a documented cap where the
  manifest says nothing (a manifest itself), before any byte is read: ``/dev/zero`` or a
  1 GiB file in a manifest's place costs one ``fstat``.
* Bytes come from that same descriptor (``pread``), never from the path again; a file that
  shrinks meanwhile is an error, never a short result.

Symbolic links are followed: a models root or a manifest may be a link (Ollama's own stores
use them). What keeps reads inside the store is the grammar paths are built from (a
validated name, a ``sha256:`` digest), and what keeps them bounded is the checks above.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from ._errors import (
    AsyncWeightsError,
    BlobError,
    BlobMissingError,
    LoadError,
    ManifestError,
    ModelNotFoundError,
    SizeMismatchError,
)

__all__ = ["FileKind", "StoreFile", "open_file", "read_file"]

#: What a file is to the store; it decides the error types and the wording.
FileKind = Literal["manifest", "config", "blob"]

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_KIND_NAMES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
_WHAT = {"manifest": "manifest", "config": "config blob", "blob": "blob"}
# One pread for any size this module is asked for (Linux moves at most 2 GiB a call): the
# kernel fills fresh bytes with the GIL released, where a read into zeroed memory, or a
# join of pieces, would touch every page with the GIL held (85-200 ms for 64 MiB measured).
_READ_CHUNK = 1 << 30


@dataclass(slots=True)
class StoreFile:
    """An open regular file of the store.

    Attributes:
        path: the path it was opened by (for messages only; never opened again).
        fd: the descriptor every read goes through.
        size: its size in bytes when opened (``fstat``), already checked by `open_file`.
        identity: ``(st_dev, st_ino, st_size, st_mtime_ns)`` when opened: equal identities
            mean the same unchanged file.
        kind: what the file is to the store.
    """

    path: str
    fd: int
    size: int
    identity: tuple[int, int, int, int]
    kind: FileKind

    def __enter__(self) -> StoreFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def unchanged(self) -> bool:
        """Whether the file still has the identity it was opened with (``fstat`` again).

        A write in place moves ``st_mtime_ns`` (at the kernel's timestamp granularity, a
        few milliseconds on Linux): a best-effort check for loads without ``verify=True``,
        which hashes the bytes themselves.
        """
        try:
            st = os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == self.identity

    def read(self, size: int, offset: int) -> bytes:
        """Exactly `size` bytes at `offset`, or fewer only where the file (as opened) ends.

        Raises:
            LoadError: an OS error, with its errno.
        """
        chunks = []
        while size > 0:
            try:
                chunk = os.pread(self.fd, min(size, _READ_CHUNK), offset)
            except OSError as exc:
                raise _read_error(exc, self) from exc
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_into(self, buffer: bytearray | memoryview, offset: int) -> int:
        """Fill `buffer` from `offset`; returns the bytes read (short only at the file's end).

        Raises:
            LoadError or ManifestError: an OS error, with its errno.
        """
        view = memoryview(buffer).cast("B")
        done = 0
        try:
            while done < len(view):
                try:
                    n = os.preadv(self.fd, [view[done : done + _READ_CHUNK]], offset + done)
                except OSError as exc:
                    raise _read_error(exc, self) from exc
                if n == 0:
                    break
                done += n
        finally:
            view.release()
        return done

    def read_all(self) -> bytes:
        """The whole file as opened: exactly `size` bytes.

        Raises:
            BlobError or ManifestError: the file shrank while being read.
            LoadError or ManifestError: an OS error, with its errno.
        """
        data = self.read(self.size, 0)
        done = len(data)
        if done != self.size:
            cls = ManifestError if self.kind == "manifest" else BlobError
            raise cls(
                f"{_WHAT[self.kind]} shrank while being read: {done} of {self.size} bytes",
                path=self.path,
            )
        return data


def open_file(
    path: str | os.PathLike[str],
    kind: FileKind,
    *,
    expected_size: int | None = None,
    max_size: int | None = None,
    cap: str | None = None,
) -> StoreFile:
    """Open a file of the store, refusing anything but a regular file of the right size.

    Blocking (one ``open`` and one ``fstat``); run it in a worker thread from async code.

    Args:
        path: the file; the path is used for this open only.
        kind: ``"manifest"``, ``"config"`` or ``"blob"``: chooses the error types.
        expected_size: the size the manifest gives, compared exactly.
        max_size: a cap on the size, for files whose size nothing else states.
        cap: the cap's name for the message (e.g. ``"Limits.max_manifest_bytes"``).

    Raises:
        ModelNotFoundError: a manifest that does not exist.
        BlobMissingError: a blob or config blob that does not exist.
        ManifestError: a manifest that is not a regular file, over `max_size`, or cannot be
            opened (the errno kept).
        BlobError: a blob that is not a regular file or over `max_size`.
        SizeMismatchError: a blob whose size differs from `expected_size`.
        LoadError: a blob that cannot be opened (the errno kept).
        AsyncWeightsError: a path with a NUL character (`ManifestError` or `BlobError`).
    """
    where = os.fspath(path)
    what = _WHAT[kind]
    bad = ManifestError if kind == "manifest" else BlobError
    if "\0" in where:
        raise bad(f"{what} path contains a NUL character", path=where.replace("\0", "\\x00"))
    try:
        fd = os.open(where, _FLAGS)
    except OSError as exc:
        raise _open_error(exc, where, kind) from exc
    try:
        st = os.fstat(fd)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt != stat.S_IFREG:
            kind_name = _KIND_NAMES.get(fmt, "not a file")
            raise bad(f"{what} is not a regular file ({kind_name})", path=where)
        if expected_size is not None and st.st_size != expected_size:
            raise SizeMismatchError(
                f"{what} is {st.st_size} bytes but the manifest says {expected_size}",
                path=where,
            )
        if max_size is not None and st.st_size > max_size:
            name = cap or "the cap"
            raise bad(f"{what} is {st.st_size} bytes, over {name} ({max_size})", path=where)
    except BaseException:
        os.close(fd)
        raise
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return StoreFile(where, fd, st.st_size, identity, kind)


def read_file(
    path: str | os.PathLike[str],
    kind: FileKind,
    *,
    expected_size: int | None = None,
    max_size: int | None = None,
    cap: str | None = None,
) -> bytes:
    """`open_file`, then the whole file through that descriptor, then close (blocking).

    Raises:
        The errors of `open_file` and `StoreFile.read_all`.
    """
    with open_file(path, kind, expected_size=expected_size, max_size=max_size, cap=cap) as f:
        return f.read_all()


def _open_error(exc: OSError, path: str, kind: FileKind) -> AsyncWeightsError:
    what = _WHAT[kind]
    code = exc.errno
    if kind == "manifest":
        if code == errno.ENOENT:
            return ModelNotFoundError("manifest file not found", path=path, errno=code)
        return ManifestError(f"cannot open manifest: {exc.strerror}", path=path, errno=code)
    if code == errno.ENOENT:
        return BlobMissingError(f"{what} file is missing", path=path, errno=code)
    return LoadError(f"cannot open {what}: {exc.strerror}", path=path, errno=code)


def _read_error(exc: OSError, f: StoreFile) -> AsyncWeightsError:
    cls = ManifestError if f.kind == "manifest" else LoadError
    return cls(f"cannot read {_WHAT[f.kind]}: {exc.strerror}", path=f.path, errno=exc.errno)
