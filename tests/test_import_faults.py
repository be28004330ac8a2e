"""import_model is all or nothing: full disks, EIO, bad sources and kill -9 leave no garbage."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from safetensors.numpy import save_file

import asyncweights as aw
from asyncweights._writer import STALE_TEMP_AGE, remove_stale_temps, temp_file

MiB = 1 << 20


def write_source(root: Path, seed: int, sizes: list[int], shared: bool = True) -> dict[str, bytes]:
    """A plain HF folder with one F32 tensor per size (bytes); tensor 'shared' is the same
    in every source (so imports share its blob)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}.weight": rng.standard_normal(n // 4).astype(np.float32) for i, n in
               enumerate(sizes)}  # fmt: skip
    if shared:
        tensors["shared.weight"] = np.arange(1024, dtype=np.float32)
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architectures": ["Toy"]}))
    return {k: v.tobytes() for k, v in tensors.items()}


def snapshot(store: Path) -> dict[str, bytes]:
    """Every file and folder under the store, with the files' bytes."""
    out: dict[str, bytes] = {}
    for dirpath, dirs, files in os.walk(store):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), store) + "/"] = b""
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, store)] = Path(path).read_bytes()
    return out


async def check_loads(store: Path, name: str, expected: dict[str, bytes]) -> None:
    weights = await aw.load_weights(name, store=store, verify=True)
    assert sorted(weights) == sorted(expected)
    for key, data in expected.items():
        assert bytes(memoryview(weights[key])) == data, key  # type: ignore[arg-type]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs: needs root (CI runs as root); always unmounted."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); not running as root here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=30)


async def test_full_disk_fails_typed_and_leaves_the_store_as_it_was(
    tmp_path: Path, small_disk: Path
) -> None:
    store = small_disk / "store"
    first = write_source(tmp_path / "a", 1, [MiB, MiB])
    await aw.import_model(tmp_path / "a", "a", store=store)
    before = snapshot(store)
    free = os.statvfs(small_disk).f_bfree
    write_source(tmp_path / "b", 2, [3 * MiB, 3 * MiB, 3 * MiB])
    with pytest.raises(aw.StoreWriteError) as info:
        await aw.import_model(tmp_path / "b", "b", store=store)
    err = info.value
    assert isinstance(err, OSError)
    assert err.errno == errno.ENOSPC
    assert err.model == "b"
    assert err.store == store
    assert err.path is not None
    assert err.path.parent == store / "blobs"
    assert re.fullmatch(r"\.asyncweights-\d+-\w+\.tmp", err.path.name)
    message = str(err)
    assert message.startswith("cannot write the store: No space left on device (model 'b', ")
    assert f"store {str(store)!r}" in message
    assert "errno ENOSPC" in message
    assert snapshot(store) == before  # no orphan blob, no temp file, no manifest folder
    assert os.statvfs(small_disk).f_bfree == free
    # The store still works: the next import that fits succeeds, and the first model loads.
    third = write_source(tmp_path / "c", 3, [MiB])
    await aw.import_model(tmp_path / "c", "c", store=store)
    await check_loads(store, "c", third)
    await check_loads(store, "a", first)


def _fail_nth(monkeypatch: pytest.MonkeyPatch, name: str, n: int, code: int) -> list[int]:
    """Make the `n`-th call of os.<name> raise OSError(code); the calls are counted."""
    real = getattr(os, name)
    calls = [0]

    def failing(*args: object) -> object:
        calls[0] += 1
        if calls[0] == n:
            raise OSError(code, os.strerror(code))
        return real(*args)

    monkeypatch.setattr(os, name, failing)
    return calls


async def test_eio_while_writing_removes_the_blobs_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    first = write_source(tmp_path / "a", 1, [4096])
    await aw.import_model(tmp_path / "a", "a", store=store)
    before = snapshot(store)
    write_source(tmp_path / "b", 2, [4096] * 6)
    calls = _fail_nth(monkeypatch, "fsync", 9, errno.EIO)  # several blobs are in place by then
    with pytest.raises(aw.StoreWriteError) as info:
        await aw.import_model(tmp_path / "b", "b", store=store, limits=aw.Limits(workers=1))
    monkeypatch.undo()
    assert calls[0] >= 9
    assert info.value.errno == errno.EIO
    assert "cannot write the store: Input/output error (model 'b', store " in str(info.value)
    assert snapshot(store) == before
    await check_loads(store, "a", first)


async def test_unreadable_source_file_fails_typed_and_removes_its_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    write_source(tmp_path / "b", 2, [4096] * 6)
    _fail_nth(monkeypatch, "pread", 4, errno.EIO)
    with pytest.raises(aw.SourceError) as info:
        await aw.import_model(tmp_path / "b", "b", store=store, limits=aw.Limits(workers=1))
    monkeypatch.undo()
    err = info.value
    assert err.errno == errno.EIO
    assert err.model == "b"
    assert err.store == store
    assert err.path == tmp_path / "b" / "model.safetensors"
    assert str(err).startswith("cannot read the source file: Input/output error (model 'b', ")
    assert snapshot(store) == {}  # even the folders it made are gone
    assert not store.exists()


