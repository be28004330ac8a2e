"""Where a model's manifest lives on disk, in every layout Ollama has written.

docs/format.md#store-layouts gives the rules with their upstream sources. In short:

* ``manifests-v2/<host>/<namespace>/<model>/<tag>`` (Ollama 0.40): a relative symlink to
  ``blobs/sha256-<digest of the manifest bytes>``, else a hard link to that blob, else a copy
  of it. The public host is written ``ollama.com`` and a ``:`` in a host ``%3A``. It is the
  source of truth: read first, and skipped when its link dangles or its target's bytes do not
  hash to the target's name (ollama/ollama PR #16590, ``manifest/paths.go``, ``manifest.go``).
* ``manifests/<host>/<namespace>/<model>/<tag>`` (every version): the manifest itself, with the
  public host written ``registry.ollama.ai``; since 0.40 an "anchor" that adds layers pointing
  at the manifest documents.
* ``blobs/sha256-<hex>``; Ollama before 0.1.30 wrote ``blobs/sha256:<hex>`` and renames such
  files when its server starts (``server/fixblobs.go``, ollama ``703684a82``). asyncweights
  reads either spelling and renames nothing.

Every function here blocks (file system calls); async callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._errors import ManifestError, ModelNotFoundError
from ._files import read_file
from ._manifest import MANIFEST_MEDIA_TYPE, Manifest, ManifestList, decode_document
from ._names import DEFAULT_HOST

__all__ = [
    "PUBLIC_HOSTS",
    "V2_HOST",
    "Document",
    "Entry",
    "blob_path",
    "decode_host",
    "encode_host",
    "list_entries",
    "read_document",
    "resolve",
    "store_root_of",
]

#: The two spellings of Ollama's public registry host (equal, ignoring case).
PUBLIC_HOSTS = ("registry.ollama.ai", "ollama.com")
#: How Ollama 0.40 spells the public host under ``manifests-v2/``.
V2_HOST = "ollama.com"
LEGACY_TREE = "manifests"
V2_TREE = "manifests-v2"

Tree = Literal["manifests", "manifests-v2"]
#: host, namespace, model, tag
Parts = tuple[str, str, str, str]
_BLOB_NAME = re.compile(r"sha256[-:]([0-9a-fA-F]{64})")


@dataclass(frozen=True, slots=True)
class Entry:
    """One named manifest entry on disk: its name parts (public host as
    ``registry.ollama.ai``, ``%3A`` decoded), the file or link, and the tree it is in."""

    parts: Parts
    path: Path
    tree: Tree


@dataclass(frozen=True, slots=True)
class Document:
    """A manifest document as read from an entry.

    Attributes:
        path: the entry (link or file) it was read through.
        data: the bytes.
        digest: ``sha256:<hex>`` of the bytes.
        layout: ``"manifests-v2 symlink"``, ``"manifests-v2 hard link"``,
            ``"manifests-v2 copy"``, ``"manifests"`` (a legacy file) or ``"file"`` (a path
            outside both trees).
        modified: the entry's modification time (seconds since the epoch).
        skipped: why a ``manifests-v2`` entry for the same name was not used, if one was not.
        decoded: the document decoded, when reading it needed that (a legacy file is decoded
            to tell an anchor): the caller need not decode it again.
    """

    path: Path
    data: bytes
    digest: str
    layout: str
    modified: float
    skipped: str | None = None
    decoded: Manifest | ManifestList | None = None


class InvalidEntryError(Exception):
    """A ``manifests-v2`` entry that cannot be trusted (its reason says why)."""

    def __init__(self, reason: str, *, dangling: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.dangling = dangling


def encode_host(host: str) -> str:
    """A host as a ``manifests-v2`` folder name: ``:`` written ``%3A``."""
    return host.replace(":", "%3A")


def decode_host(folder: str) -> str:
    """A ``manifests-v2`` host folder name back to the host (``%3A`` or ``%3a`` → ``:``)."""
    return folder.replace("%3A", ":").replace("%3a", ":")


def is_public(host: str) -> bool:
    """Whether `host` is Ollama's public registry under either spelling, ignoring case."""
    return host.casefold() in PUBLIC_HOSTS


def _host_key(host: str) -> str:
    host = decode_host(host)
    return DEFAULT_HOST if is_public(host) else host.casefold()


def _part_keys(parts: Parts) -> Parts:
    host, namespace, model, tag = parts
    return (_host_key(host), namespace.casefold(), model.casefold(), tag.casefold())


def blob_path(root: Path, digest: str) -> Path:
    """The blob file of a valid ``sha256:<hex>`` digest: ``sha256-<hex>``, else the
    ``sha256:<hex>`` spelling of Ollama before 0.1.30 when only that one exists."""
    hexdigest = digest[7:].lower()
    path = root / "blobs" / f"sha256-{hexdigest}"
    if not os.path.lexists(path):
        old = root / "blobs" / f"sha256:{hexdigest}"
        if os.path.lexists(old):
            return old
    return path


