"""Page-cache control for the cold and warm conditions: evict, warm up, measure residency.

Eviction is ``posix_fadvise(POSIX_FADV_DONTNEED)`` per file (no root needed, nothing else is
dropped); residency is measured with ``mincore(2)`` on a read-only mapping of each file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = mmap.PAGESIZE
_READ_CHUNK = 16 << 20


def evict(paths: Iterable[str]) -> None:
    """Drop each file's pages from the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Iterable[str]) -> None:
    """Read each file once so that all of it sits in the page cache."""
    buf = bytearray(_READ_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def resident_pages(path: str) -> tuple[int, int]:
    """Pages of ``path`` in the page cache, and its page count (mincore on a mapping)."""
    size = os.stat(path).st_size
    pages = (size + _PAGE - 1) // _PAGE
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap failed", path)
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", path)
            return sum(b & 1 for b in bytes(vec)), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def residency(paths: Iterable[str]) -> float:
    """The fraction of the files' pages in the page cache (0.0 to 1.0)."""
    resident = total = 0
    for path in paths:
        r, t = resident_pages(path)
        resident += r
        total += t
    return resident / total if total else 1.0