async def test_truncated_source_file_fails_before_writing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_source(tmp_path / "b", 2, [4096] * 2)
    path = tmp_path / "b" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(aw.HeaderError) as info:
        await aw.import_model(tmp_path / "b", "b", store=store)
    assert info.value.path == path
    assert info.value.model == "b"
    assert not store.exists()


async def test_failing_progress_callback_rolls_back(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_source(tmp_path / "b", 2, [4096] * 3)
    seen: list[str] = []

    def callback(event: aw.Progress) -> None:
        seen.append(event.phase)
        if event.phase == "writing":
            raise RuntimeError("consumer gone")

    with pytest.raises(aw.LoadError, match="progress callback raised RuntimeError"):
        await aw.import_model(
            tmp_path / "b", "b", store=store, on_progress=callback,
            limits=aw.Limits(progress_interval=0.0, workers=1),
        )  # fmt: skip
    assert seen[0] == "planning"
    assert "writing" in seen
    assert not [p for p in store.rglob("*") if p.is_file()]


async def test_cancelled_import_rolls_back(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_source(tmp_path / "b", 2, [4096] * 8)
    with anyio.CancelScope() as scope:

        async def cancel_on_first_write(event: aw.Progress) -> None:
            if event.phase == "writing" and event.completed_tensors >= 2:
                scope.cancel()

        await aw.import_model(
            tmp_path / "b", "b", store=store, on_progress=cancel_on_first_write,
            limits=aw.Limits(progress_interval=0.0, workers=1),
        )  # fmt: skip
    assert scope.cancelled_caught
    assert not [p for p in store.rglob("*") if p.is_file()]


async def test_progress_reports_bytes_hashed_and_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = 3 * (8 << 20) // 2  # copied in two chunks of 8 MiB and 4 MiB
    expected = write_source(tmp_path / "b", 2, [big, 4096])
    real_pread = os.pread

    def slow_pread(fd: int, n: int, offset: int) -> bytes:
        time.sleep(0.2)  # time for the ticker to see the state between two chunks
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", slow_pread)
    events: list[aw.Progress] = []
    await aw.import_model(
        tmp_path / "b", "b", store=tmp_path / "s", on_progress=events.append,
        limits=aw.Limits(progress_interval=0.01, workers=1),
    )  # fmt: skip
    total = sum(len(v) for v in expected.values())
    assert events[0].phase == "planning"
    assert events[0].completed_bytes == 0
    assert events[-1].phase == "done"
    assert (events[-1].completed_bytes, events[-1].total_bytes) == (total, total)
    assert (events[-1].completed_tensors, events[-1].total_tensors) == (3, 3)
    writing = [e for e in events if e.phase == "writing"]
    done = [e.completed_bytes for e in writing]
    assert done == sorted(done)
    assert all(e.total_bytes == total for e in writing)
    # Layer order: shared.weight (4096 B), t0.weight (12 MiB), t1.weight (4096 B). The first
    # 8 MiB chunk of t0 is reported once it is hashed and written, before t0 is done.
    assert 4096 + (8 << 20) in done
    assert events[-1].to_ollama()["status"] == "success"
    assert writing[0].to_ollama()["status"] == "writing b"


# ------------------------------------------------------------------------------ temp files


def test_stale_temp_files_are_removed_only_when_provably_dead(tmp_path: Path) -> None:
    old = time.time() - STALE_TEMP_AGE - 60
    dead = tmp_path / ".asyncweights-999999-dead.tmp"  # no process holds its lock
    young = tmp_path / ".asyncweights-999999-young.tmp"
    foreign = [".sha256-abc.tmp", "sha256-123456", "sha256-abc-partial", "x.tmp"]
    for p in [dead, young, *(tmp_path / f for f in foreign)]:
        p.write_bytes(b"x")
    for p in [dead, *(tmp_path / f for f in foreign)]:
        os.utime(p, (old, old))
    with temp_file(tmp_path) as (f, live_name):
        f.write(b"being written")
        f.flush()
        os.utime(live_name, (old, old))  # even an old-looking file is kept while locked
        assert remove_stale_temps(tmp_path) == [dead.name]
        assert Path(live_name).exists()
    assert sorted(os.listdir(tmp_path)) == sorted([young.name, *foreign])


def test_a_live_writer_in_another_process_keeps_its_temp_file(tmp_path: Path) -> None:
    holder = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from asyncweights._writer import temp_file
        with temp_file(Path(sys.argv[1])) as (f, name):
            old = time.time() - 3600
            os.utime(name, (old, old))
            print(name, flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        name = proc.stdout.readline().strip()
        assert remove_stale_temps(tmp_path) == []
        assert Path(name).exists()
        proc.send_signal(signal.SIGKILL)  # the lock dies with the process …
        proc.wait(timeout=30)
        assert remove_stale_temps(tmp_path) == [Path(name).name]  # … and the file can go
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


_SLOW_IMPORT = textwrap.dedent(
    """
    import os, sys, time, anyio, asyncweights as aw
    real = os.fsync
    def slow_fsync(fd):
        time.sleep(0.01)
        real(fd)
    os.fsync = slow_fsync
    print("start", flush=True)
    anyio.run(lambda: aw.import_model(sys.argv[1], "m", store=sys.argv[2]))
    print("done", flush=True)
    """
)


async def test_kill_9_at_random_points_then_reimport_and_load(tmp_path: Path) -> None:
    expected = write_source(tmp_path / "src", 5, [64 << 10] * 40)
    rng = random.Random(20261130)
    for round_ in range(4):
        store = tmp_path / f"store{round_}"  # each round kills a fresh import
        command = [sys.executable, "-c", _SLOW_IMPORT, str(tmp_path / "src"), str(store)]
        async with await anyio.open_process(command, stderr=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None
            with anyio.fail_after(60):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 64)
                assert line == b"start"
                await anyio.sleep(rng.uniform(0.0, 0.5))  # the import takes about 0.6 s
                proc.send_signal(signal.SIGKILL)
                assert await proc.wait() == -signal.SIGKILL
        # Whatever the killed import left: complete blobs only, under their own digests.
        for blob in (store / "blobs").glob("sha256-*") if (store / "blobs").exists() else []:
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name[7:], round_
        temps = list(store.rglob(".asyncweights-*.tmp"))
        for p in temps:  # as if the killed import had died long ago
            os.utime(p, (time.time() - STALE_TEMP_AGE - 1,) * 2)
        model = await aw.import_model(tmp_path / "src", "m", store=store)
        assert not list(store.rglob(".asyncweights-*.tmp")), round_
        await check_loads(store, "m", expected)
        referenced = {layer.digest for layer in [model.manifest.config, *model.manifest.layers]}
        on_disk = {"sha256:" + p.name[7:] for p in (store / "blobs").glob("sha256-*")}
        assert on_disk == referenced, round_


async def test_roll_back_keeps_blobs_any_manifest_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_source(tmp_path / "b", 2, [4096] * 4)
    reference = await aw.import_model(tmp_path / "b", "b", store=tmp_path / "ref")
    kept = reference.tensor_layers[0].digest  # the first blob the import writes
    store = tmp_path / "store"
    # Another writer's manifest (here in Ollama 0.40's manifests-v2 tree) names that blob.
    other = store / "manifests-v2/registry.ollama.ai/library/other/latest"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"layers": [{"digest": kept}]}))
    _fail_nth(monkeypatch, "fsync", 6, errno.EIO)
    with pytest.raises(aw.StoreWriteError):
        await aw.import_model(tmp_path / "b", "b", store=store, limits=aw.Limits(workers=1))
    monkeypatch.undo()
    assert sorted(p.name for p in (store / "blobs").iterdir()) == ["sha256-" + kept[7:]]