def store_root_of(path: Path) -> tuple[Path, Tree | Literal["blobs"]] | None:
    """The store a manifest path lies in, and the tree: ``<root>/manifests[-v2]/h/n/m/t`` or
    ``<root>/blobs/sha256-<hex>``; None for a path in neither place."""
    parts = Path(os.path.abspath(path)).parts
    if len(parts) >= 3 and parts[-2] == "blobs" and _BLOB_NAME.fullmatch(parts[-1]):
        return Path(*parts[:-2]), "blobs"
    if len(parts) >= 6 and parts[-5] in (LEGACY_TREE, V2_TREE):
        tree: Tree = "manifests" if parts[-5] == LEGACY_TREE else "manifests-v2"
        return Path(*parts[:-5]), tree
    return None


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_document(
    root: Path, path: Path, tree: Tree | Literal["blobs", "file"], max_size: int
) -> Document:
    """Read and check the manifest document at `path`.

    A ``manifests-v2`` symlink must point at ``blobs/sha256-<hex>`` of this store, and the
    target's bytes must hash to that name (Ollama's ``OpenVerifiedManifest``); a blob path
    likewise. A legacy anchor keeps its file's bytes, but its identity is the digest of the
    runnable manifest document it anchors, never of the anchor file.

    The bytes are read through `read_file`: a regular file of at most `max_size` bytes.

    Raises:
        InvalidEntryError: a ``manifests-v2`` or blob entry that fails those checks.
        OSError: the entry cannot be looked at (FileNotFoundError when it does not exist).
        AsyncWeightsError: from `read_file` (not a regular file, too big, unreadable).
    """
    info = os.lstat(path)
    layout = "manifests" if tree == "manifests" else "file"
    if tree == "manifests-v2" and stat.S_ISLNK(info.st_mode):
        target = Path(os.path.realpath(path))
        match = _BLOB_NAME.fullmatch(target.name)
        if not os.path.exists(target):
            raise InvalidEntryError(
                f"manifests-v2 link {os.readlink(path)!r} dangles", dangling=True
            )
        blob = blob_path(root, f"sha256:{match.group(1)}") if match else None
        if blob is None or not os.path.exists(blob) or not os.path.samefile(target, blob):
            raise InvalidEntryError(
                f"manifests-v2 link {os.readlink(path)!r} does not point at a blob of the store"
            )
        data = _read(target, max_size)
        digest = _sha256(data)
        assert match is not None
        if digest[7:] != match.group(1).lower():
            raise InvalidEntryError(
                f"manifests-v2 link target {target.name} holds bytes that hash to {digest}"
            )
        return Document(path, data, digest, "manifests-v2 symlink", os.stat(path).st_mtime)
    data = _read(path, max_size)
    digest = _sha256(data)
    if tree == "blobs":
        match = _BLOB_NAME.fullmatch(Path(path).name)
        if match is None or digest[7:] != match.group(1).lower():
            raise InvalidEntryError(f"blob {Path(path).name} holds bytes that hash to {digest}")
    elif tree == "manifests-v2":
        layout = "manifests-v2 copy"
        if info.st_nlink > 1:
            blob = blob_path(root, digest)
            if os.path.exists(blob) and os.path.samefile(blob, path):
                layout = "manifests-v2 hard link"
    else:
        decoded = _decode_quietly(data)
        anchored = _anchored_digest(decoded)
        if anchored is not None:
            digest = anchored
        return Document(Path(path), data, digest, layout, info.st_mtime, decoded=decoded)
    return Document(Path(path), data, digest, layout, info.st_mtime)


def _read(path: Path, max_size: int) -> bytes:
    return bytes(read_file(path, "manifest", max_size=max_size, cap="Limits.max_manifest_bytes"))


def _decode_quietly(data: bytes) -> Manifest | ManifestList | None:
    """The document decoded, or None when it is not a valid one (the caller reports that)."""
    try:
        return decode_document(data)
    except ManifestError:
        return None


def _anchored_digest(document: Manifest | ManifestList | None) -> str | None:
    """The runnable manifest document's digest named by an anchor's layers, if any."""
    layers = getattr(document, "layers", None) or []
    for layer in layers:
        if layer.media_type == MANIFEST_MEDIA_TYPE:
            digest: str = layer.digest
            return digest
    return None


def _children(folder: Path, errors: list[OSError] | None = None) -> list[Path]:
    """The entries of `folder`, sorted; none when it is absent or not a folder.

    Other OS errors (EACCES, ELOOP …) are raised, or appended to `errors` when given, so a
    listing goes on past an unreadable folder.
    """
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        if errors is None:
            raise
        if exc.filename is None:
            exc.filename = os.fspath(folder)
        errors.append(exc)
        return []


