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
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ._errors import (
    AsyncWeightsError,
    InvalidDigestError,
    InvalidNameError,
    ManifestError,
    ModelNotFoundError,
)
from ._files import read_file
from ._limits import Limits

if TYPE_CHECKING:
    from ._manifest import Manifest
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
    """An Ollama-style model store: ``manifests/`` and ``blobs/`` under one root.

    Args:
        root: the models root; defaults to ``$OLLAMA_MODELS``, else ``~/.ollama/models``.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.manifests_dir = self.root / "manifests"
        self.blobs_dir = self.root / "blobs"

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    def blob_path(self, digest: str) -> Path:
        """The path of the blob with this digest (which must be valid)."""
        return self.blobs_dir / blob_file_name(digest)

    def manifest_path(self, name: str | ModelName) -> Path:
        """The exact manifest path for a name, without looking at the disk."""
        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
        return self.manifests_dir.joinpath(*parsed.parts)

    def resolve(self, name: str | ModelName) -> Path:
        """Find the manifest file of a model name: the exact path, else a case-insensitive match.

        Raises:
            InvalidNameError: the name breaks Ollama's grammar.
            ModelNotFoundError: no manifest matches, or several match ignoring case.
        """
        parsed = name if isinstance(name, ModelName) else ModelName.parse(name)
        exact = self.manifests_dir.joinpath(*parsed.parts)
        try:
            return self._find(parsed, exact, str(name))
        except PermissionError as exc:
            # Path.is_file() raises for EACCES (a folder without x); keep the real errno.
            raise ManifestError(
                f"cannot look up manifest: {exc.strerror}",
                model=str(name),
                path=exc.filename or exact,
                errno=exc.errno,
            ) from exc

    def _find(self, parsed: ModelName, exact: Path, label: str) -> Path:
        if exact.is_file():
            return exact
        candidates = [self.manifests_dir]
        for part in parsed.parts:
            folded = part.casefold()
            candidates = [
                child
                for parent in candidates
                for child in _children(parent)
                if child.name.casefold() == folded
            ]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ModelNotFoundError(
                f"model not found in store {str(self.root)!r}", model=label, path=exact
            )
        if len(found) > 1:
            listed = ", ".join(str(p.relative_to(self.manifests_dir)) for p in found)
            raise ModelNotFoundError(
                f"model name is ambiguous ignoring case: {listed}", model=label
            )
        return found[0]

    def list_names(self) -> list[ModelName]:
        """Every model name with a manifest in the store, sorted (blocking; see `models`)."""
        names = []
        for host in _children(self.manifests_dir):
            for ns in _children(host):
                for model in _children(ns):
                    for tag in _children(model):
                        if not tag.is_file():
                            continue
                        try:
                            parsed = ModelName(host.name, ns.name, model.name, tag.name)
                            parsed._validate(str(tag))
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
        limits: Limits | None = None,
    ) -> Model:
        """Resolve and decode a model: a name, a manifest file path, or a decoded `Manifest`.

        A `str` is always a model name (Ollama's grammar); a manifest file is given as a
        path object (`pathlib.Path` or any `os.PathLike`). The manifest is read through
        one descriptor (a regular file no larger than ``limits.max_manifest_bytes``) and
        decoded in a worker thread.

        Raises:
            ModelNotFoundError, InvalidNameError, ManifestError: as their names say.
        """
        from ._manifest import Manifest
        from ._model import Model

        limits = limits or Limits()
        if isinstance(model, Manifest):
            _check_layer_count(model, limits, label="<manifest>", path=None)
            return Model(self, model, label="<manifest>", path=None, limits=limits)
        return await anyio.to_thread.run_sync(self._open_blocking, model, limits)

    def _open_blocking(self, model: str | os.PathLike[str] | ModelName, limits: Limits) -> Model:
        from ._manifest import decode_manifest
        from ._model import Model

        path, label = self._locate(model)
        try:
            data = read_file(
                path,
                "manifest",
                max_size=limits.max_manifest_bytes,
                cap="Limits.max_manifest_bytes",
            )
        except AsyncWeightsError as exc:
            exc.add_context(model=label)
            raise
        manifest = decode_manifest(data, model=label, path=path)
        _check_layer_count(manifest, limits, label=label, path=path)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return Model(self, manifest, label=label, path=path, digest=digest, limits=limits)

    def _locate(self, model: str | os.PathLike[str] | ModelName) -> tuple[Path, str]:
        if isinstance(model, ModelName):
            return self.resolve(model), str(model)
        if isinstance(model, os.PathLike):
            where = os.fspath(model)
            if not isinstance(where, str):
                raise ManifestError(f"a manifest path must be text, not {type(where).__name__}")
            if "\0" in where:
                raise ManifestError(
                    "manifest path contains a NUL character", model=where.replace("\0", "\\x00")
                )
            return Path(where).expanduser(), where
        if not isinstance(model, str):
            raise InvalidNameError(
                f"a model must be a name (str), a path object or a Manifest, "
                f"not {type(model).__name__}"
            )
        # A str is a name, never a path: "/etc/passwd" or "../x" fail the name grammar.
        return self.resolve(model), model


def _check_layer_count(
    manifest: Manifest, limits: Limits, *, label: str, path: Path | None
) -> None:
    count = len(manifest.layers) + 1  # the config blob is a layer too
    if count > limits.max_layers:
        raise ManifestError(
            f"manifest has {count} layers, over Limits.max_layers ({limits.max_layers})",
            model=label,
            path=path,
        )


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
