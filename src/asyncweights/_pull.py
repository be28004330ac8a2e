"""Pulling a model from a registry into the store, alone or while it loads.

    manifest ─► config + JSON layers, then tensor blobs, `Limits.pull_streams` at a time, in
    manifest order (a load's component first) ─► each blob hashed as it arrives, fsynced,
    renamed to its digest (a load reads each run of committed blobs: `_load._produce_pulled`)
      ─► the manifest, last, in Ollama 0.40's layout (`write_pulled_manifest`)

A blob is downloaded into ``blobs/.sha256-<hex>.partial`` (a name neither Ollama nor a loader
reads: Ollama resumes from its own ``.tmp``/``-partial`` names), under an exclusive ``flock``
so two pulls never write one file. Only bytes whose size and SHA-256 match the digest are
renamed to ``sha256-<hex>``; wrong bytes delete the partial. A pull that is cancelled or
loses its connection, or whose process is killed, keeps the partial, and the next attempt
(or the next pull) rehashes it and asks for the rest with ``Range``. Blobs already present
with the manifest's size are trusted, as Ollama trusts them (``x/transfer``), or rehashed
with ``verify=True``.

Every pull starts by sweeping the partials that are provably dead: no process holds their
lock (the kernel drops a ``flock`` when its holder exits, ``kill -9`` included) and they were
last written more than `PARTIAL_MAX_AGE` seconds ago. A younger unlocked partial is kept for
a resume; a locked one is never touched.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import httpx

from ._errors import (
    DigestMismatchError,
    InvalidNameError,
    RegistryError,
    SizeMismatchError,
    StoreWriteError,
    typed_error,
)
from ._limits import Limits
from ._manifest import MANIFEST_MEDIA_TYPES, Layer, Manifest, decode_manifest
from ._names import ModelName, blob_file_name
from ._plan import load_units
from ._progress import Phase, Progress, ProgressCallback, ProgressReporter
from ._registry import LIST_MEDIA_TYPES, RegistryClient, RemoteManifest, backoff, registry_url
from ._store import Model, ModelStore
from ._writer import write_pulled_manifest

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

__all__ = [
    "PullSession",
    "component_layers",
    "load_units",
    "open_session",
    "pull",
    "run_pull",
]

MiB = 1 << 20
#: Bytes rehashed per read when a partial download is resumed.
_CHUNK = 1 * MiB
_PARTIAL_SUFFIX = ".partial"
#: Seconds since its last write after which an unlocked partial is deleted by the next pull
#: (one day: long enough to resume an interrupted pull, short enough not to hoard disk).
PARTIAL_MAX_AGE = 24 * 3600.0


def partial_path(store: ModelStore, digest: str) -> Path:
    """Where a blob is downloaded before it is verified: ``blobs/.sha256-<hex>.partial``."""
    return store.blobs_dir / f".{blob_file_name(digest)}{_PARTIAL_SUFFIX}"


@dataclass
class _Counts:
    total_bytes: int = 0
    done_bytes: int = 0
    total_blobs: int = 0
    done_blobs: int = 0
    per_blob: dict[str, int] = field(default_factory=dict)


class PullSession:
    """One model being pulled: its manifest, and an event per blob set once it is committed.

    `open_session` makes it and `run_pull` runs it for a load, which takes each blob as it
    lands (`committed`, `next_commit`, `wait`).
    """

    def __init__(
        self,
        name: ModelName,
        label: str,
        store: ModelStore,
        client: RegistryClient,
        limits: Limits,
        reporter: ProgressReporter | None,
        verify: bool,
    ) -> None:
        self.name = name
        self.label = label
        self.store = store
        self.client = client
        self.limits = limits
        self.repository = f"{name.namespace}/{name.model}"
        self.reporter = reporter
        self.verify = verify
        self.started = time.monotonic()
        self.remote: RemoteManifest | None = None
        self.manifest: Manifest | None = None
        self.model: Model | None = None
        self.blobs: list[Layer] = []
        self._sizes: dict[str, int] = {}
        self._ready: dict[str, anyio.Event] = {}
        self._committed = anyio.Event()  # set (and replaced) each time a blob lands
        self._counts = _Counts()

    async def wait(self, digests: Iterable[str]) -> None:
        """Return once every blob named is committed to the store."""
        for digest in digests:
            event = self._ready.get(digest)
            if event is not None:
                await event.wait()

    # ----------------------------------------------------------------------------- progress

    def event(self, phase: Phase, digest: str | None = None) -> Progress:
        """The pull's progress so far, as one event for the whole model (and `digest`'s)."""
        c = self._counts
        return Progress(
            phase=phase,
            completed_bytes=c.done_bytes,
            total_bytes=c.total_bytes,
            completed_tensors=c.done_blobs,
            total_tensors=c.total_blobs,
            elapsed=time.monotonic() - self.started,
            model=self.label,
            digest=digest,
            digest_completed=0 if digest is None else c.per_blob.get(digest, 0),
            digest_total=0 if digest is None else self._sizes.get(digest, 0),
        )

    def _emit(self, digest: str | None, *, force: bool = False, phase: Phase = "pulling") -> None:
        if self.reporter is not None:
            self.reporter.emit(self.event(phase, digest), force=force)

    def _advance(self, digest: str, n: int) -> None:
        self._counts.per_blob[digest] = self._counts.per_blob.get(digest, 0) + n
        self._counts.done_bytes += n
        self._emit(digest)

    # ----------------------------------------------------------------------------- manifest

    async def fetch_manifest(self) -> Manifest:
        self._emit(None, force=True)
        await anyio.to_thread.run_sync(sweep_partials, self.store.blobs_dir, PARTIAL_MAX_AGE)
        remote = await self.client.manifest(self.repository, self.name.tag)
        manifest = decode_manifest(remote.data, model=self.label)
        self.remote, self.manifest = remote, manifest
        self.blobs = _blobs(manifest)
        self._sizes = {layer.digest: layer.size for layer in self.blobs}
        present = await anyio.to_thread.run_sync(self._present, self.blobs)
        c = self._counts
        c.total_blobs = len(self.blobs)
        c.total_bytes = sum(layer.size for layer in self.blobs)
        for layer in self.blobs:
            if layer.digest in present:
                c.done_blobs += 1
                c.done_bytes += layer.size
                c.per_blob[layer.digest] = layer.size
            else:
                self._ready[layer.digest] = anyio.Event()
        self.model = Model(self.store, manifest, label=self.label, path=None, digest=remote.digest)
        return manifest

    def _present(self, layers: list[Layer]) -> set[str]:
        """Blobs already in the store with the manifest's size (and digest, with verify)."""
        present = set()
        for layer in layers:
            path = self.store.blob_path(layer.digest)
            try:
                if path.stat().st_size != layer.size:
                    continue
            except OSError:
                continue
            if self.verify and not _hash_matches(path, layer.digest):
                continue
            present.add(layer.digest)
        return present

    def next_commit(self) -> anyio.Event:
        """An event set when the next blob lands (take it before checking, then wait)."""
        return self._committed

    def committed(self, digest: str) -> bool:
        """Whether the blob is in the store (present before the pull, or committed by it)."""
        event = self._ready.get(digest)
        return event is None or event.is_set()

    # ---------------------------------------------------------------------------- download

    async def download(self, order: list[Layer]) -> None:
        """Download every missing blob, `pull_streams` at a time, in `order`."""
        todo = iter([layer for layer in order if layer.digest in self._ready])

        async def worker() -> None:
            for layer in todo:
                await self._fetch_blob(layer)

        async with anyio.create_task_group() as tg:
            for _ in range(self.limits.pull_streams):
                tg.start_soon(worker)

    async def _fetch_blob(self, layer: Layer) -> None:
        event = self._ready[layer.digest]
        if event.is_set():
            return
        final = self.store.blob_path(layer.digest)
        partial = partial_path(self.store, layer.digest)
        try:
            await anyio.Path(self.store.blobs_dir).mkdir(parents=True, exist_ok=True)
            fd = await self._lock_or_await(layer, partial, final)
            if fd is not None:
                try:
                    await self._stream_into(fd, layer, partial, final)
                finally:
                    os.close(fd)  # releases the lock; the partial stays for a resume
        except OSError as exc:
            raise StoreWriteError(
                f"cannot write the blob: {exc.strerror or exc}",
                model=self.label,
                tensor=layer.name or None,
                digest=layer.digest,
                path=exc.filename if isinstance(exc.filename, str) else partial,
                errno=exc.errno,
            ) from exc
        self._counts.done_blobs += 1
        self._emit(layer.digest, force=True)
        event.set()
        self._committed.set()
        self._committed = anyio.Event()

    async def _lock_or_await(self, layer: Layer, partial: Path, final: Path) -> int | None:
        """The partial's fd under its lock, or None once another process committed the blob.

        While another process holds the lock this polls: the blob landing ends the wait; the
        lock coming free (its holder cancelled, failed or was killed) hands the download,
        and the bytes already written, to this pull.
        """
        limits = self.limits
        deadline = time.monotonic() + limits.registry_timeout * (limits.registry_retries + 1)
        waited = False
        while True:
            fd = await anyio.to_thread.run_sync(_open_locked, partial)
            # A blob already in place was checked by `_present` (by size, or rehashed with
            # `verify`); only one that lands while another process holds the lock is new.
            try:
                landed = waited and await anyio.to_thread.run_sync(_has_size, final, layer.size)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
            if fd is not None and landed:  # its writer committed it and let go meanwhile
                try:
                    await anyio.to_thread.run_sync(_discard, fd, partial)
                finally:
                    os.close(fd)
            elif fd is not None:
                return fd
            if landed:
                self._advance(layer.digest, layer.size)
                return None
            waited = True
            if time.monotonic() > deadline:
                raise RegistryError(
                    "another pull holds this blob and has not finished it",
                    registry=self.client.base_url,
                    repository=self.repository,
                    model=self.label,
                    digest=layer.digest,
                )
            await anyio.sleep(0.05)

    async def _stream_into(self, fd: int, layer: Layer, partial: Path, final: Path) -> None:
        size, digest = layer.size, layer.digest
        hasher, have = await anyio.to_thread.run_sync(_resume, fd, size)
        self._advance(digest, have)
        failures = 0
        while have < size:
            try:
                async with self.client.blob(self.repository, digest, start=have) as response:
                    if response.status_code == 200 and have:  # no Range support: start over
                        hasher, _ = await anyio.to_thread.run_sync(_restart, fd)
                        self._advance(digest, -have)
                        have = 0
                    # No await of ours inside this loop: a cancel or a failure then always
                    # lands inside httpx's stream, which closes its generators as it unwinds
                    # (an abandoned one warns under trio). Chunks come as the socket gives
                    # them (at most 64 KiB in httpcore), so a dropped connection keeps every
                    # byte received; each costs the loop tens of microseconds of hashing and
                    # writing, both without the GIL.
                    async for chunk in response.aiter_raw():
                        if have + len(chunk) > size:
                            raise SizeMismatchError(
                                f"registry sent more than the manifest's {size} bytes",
                                model=self.label,
                                tensor=layer.name or None,
                                digest=digest,
                            )
                        _write(fd, chunk, have, hasher)
                        have += len(chunk)
                        self._advance(digest, len(chunk))
            except SizeMismatchError:
                await anyio.to_thread.run_sync(_discard, fd, partial)
                raise
            except httpx.TransportError as exc:
                # The connection broke off: resume from the bytes written, after a pause.
                failures += 1
                if failures > self.limits.registry_retries:
                    raise self.client.broken(
                        f"download broke off {failures} times, last: "
                        f"{type(exc).__name__}: {exc or 'no detail'}",
                        self.repository,
                        digest,
                    ) from exc
                await anyio.sleep(backoff(failures - 1))
                continue
            if have < size:
                failures += 1
                if failures > self.limits.registry_retries:
                    raise self.client.broken(
                        f"download ended at {have} of {size} bytes {failures} times",
                        self.repository,
                        digest,
                    )
                await anyio.sleep(backoff(failures - 1))
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            await anyio.to_thread.run_sync(_discard, fd, partial)
            self._advance(digest, -have)
            raise DigestMismatchError(
                f"registry {self.client.base_url} sent bytes with sha256 {got}; nothing kept",
                model=self.label,
                tensor=layer.name or ("(config)" if layer == self.manifest_config else None),
                digest=digest,
            )
        await anyio.to_thread.run_sync(_commit, fd, partial, final)

    @property
    def manifest_config(self) -> Layer | None:
        return None if self.manifest is None else self.manifest.config

    async def write_manifest(self) -> None:
        assert self.remote is not None
        self._emit(None, force=True)
        remote = self.remote
        name = "/".join(self.name.parts[:3]) + ":" + self.name.tag

        def write() -> None:
            write_pulled_manifest(
                self.store.root,
                name,
                remote.data,
                list_data=remote.list_data,
                list_media_type=remote.list_media_type,
            )

        try:
            await anyio.to_thread.run_sync(write)
        except OSError as exc:
            raise StoreWriteError(
                f"cannot write the manifest: {exc.strerror or exc}",
                model=self.label,
                path=exc.filename if isinstance(exc.filename, str) else None,
                errno=exc.errno,
            ) from exc


