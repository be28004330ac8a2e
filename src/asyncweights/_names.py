"""Ollama's model-name and digest grammar and the store's file names: pure, no I/O.

Names are parsed with Ollama's official rules (``types/model/name.go``), so a name that
Ollama rejects is rejected here, and no name or digest can build a path outside the store.
The reader (`ModelStore`) and the writer (`_writer`) both take their paths from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import InvalidDigestError, InvalidNameError

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TAG",
    "DIGEST_PATTERN",
    "ModelName",
    "blob_file_name",
    "name_from_parts",
]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
_MISSING = "!MISSING!"

#: A digest as manifests spell it: ``sha256:`` and 64 hex digits (either case).
DIGEST_PATTERN = r"^sha256:[0-9a-fA-F]{64}$"
_DIGEST = re.compile(DIGEST_PATTERN)
# First character, then the later ones, per part (docs/format.md#model-names); ASCII only.
_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_LATER = _FIRST | frozenset("-_")
_LIMITS = {"host": 350, "namespace": 80, "model": 80, "tag": 80}
# How a rejected name that was meant as a file path is told so: the CLI's rule for a MODEL
# argument that is a manifest path (no model name can start so).
_PATH_STARTS = ("/", "./", "../", "~")
_PATH_HINT = "; a str is a model name, never a path (give a manifest file as a pathlib.Path)"


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
        hint = _PATH_HINT if original.startswith(_PATH_STARTS) else ""
        for part in ("host", "namespace", "model", "tag"):
            value: str = getattr(self, part)
            if value == _MISSING:
                raise InvalidNameError(f"invalid model name: empty {part}{hint}", model=original)
            if not 1 <= len(value) <= _LIMITS[part]:
                raise InvalidNameError(
                    f"invalid model name: {part} longer than {_LIMITS[part]} characters{hint}",
                    model=original,
                )
            allowed = _LATER
            if part != "namespace":
                allowed = allowed | {"."}
            if part == "host":
                allowed = allowed | {":"}
            if value[0] not in _FIRST or any(c not in allowed for c in value):
                raise InvalidNameError(
                    f"invalid model name: bad character in {part} {value!r}{hint}",
                    model=original,
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


def name_from_parts(host: str, namespace: str, model: str, tag: str, *, original: str) -> ModelName:
    """A name read back from the four path parts below ``manifests/``, validated.

    Raises:
        InvalidNameError: a part Ollama could not have written (`original` names the file).
    """
    parsed = ModelName(host, namespace, model, tag)
    parsed._validate(original)
    return parsed


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