def _is_entry(path: Path, errors: list[OSError] | None = None) -> bool:
    """A file or a symlink (dangling ones included): what Ollama's listing counts."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        if errors is None:
            raise
        errors.append(exc)
        return False
    return stat.S_ISREG(mode) or (stat.S_ISLNK(mode) and not os.path.isdir(path))


def _matches(root: Path, tree: Tree, name: Parts) -> list[Path]:
    """Entries of `tree` whose four parts equal `name`'s ignoring case (hosts as Ollama
    compares them: both public spellings alike, ``%3A`` decoded)."""
    keys = _part_keys(name)
    candidates = [root / tree]
    for level, key in enumerate(keys):
        candidates = [
            child
            for parent in candidates
            for child in _children(parent)
            if (_host_key(child.name) if level == 0 else child.name.casefold()) == key
        ]
    return [c for c in candidates if _is_entry(c)]


def _exact_paths(root: Path, tree: Tree, name: Parts) -> list[Path]:
    given, *rest = name
    if tree == "manifests-v2":
        host = V2_HOST if is_public(given) else given
        return [root / V2_TREE / encode_host(host) / Path(*rest)]
    hosts = [given]
    if is_public(given):
        hosts += [h for h in PUBLIC_HOSTS if h != given]
    return [root / LEGACY_TREE / h / Path(*rest) for h in hosts]


def find_entries(root: Path, tree: Tree, name: Parts, label: str) -> list[Path]:
    """The entries of `tree` for `name`: the exact paths when they exist, else the one that
    matches ignoring case.

    Raises:
        ModelNotFoundError: several entries match ignoring case.
    """
    exact = [p for p in _exact_paths(root, tree, name) if _is_entry(p)]
    if exact:
        return exact
    found = _matches(root, tree, name)
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(root)) for p in found)
        raise ModelNotFoundError(f"model name is ambiguous ignoring case: {listed}", model=label)
    return found


def resolve(root: Path, name: Parts, label: str, max_size: int) -> Document:
    """Read the manifest document of `name`: ``manifests-v2`` first, then ``manifests``.

    Raises:
        ModelNotFoundError: no entry for the name (or several ignoring case).
        ManifestError: the only entry is a ``manifests-v2`` link that fails its checks.
        OSError: an entry exists but cannot be read.
    """
    skipped: InvalidEntryError | None = None
    for path in find_entries(root, "manifests-v2", name, label):
        try:
            return read_document(root, path, "manifests-v2", max_size)
        except InvalidEntryError as exc:
            skipped = exc
    for path in find_entries(root, "manifests", name, label):
        document = read_document(root, path, "manifests", max_size)
        if skipped is None:
            return document
        return Document(
            document.path, document.data, document.digest, document.layout,
            document.modified, skipped.reason, document.decoded,
        )  # fmt: skip
    default = _exact_paths(root, "manifests", name)[0]
    if skipped is not None and not skipped.dangling:
        raise ManifestError(
            f"{skipped.reason}, and there is no legacy manifest to fall back to",
            model=label,
            path=_exact_paths(root, "manifests-v2", name)[0],
        )
    reason = f"model not found in store {str(root)!r}"
    if skipped is not None:
        reason += f" ({skipped.reason}, and there is no legacy manifest)"
    raise ModelNotFoundError(reason, model=label, path=default)


def list_entries(root: Path, errors: list[OSError] | None = None) -> list[Entry]:
    """Every named entry of both trees, one per name ignoring case (``manifests-v2`` first).

    Names are normalized as Ollama lists them: either public host spelling becomes
    ``registry.ollama.ai``; a ``%3A`` in a ``manifests-v2`` host becomes ``:``. The caller
    validates the names (temporary files start with ``.``, which no name does). A folder or
    entry that cannot be read (EACCES, a symlink loop) is skipped and its OS error appended
    to `errors` when given, else raised.
    """
    entries: dict[Parts, Entry] = {}
    for tree in ("manifests-v2", "manifests"):
        tree_t: Tree = "manifests-v2" if tree == "manifests-v2" else "manifests"
        for host in _children(root / tree, errors):
            for ns in _children(host, errors):
                for model in _children(ns, errors):
                    for tag in _children(model, errors):
                        if not _is_entry(tag, errors):
                            continue
                        host_name = decode_host(host.name) if tree == "manifests-v2" else host.name
                        if is_public(host_name):
                            host_name = DEFAULT_HOST
                        parts = (host_name, ns.name, model.name, tag.name)
                        entries.setdefault(_part_keys(parts), Entry(parts, tag, tree_t))
    return list(entries.values())