def _blobs(manifest: Manifest) -> list[Layer]:
    """The distinct blobs a model needs: its config, then its layers, in manifest order.

    Layers that point at manifest documents (Ollama 0.40's legacy anchor) are not blobs to
    download: they are written from the manifest itself.
    """
    skip = MANIFEST_MEDIA_TYPES | LIST_MEDIA_TYPES
    seen: dict[str, Layer] = {manifest.config.digest: manifest.config}
    for layer in manifest.layers:
        if layer.media_type not in skip:
            seen.setdefault(layer.digest, layer)
    return list(seen.values())


# ------------------------------------------------------------------ blocking, in worker threads


def _open_locked(path: Path) -> int | None:
    """Open (create) the partial file under an exclusive lock; None if another process holds it.

    The lock is taken on an open file, so the file may have been deleted (a sweep, a
    digest mismatch) or committed between the open and the lock: then it is opened again.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)


def sweep_partials(blobs_dir: Path, max_age: float) -> list[str]:
    """Delete the dead partials in `blobs_dir`: unlocked and last written `max_age` s ago.

    Each candidate is locked (non-blocking) before it is checked and deleted, so a pull
    writing it (which holds the lock) is never disturbed, and a pull that opens it meanwhile
    sees the lock taken and tries again (`_open_locked` checks that the file it locked is
    still the one named). Returns the names deleted; errors are ignored (best effort).
    """
    try:
        names = [n for n in os.listdir(blobs_dir) if n.endswith(_PARTIAL_SUFFIX)]
    except OSError:
        return []
    swept = []
    now = time.time()
    for name in names:
        if not (name.startswith(".sha256-") and name.endswith(_PARTIAL_SUFFIX)):
            continue
        path = blobs_dir / name
        try:
            if now - path.stat().st_mtime <= max_age:
                continue
            fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Checked again under the lock: the file may have been resumed meanwhile.
            if now - os.fstat(fd).st_mtime > max_age and _same_file(fd, path):
                path.unlink()
                swept.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the lock
    return swept


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not deleted or replaced)."""
    try:
        st, named = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (named.st_dev, named.st_ino)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _resume(fd: int, size: int) -> tuple[hashlib._Hash, int]:
    """Rehash what an earlier attempt wrote; a partial longer than the blob starts over."""
    have = os.fstat(fd).st_size
    hasher = hashlib.sha256()
    if have > size:
        os.ftruncate(fd, 0)
        return hasher, 0
    offset = 0
    while offset < have:
        chunk = os.pread(fd, min(_CHUNK * 4, have - offset), offset)
        if not chunk:
            break
        hasher.update(chunk)
        offset += len(chunk)
    os.ftruncate(fd, offset)
    return hasher, offset


