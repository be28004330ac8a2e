"""Removing a model from a store, as ``ollama rm`` does.

The model's named entries go first (its ``manifests-v2`` entry, then its legacy manifest or
anchor, under either public host spelling), then every blob that entry reached and that no
other manifest, manifest list or manifest document still reaches (Ollama's ``RemoveNamed``
and ``RemoveUnreferencedBlobs``, ollama/ollama PR #16590 ``manifest/manifest.go``).

That order is what keeps a removal safe at every instant: until the last entry is gone the
model is still whole (an entry with all its blobs), and no blob is deleted while any entry
reaches it. A manifest that cannot be read might reach any blob, so while one exists no blob
is deleted at all (the result says which were kept, and why).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread

from ._errors import AsyncWeightsError, ManifestError, ModelNotFoundError
from ._files import read_file
from ._layout import Tree, blob_path, find_entries, list_entries
from ._manifest import Manifest, ManifestList, decode_document, decode_manifest
from ._names import ModelName
from ._store import ModelStore

__all__ = ["Removal", "remove_model", "remove_model_blocking"]

_BLOB_NAME = re.compile(r"sha256[-:]([0-9a-fA-F]{64})")
_MAX_DOCUMENT = 64 << 20  # a manifest document larger than this is not one Ollama wrote


@dataclass(frozen=True, slots=True)
class Removal:
    """What `remove_model` removed.

    Attributes:
        name: the model name as given.
        manifests: the entries removed (``manifests-v2`` link and legacy file or anchor).
        blobs: digests of the blobs deleted, no other manifest reaching them.
        kept: digests the model reached that stay: another manifest reaches them, or a
            manifest that cannot be read might (see `unreadable`).
        unreadable: manifests whose references could not be read (blobs were kept for them).
    """

    name: str
    manifests: list[Path]
    blobs: list[str]
    kept: list[str] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)


async def remove_model(
    name: str, *, store: str | os.PathLike[str] | ModelStore | None = None
) -> Removal:
    """Remove a model from the store, and the blobs no other model needs, like ``ollama rm``.

    The model's ``manifests-v2`` entry and legacy manifest (or anchor) are removed first,
    then each blob they reached that no remaining manifest, manifest list or manifest
    document reaches. The removal runs to its end in a worker thread even if the caller is
    cancelled meanwhile, so a store is never left half-removed by a cancellation.

    Args:
        name: the model name (Ollama's grammar; matched ignoring case, either public host).
        store: the models root or a `ModelStore`; defaults to ``$OLLAMA_MODELS``, else
            ``~/.ollama/models``.

    Returns:
        what was removed and what was kept.

    Raises:
        InvalidNameError, ModelNotFoundError, ManifestError: see `remove_model_blocking`.
    """
    if not isinstance(store, ModelStore):
        store = ModelStore(store)
    return await anyio.to_thread.run_sync(remove_model_blocking, store, name)


def remove_model_blocking(store: ModelStore, name: str) -> Removal:
    """Remove `name`'s manifest entries, then the blobs only they reached (blocking).

    Raises:
        InvalidNameError: `name` breaks Ollama's grammar.
        ModelNotFoundError: no entry for the name (or several, ignoring case).
        ManifestError: an entry cannot be removed (the errno kept); nothing was deleted
            after it.
    """
    parsed = ModelName.parse(name)
    root = store.root
    entries: list[tuple[Path, Tree]] = [
        (path, tree)
        for tree in ("manifests-v2", "manifests")
        for path in find_entries(root, tree, parsed.parts, name)
    ]
    if not entries:
        raise ModelNotFoundError(f"model not found in store {str(root)!r}", model=name)
    candidates: dict[str, None] = {}
    for path, _ in entries:
        digests, _readable = _references(root, path)
        candidates.update(dict.fromkeys(digests))
    removed_entries = []
    for path, tree in entries:  # manifests-v2 first: the source of truth goes first
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ManifestError(
                f"cannot remove manifest: {exc.strerror}", model=name, path=path, errno=exc.errno
            ) from exc
        removed_entries.append(path)
        _prune(path.parent, root / tree)
    retained: set[str] = set()
    unreadable: list[Path] = []
    for entry in list_entries(root):
        digests, readable = _references(root, entry.path)
        retained.update(digests)
        if not readable:
            unreadable.append(entry.path)
    deleted, kept = [], []
    for digest in candidates:
        if digest in retained or unreadable:
            kept.append(digest)
            continue
        try:
            os.unlink(blob_path(root, digest))
        except FileNotFoundError:
            continue
        except OSError:
            kept.append(digest)
            continue
        deleted.append(digest)
    return Removal(name, removed_entries, deleted, kept, unreadable)


def _references(root: Path, path: Path) -> tuple[list[str], bool]:
    """Every blob digest an entry reaches, and whether it could be read whole.

    A ``manifests-v2`` link reaches its target (even when the target is gone); a document
    reaches itself, its config and layers (anchor layers included: they name manifest
    documents); a manifest list reaches each child document and what that child reaches.
    """
    digests: list[str] = []
    if os.path.islink(path):
        match = _BLOB_NAME.fullmatch(os.path.basename(os.readlink(path)))
        if match:
            digests.append("sha256:" + match.group(1).lower())
    try:
        data = bytes(read_file(path, "manifest", max_size=_MAX_DOCUMENT))
        document = decode_document(data)
    except (AsyncWeightsError, OSError):
        return digests, os.path.islink(path) and not os.path.exists(path)
    own = "sha256:" + hashlib.sha256(data).hexdigest()
    if os.path.lexists(blob_path(root, own)):  # a manifest document kept as a blob (0.40)
        digests.append(own)
    readable = True
    if isinstance(document, ManifestList):
        for child in document.manifests:
            inline = child.inline
            if inline is not None:
                digests += _manifest_digests(inline)
                continue
            digests.append(child.digest.lower())
            child_path = blob_path(root, child.digest)
            if not os.path.lexists(child_path):
                continue
            try:
                child_data = bytes(read_file(child_path, "manifest", max_size=_MAX_DOCUMENT))
                digests += _manifest_digests(decode_manifest(child_data))
            except (AsyncWeightsError, OSError):
                readable = False
    else:
        digests += _manifest_digests(document)
    return digests, readable


def _manifest_digests(manifest: Manifest) -> list[str]:
    return [manifest.config.digest, *(layer.digest for layer in manifest.layers)]


def _prune(folder: Path, top: Path) -> None:
    """Remove empty folders from `folder` up to (not including) `top`, as Ollama prunes."""
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