def test_next_import_sweeps_every_manifest_folder(tmp_path: Path) -> None:
    store = tmp_path / "store"
    folders = [store / "blobs", store / "manifests/registry.ollama.ai/library/other"]
    old = time.time() - STALE_TEMP_AGE - 1
    for folder in folders:
        folder.mkdir(parents=True)
        dead = folder / ".asyncweights-4242-killed.tmp"
        dead.write_bytes(b"partial")
        os.utime(dead, (old, old))
    write_source(tmp_path / "src", 1, [4096])
    anyio.run(lambda: aw.import_model(tmp_path / "src", "m", store=store))
    assert not list(store.rglob(".asyncweights-*"))


async def test_roll_back_keeps_a_blob_another_writer_reused_and_drops_its_own_twins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "b"
    src.mkdir()
    same = np.arange(1024, dtype=np.float32)
    tensors = {"a.weight": same, "b.weight": same.copy()}  # one blob, written twice
    tensors |= {f"c{i}.weight": np.full(1024, i, np.float32) for i in range(4)}
    save_file(tensors, str(src / "model.safetensors"))
    # E0 "data" blobs hold no name, so equal tensors share one blob.
    reference = await aw.import_model(src, "b", store=tmp_path / "ref", layout="data")
    names = {layer.name: layer.digest for layer in reference.tensor_layers}
    assert names["a.weight"] == names["b.weight"]
    twin, taken = names["a.weight"], names["c0.weight"]
    store = tmp_path / "store"
    real_fsync = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        # Blob and folder fsyncs: a (2), b, its twin (1), c0 (2), c1's blob and then its
        # folder: a, c0 and c1 are in place when that fails.
        if calls[0] == 7:
            # Another writer reuses c0's blob now (as write_blob does: it touches it).
            path = store / "blobs" / ("sha256-" + taken[7:])
            later = path.stat().st_mtime_ns + 10**9
            os.utime(path, ns=(later, later))
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(aw.StoreWriteError):
        await aw.import_model(src, "b", store=store, layout="data", limits=aw.Limits(workers=1))
    monkeypatch.undo()
    assert calls[0] == 7
    assert sorted(p.name for p in (store / "blobs").iterdir()) == ["sha256-" + taken[7:]]
    assert twin != taken