def _restart(fd: int) -> tuple[hashlib._Hash, int]:
    os.ftruncate(fd, 0)
    return hashlib.sha256(), 0


def _write(fd: int, chunk: bytes, offset: int, hasher: hashlib._Hash) -> None:
    hasher.update(chunk)
    view = memoryview(chunk)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _discard(fd: int, partial: Path) -> None:
    os.ftruncate(fd, 0)
    partial.unlink(missing_ok=True)


def _commit(fd: int, partial: Path, final: Path) -> None:
    os.fsync(fd)
    os.replace(partial, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _hash_matches(path: Path, digest: str) -> bool:
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(4 * _CHUNK):
                hasher.update(chunk)
    except OSError:
        return False
    return "sha256:" + hasher.hexdigest() == digest


# ---------------------------------------------------------------------------------- entry points


def open_session(
    name: object,
    store: str | os.PathLike[str] | ModelStore | None,
    registry: str | None,
    limits: Limits,
    verify: bool,
    *,
    insecure: bool = False,
    reporter: ProgressReporter | None = None,
) -> PullSession:
    """A pull of `name` into `store`, not started yet (no request is made here).

    Raises:
        InvalidNameError: `name` is not a model name (a path or a manifest cannot be pulled).
    """
    if not isinstance(name, str | ModelName) or (
        isinstance(name, str) and name.startswith(("/", ".", "~"))
    ):
        raise InvalidNameError(f"only a model name can be pulled, not {name!r}", model=str(name))
    parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
    label = str(name)
    if not isinstance(store, ModelStore):
        store = ModelStore(store)
    try:
        base = registry_url(parsed.host, parsed.scheme, registry, insecure=insecure)
    except ValueError as exc:
        raise InvalidNameError(str(exc), model=label) from None
    client = RegistryClient(
        base, timeout=limits.registry_timeout, retries=limits.registry_retries, model=label
    )
    return PullSession(parsed, label, store, client, limits, reporter, verify)


async def run_pull(
    session: PullSession,
    component: str | None,
    *,
    task_status: TaskStatus[Model],
) -> None:
    """Pull for a load: report the model once it can be planned from, then finish the pull.

    A manifest the session fetched already (`WeightCache.lease` keys its load by the
    manifest's digest first) is not fetched again. The task reports itself started once the
    manifest, the config and the JSON layers are in the store (the first tensor blobs
    download beside them); the tensor blobs of `component` come first, smallest first, then
    the others, and the manifest is written last.
    """
    async with session.client:
        manifest = session.manifest or await session.fetch_manifest()
        configs = [layer for layer in session.blobs if not layer.is_tensor]
        # Smallest first: a load takes every blob as it lands, so the first tensors come
        # after a few KiB instead of after the first (often the largest) tensor's blob.
        wanted = sorted(component_layers(manifest, component), key=lambda layer: layer.size)
        first = {layer.digest for layer in [*configs, *wanted]}
        rest = [layer for layer in session.blobs if layer.digest not in first]
        async with anyio.create_task_group() as tg:
            # One queue: the first tensor blobs download beside the small config blobs.
            tg.start_soon(session.download, [*configs, *wanted, *rest])
            await session.wait(layer.digest for layer in configs)
            assert session.model is not None
            task_status.started(session.model)
        await session.write_manifest()


def component_layers(manifest: Manifest, component: str | None) -> list[Layer]:
    """The tensor layers a load of `component` reads (all of them for None), in order."""
    layers = manifest.tensor_layers
    if component:
        layers = [layer for layer in layers if (layer.name or "").startswith(component + "/")]
    return layers


async def pull(
    name: str | ModelName,
    *,
    store: str | os.PathLike[str] | ModelStore | None = None,
    registry: str | None = None,
    insecure: bool = False,
    verify: bool = False,
    on_progress: ProgressCallback | None = None,
    limits: Limits | None = None,
) -> Model:
    """Pull a model from its registry into the store, as ``ollama pull`` does.

    Missing blobs are downloaded `Limits.pull_streams` at a time, hashed as they arrive and
    renamed to their digest only when size and SHA-256 match; the manifest is written last,
    in Ollama 0.40's layout (a ``manifests-v2`` link and the legacy ``manifests`` anchor), so
    Ollama and asyncweights both see the model.

    Args:
        name: ``model[:tag]``, ``ns/model[:tag]`` or ``host/ns/model[:tag]``; the host
            (default ``registry.ollama.ai``) is the registry unless `registry` is given.
        store: the models root or a `ModelStore`.
        registry: base URL to fetch from instead of the name's host (a mirror, a local
            registry); ``http://`` here is the explicit request for plain HTTP.
        insecure: use plain HTTP for a registry given without a scheme.
        verify: rehash blobs already present instead of trusting their size.
        on_progress: receives `Progress` events with ``phase="pulling"``: bytes of the
            whole pull, and per blob ``digest``, ``digest_completed``, ``digest_total``
            (``Progress.to_ollama()`` gives Ollama's pull shape).
        limits: ``pull_streams``, ``registry_timeout``, ``registry_retries``.

    Returns:
        The pulled model, opened from the store.

    Raises:
        RegistryError: a subclass per HTTP failure, naming registry and repository.
        DigestMismatchError: the registry sent bytes that do not match a digest (nothing of
            that blob is kept). ManifestError, InvalidNameError: as their names say.
    """
    limits = limits or Limits()
    reporter = ProgressReporter(on_progress, limits.progress_interval, str(name))
    session = open_session(
        name, store, registry, limits, verify, insecure=insecure, reporter=reporter
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            try:
                async with session.client:
                    await session.fetch_manifest()
                    await session.download(session.blobs)
                    await session.write_manifest()
            except BaseException:
                reporter.close(None)
                raise
            reporter.close(session.event("done"))
    except BaseExceptionGroup as group:
        error = typed_error(group, model=session.label)
        if error is None:
            raise
        raise error from error.__cause__
    return await session.store.open(name)
