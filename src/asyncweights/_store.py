"""The models root, Ollama's model-name grammar, and manifest and blob paths.

FORMAT.md §1 is the reference. Names are parsed with Ollama's official rules
(`types/model/name.go`), so a name that Ollama rejects is rejected here, and no name or
digest can build a path outside the store.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.to_thread

from ._errors import (
    AsyncWeightsError,
    InvalidDigestError,
    InvalidNameError,
    ManifestError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from ._files import read_file
from ._limits import Limits

if TYPE_CHECKING:
    from ._layout import Document
    from ._manifest import Manifest, ManifestList, ManifestRef
    from ._model import Model

__all__ = ["DEFAULT_HOST", "DEFAULT_NAMESPACE", "DEFAULT_TAG", "ModelName", "ModelStore"]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
_MISSING = "!MISSING!"

_DIGEST = re.compile(r"sha256:[0-9a-fA-F]{64}")
# First character, then the later ones, per part (FORMAT.md §1.4); ASCII only.
_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_LATER = _FIRST | frozenset("-_")
_LIMITS = {"host": 350, "namespace": 80, "model": 80, "tag": 80}


@dataclass(frozen=True, slots=True)
class ModelName:
    """A parsed, validated model name: host, namespace, model and tag.

    Case is kept as given; matching against the names on disk ignores case.
    """

    host: str = DEFAULT_HOST
    namespace: str = DEFAULT_NAMESPACE
    model: str = ""
    tag: str = DEFAULT_TAG
    scheme: str = "https"

    @classmethod
    def parse(cls, name: str) -> ModelName:
        """Parse `name` with Ollama's rules and validate every part.

        Raises:
            InvalidNameError: a part is empty, too long or has a character Ollama forbids.
        """
        if not isinstance(name, str):
            raise InvalidNameError(f"a model name must be a string, not {type(name).__name__}")
        rest = name
        tag = DEFAULT_TAG
        colon, slash = rest.rfind(":"), rest.rfind("/")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :] or _MISSING
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        scheme = "https"
        rest, sep, model = rest.rpartition("/")
        if sep:
            model = model or _MISSING
            rest, sep, namespace = rest.rpartition("/")
            if sep:
                namespace = namespace or _MISSING
                host = rest or _MISSING
                if "://" in host:
                    scheme, _, host = host.partition("://")
                    host = host or _MISSING
            else:
                namespace = namespace or _MISSING
        else:
            model = model or _MISSING
        parsed = cls(host=host, namespace=namespace, model=model, tag=tag, scheme=scheme)
        parsed._validate(name)
        return parsed

    def _validate(self, original: str) -> None:
        for part in ("host", "namespace", "model", "tag"):
            value: str = getattr(self, part)
            if value == _MISSING:
                raise InvalidNameError(f"invalid model name: empty {part}", model=original)
            if not 1 <= len(value) <= _LIMITS[part]:
                raise InvalidNameError(
                    f"invalid model name: {part} longer than {_LIMITS[part]} characters",
                    model=original,
                )
            allowed = _LATER
            if part != "namespace":
                allowed = allowed | {"."}
            if part == "host":
                allowed = allowed | {":"}
            if value[0] not in _FIRST or any(c not in allowed for c in value):
                raise InvalidNameError(
                    f"invalid model name: bad character in {part} {value!r}", model=original
                )

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """The four path parts below ``manifests/``."""
        return (self.host, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        """The shortest form Ollama displays: defaults left out."""
        short = f"{self.model}:{self.tag}"
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{short}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{short}"
        return short


def default_root() -> Path:
    """The models root: ``$OLLAMA_MODELS`` trimmed as Ollama trims it, else ``~/.ollama/models``."""
    value = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'")
    if value:
        return Path(value)
    return Path.home() / ".ollama" / "models"


def blob_file_name(digest: str) -> str:
    """Map a ``sha256:<hex>`` digest to its file name, ``sha256-<lowercase hex>``.

    Raises:
        InvalidDigestError: (a ValueError) the digest is not ``sha256:`` and 64 hex digits.
    """
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidDigestError(
            f"invalid digest {digest!r}: expected 'sha256:' and 64 hex digits", digest=None
        )
    return "sha256-" + digest[7:].lower()


class ModelStore:
    """An Ollama model store: ``manifests-v2/``, ``manifests/`` and ``blobs/`` under one root.

    Args:
        root: the models root; defaults to ``$OLLAMA_MODELS``, else ``~/.ollama/models``.
        runner: which child of an Ollama manifest list to open: ``"mlx"``, ``"ggml"``,
            ``"llamacpp"``; by default the ``mlx`` (safetensors) child, else a GGUF one.
    """

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, runner: str | None = None
    ) -> None:
        #: whether the root was given: without one, a manifest path fixes its own store
        self.explicit = root is not None
        self.root = Path(root) if root is not None else default_root()
        self.manifests_dir = self.root / "manifests"
        self.manifests_v2_dir = self.root / "manifests-v2"
        self.blobs_dir = self.root / "blobs"
        self.runner = runner.strip().lower() if runner else None

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    def blob_path(self, digest: str) -> Path:
        """The path of the blob with this digest (which must be valid): ``sha256-<hex>``, or
        the ``sha256:<hex>`` spelling of Ollama before 0.1.30 when only that one exists."""
        from ._layout import blob_path

        blob_file_name(digest)  # validates
        return blob_path(self.root, digest)

    def manifest_path(self, name: str | ModelName) -> Path:
        """The legacy manifest path for a name, without looking at the disk."""
        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
        return self.manifests_dir.joinpath(*parsed.parts)

    def resolve(self, name: str | ModelName) -> Path:
        """Find the manifest entry of a model name (blocking).

        ``manifests-v2`` first (a link whose target checks out), then ``manifests``; each the
        exact path, else a match ignoring case, with both spellings of the public host.

        Raises:
            InvalidNameError: the name breaks Ollama's grammar.
            ModelNotFoundError: no manifest matches, or several match ignoring case.
            ManifestError: the entry cannot be read.
        """
        return self._resolve_document(name).path

    def _resolve_document(self, name: str | ModelName, limits: Limits | None = None) -> Document:
        from ._layout import resolve

        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
        cap = (limits or Limits()).max_manifest_bytes
        try:
            return resolve(self.root, parsed.parts, str(name), cap)
        except AsyncWeightsError as exc:
            exc.add_context(model=str(name))
            raise
        except FileNotFoundError as exc:  # removed while we looked
            raise ModelNotFoundError(
                f"model not found in store {str(self.root)!r}", model=str(name), path=exc.filename
            ) from exc
        except OSError as exc:
            # PermissionError and friends: keep the real errno.
            raise ManifestError(
                f"cannot read manifest: {exc.strerror}",
                model=str(name),
                path=exc.filename or self.manifest_path(parsed),
                errno=exc.errno,
            ) from exc

    def list_names(self) -> list[ModelName]:
        """Every model name with a manifest in the store, sorted (blocking; see `models`).

        Names from ``manifests-v2`` and ``manifests`` are merged as Ollama lists them: the
        public host shows as ``registry.ollama.ai`` whichever spelling is on disk.
        """
        from ._layout import list_entries

        names = []
        for entry in list_entries(self.root):
            try:
                parsed = ModelName(*entry.parts)
                parsed._validate(str(entry.path))
            except InvalidNameError:
                continue  # not a name Ollama could have written
            names.append(parsed)
        return sorted(names, key=str)

    async def models(self) -> AsyncIterator[ModelName]:
        """Yield the names of the models in the store, sorted."""
        for name in await anyio.to_thread.run_sync(self.list_names):
            yield name

    async def open(
        self,
        model: str | os.PathLike[str] | ModelName | Manifest,
        *,
        runner: str | None = None,
        limits: Limits | None = None,
    ) -> Model:
        """Resolve and decode a model: a name, a manifest file path, or a decoded `Manifest`.

        A `str` is always a model name (Ollama's grammar); a manifest file is given as a
        path object (`pathlib.Path` or any `os.PathLike`). The manifest is read through
        one descriptor (a regular file no larger than ``limits.max_manifest_bytes``) and
        decoded in a worker thread.

        A path ``<root>/manifests[-v2]/<host>/<namespace>/<model>/<tag>`` (or
        ``<root>/blobs/sha256-<hex>``) opens in the store at ``<root>`` unless this store's
        root was given explicitly. A manifest list opens as its child for `runner` (default:
        this store's `runner`, else ``mlx``, then ``llamacpp``, then ``ggml``).

        Raises:
            ModelNotFoundError, InvalidNameError, ManifestError: as their names say; a
                ManifestError too for a path outside any store when no root was given.
            UnsupportedModelError: a manifest list without a local child for the runner.
        """
        from ._manifest import Manifest
        from ._model import Model

        limits = limits or Limits()
        if isinstance(model, Manifest):
            _check_manifest_caps(model, limits, label="<manifest>", path=None)
            return Model(self, model, label="<manifest>", path=None, limits=limits)
        return await anyio.to_thread.run_sync(self._open, model, runner or self.runner, limits)

    def _open(
        self, model: str | os.PathLike[str] | ModelName, runner: str | None, limits: Limits
    ) -> Model:
        from ._manifest import ManifestList, decode_document
        from ._model import Model

        store, document, label = self._locate(model, limits)
        decoded = decode_document(document.data, model=label, path=document.path)
        listed = None
        if isinstance(decoded, ManifestList):
            listed = decoded
            decoded, digest, runner = store._select(listed, runner, label, document.path, limits)
        else:
            digest, runner = document.digest, None
        _check_manifest_caps(decoded, limits, label=label, path=document.path)
        return Model(
            store, decoded, label=label, path=document.path, digest=digest, limits=limits,
            document=document, manifest_list=listed, runner=runner,
        )  # fmt: skip

    def _locate(
        self, model: str | os.PathLike[str] | ModelName, limits: Limits
    ) -> tuple[ModelStore, Document, str]:
        if isinstance(model, ModelName):
            return self, self._resolve_document(model, limits), str(model)
        if isinstance(model, os.PathLike):
            where = os.fspath(model)
            if not isinstance(where, str):
                raise ManifestError(f"a manifest path must be text, not {type(where).__name__}")
            if "\0" in where:
                raise ManifestError(
                    "manifest path contains a NUL character", model=where.replace("\0", "\\x00")
                )
            return self._read_path(Path(where).expanduser(), where, limits)
        if not isinstance(model, str):
            raise InvalidNameError(
                f"a model must be a name (str), a path object or a Manifest, "
                f"not {type(model).__name__}"
            )
        # A str is a name, never a path: "/etc/passwd" or "../x" fail the name grammar.
        return self, self._resolve_document(model, limits), model

    def _read_path(
        self, path: Path, label: str, limits: Limits
    ) -> tuple[ModelStore, Document, str]:
        from ._layout import InvalidEntryError, read_document, store_root_of

        if not os.path.lexists(path):
            raise ModelNotFoundError("manifest file not found", model=label, path=path)
        located = store_root_of(path)
        store = self
        if not self.explicit:
            if located is None:
                raise ManifestError(
                    "this manifest file is not inside a store (<root>/manifests/<host>/"
                    "<namespace>/<model>/<tag>); pass store= (CLI: --store) to say where "
                    "its blobs are",
                    model=label,
                    path=path,
                )
            store = ModelStore(located[0], runner=self.runner)
        root, tree = located if located is not None else (store.root, _FILE)
        try:
            return store, read_document(root, path, tree, limits.max_manifest_bytes), label
        except InvalidEntryError as exc:
            raise ManifestError(exc.reason, model=label, path=path) from None
        except AsyncWeightsError as exc:
            exc.add_context(model=label)
            raise
        except OSError as exc:
            raise ManifestError(
                f"cannot read manifest: {exc.strerror}", model=label, path=path, errno=exc.errno
            ) from exc

    def _select(
        self, listed: ManifestList, runner: str | None, label: str, path: Path, limits: Limits
    ) -> tuple[Manifest, str, str]:
        """The child of a manifest list to open, its digest and its runner.

        A referenced child is read from ``blobs/`` and must hash to its digest, as Ollama
        checks it (``resolveLocalManifestReference``); one missing or mismatching is skipped.
        """
        from ._manifest import MANIFEST_MEDIA_TYPE, decode_manifest, encode_manifest

        preferences = [runner] if runner else list(_RUNNER_PREFERENCES)
        notes: list[str] = []
        for wanted in preferences:
            for child in listed.manifests:
                child_runner = child_runner_of(child)
                if child_runner != wanted or child.media_type not in ("", MANIFEST_MEDIA_TYPE):
                    continue
                inline = child.inline
                if inline is not None:
                    digest = "sha256:" + hashlib.sha256(encode_manifest(inline)).hexdigest()
                    return inline, digest, wanted
                blob = self.blob_path(child.digest)
                if not os.path.lexists(blob):
                    notes.append(f"{wanted} child {child.digest} is not in the store")
                    continue
                try:
                    data = read_file(
                        blob, "manifest", max_size=limits.max_manifest_bytes,
                        cap="Limits.max_manifest_bytes",
                    )  # fmt: skip
                except AsyncWeightsError as exc:
                    exc.add_context(model=label, digest=child.digest)
                    raise
                actual = "sha256:" + hashlib.sha256(data).hexdigest()
                if actual != child.digest.lower():
                    notes.append(f"{wanted} child {child.digest} holds bytes hashing to {actual}")
                    continue
                return decode_manifest(bytes(data), model=label, path=blob), actual, wanted
        runners = [child_runner_of(c) or "?" for c in listed.manifests]
        present = ", ".join(
            f"{child_runner_of(c) or '?'}/{c.format or '?'}" for c in listed.manifests
        )
        reason = (
            f"manifest list has no local child for runner {' or '.join(preferences)} "
            f"(children: {present or 'none'})"
        )
        if notes:
            reason += "; " + "; ".join(notes)
        raise UnsupportedModelError(
            "manifest list", reason, model=label, path=path, runners=runners
        )


_FILE: Literal["file"] = "file"


def _check_manifest_caps(
    manifest: Manifest, limits: Limits, *, label: str, path: Path | None
) -> None:
    """The caps on a manifest's layer count and layer names (`Limits`)."""
    count = len(manifest.layers) + 1  # the config blob is a layer too
    if count > limits.max_layers:
        raise ManifestError(
            f"manifest has {count} layers, over Limits.max_layers ({limits.max_layers})",
            model=label,
            path=path,
        )
    cap = limits.max_name_bytes
    for index, layer in enumerate(manifest.layers):
        name = layer.name
        if name is not None and len(name) > cap // 4 and len(name.encode()) > cap:
            raise ManifestError(
                f"layer {index} has a name of {len(name.encode())} bytes, over "
                f"Limits.max_name_bytes ({cap})",
                model=label,
                path=path,
            )


#: Which manifest-list child to open when no runner is asked for: MLX's own (safetensors)
#: first, then the GGUF runners in Ollama's own order for them.
_RUNNER_PREFERENCES = ("mlx", "llamacpp", "ggml")


def child_runner_of(child: ManifestRef) -> str:
    """A list child's runner, lowercased; derived from its format when it names none
    (``safetensors`` → ``mlx``, ``gguf`` → ``ggml``, as Ollama's ``MetadataForConfig``)."""
    runner = child.runner.strip().lower()
    if runner:
        return runner
    return {"safetensors": "mlx", "gguf": "ggml"}.get(child.format.strip().lower(), "")
