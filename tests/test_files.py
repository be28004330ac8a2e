"""`_files.open_file`: the one way a file of the store is opened and read."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

import asyncweights as aw
from asyncweights._files import open_file, read_file

from .conftest import open_fds


@pytest.fixture(autouse=True)
def _no_fd_left() -> object:
    before = set(open_fds())
    yield None
    assert set(open_fds()) <= before


def test_reads_a_regular_file_through_one_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with open_file(path, "blob", expected_size=10) as f:
        assert f.size == 10
        st = os.fstat(f.fd)
        assert f.identity == (st.st_dev, st.st_ino, 10, st.st_mtime_ns)
        path.unlink()  # read from the descriptor, never the path again
        assert f.read(4, 3) == b"3456"
        assert f.read(100, 8) == b"89"  # short only where the file ends
        assert bytes(f.read_all()) == b"0123456789"
        buf = bytearray(4)
        assert f.read_into(buf, 8) == 2
        assert buf[:2] == b"89"
        assert os.get_inheritable(f.fd) is False
    assert f.fd == -1


@pytest.mark.parametrize("kind", ["manifest", "config", "blob"])
def test_fifo_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    started = time.monotonic()
    expected = aw.ManifestError if kind == "manifest" else aw.BlobError
    with pytest.raises(aw.AsyncWeightsError) as info:
        open_file(path, kind)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5
    assert type(info.value) is expected
    what = {"manifest": "manifest", "config": "config blob", "blob": "blob"}[kind]
    assert str(info.value) == f"{what} is not a regular file (a FIFO) (file {str(path)!r})"


def test_directory_and_devices_are_refused(tmp_path: Path) -> None:
    with pytest.raises(aw.ManifestError, match=r"^manifest is not a regular file \(a directory\)"):
        read_file(tmp_path, "manifest")
    with pytest.raises(aw.BlobError, match=r"^blob is not a regular file \(a character device\)"):
        read_file("/dev/zero", "blob", expected_size=4)
    with pytest.raises(
        aw.ManifestError, match=r"^manifest is not a regular file \(a character device\)"
    ):
        read_file("/dev/zero", "manifest", max_size=1 << 20)


def test_size_checked_before_any_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big"
    with path.open("wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that would take seconds to read
    reads: list[int] = []
    real = os.preadv
    real_pread = os.pread

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        reads.append(offset)
        return real(fd, buffers, offset)

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(os, "preadv", counting)
    monkeypatch.setattr(os, "pread", counting_pread)
    with pytest.raises(aw.SizeMismatchError) as info:
        read_file(path, "blob", expected_size=100)
    assert info.value.reason == f"blob is {1 << 30} bytes but the manifest says 100"
    with pytest.raises(aw.ManifestError) as over:
        read_file(path, "manifest", max_size=1 << 20, cap="Limits.max_manifest_bytes")
    assert over.value.reason == (
        f"manifest is {1 << 30} bytes, over Limits.max_manifest_bytes ({1 << 20})"
    )
    assert reads == []


def test_missing_files_and_os_errors_keep_errno(tmp_path: Path) -> None:
    with pytest.raises(aw.ModelNotFoundError) as info:
        read_file(tmp_path / "nope", "manifest")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(aw.BlobMissingError) as missing:
        read_file(tmp_path / "nope", "config", expected_size=1)
    assert missing.value.reason == "config blob file is missing"
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(aw.LoadError) as notdir:
        read_file(tmp_path / "file" / "below", "blob")
    assert notdir.value.errno == errno.ENOTDIR
    assert notdir.value.reason == "cannot open blob: Not a directory"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(aw.ManifestError) as looped:
        read_file(loop, "manifest")
    assert looped.value.errno == errno.ELOOP


def test_nul_in_a_path_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(aw.ManifestError) as info:
        read_file(f"{tmp_path}/a\0b", "manifest")
    assert info.value.reason == "manifest path contains a NUL character"
    assert "\0" not in str(info.value)
    with pytest.raises(aw.BlobError, match="blob path contains a NUL character"):
        read_file(f"{tmp_path}/a\0b", "blob")


def test_symlinks_are_followed(tmp_path: Path) -> None:
    # Ollama's own stores link manifests and models roots.
    (tmp_path / "target").write_bytes(b"{}")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert bytes(read_file(tmp_path / "link", "manifest", max_size=10)) == b"{}"


def test_a_file_that_shrinks_while_read_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    with open_file(path, "blob", expected_size=100) as f:
        os.truncate(path, 40)
        with pytest.raises(aw.BlobError) as info:
            f.read_all()
    assert type(info.value) is aw.BlobError
    assert info.value.reason == "blob shrank while being read: 40 of 100 bytes"


def test_read_error_keeps_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)

    def eio(*args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", eio)
    monkeypatch.setattr(os, "pread", eio)
    with pytest.raises(aw.LoadError) as info:
        read_file(path, "blob")
    assert info.value.errno == errno.EIO
    assert info.value.reason == "cannot read blob: Input/output error"
    with pytest.raises(aw.ManifestError) as manifest:
        read_file(path, "manifest")
    assert manifest.value.errno == errno.EIO


def test_no_thread_is_left(tmp_path: Path) -> None:
    before = threading.active_count()
    (tmp_path / "f").write_bytes(b"abc")
    for _ in range(50):
        assert bytes(read_file(tmp_path / "f", "blob", expected_size=3)) == b"abc"
    assert threading.active_count() == before
