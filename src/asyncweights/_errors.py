"""The exception tree of asyncweights.

Every error the library raises on purpose derives from `AsyncWeightsError`:

    AsyncWeightsError
    ├── InvalidNameError            a model name outside Ollama's grammar
    ├── ModelNotFoundError          no manifest for the name, or several that match
    ├── ModelExistsError            import without force= over a model that exists
    ├── UnsupportedModelError       a GGUF, adapter-only, cloud or empty model; a manifest list
    │                               with no child asyncweights can load
    ├── ManifestError               manifest unreadable, not JSON, wrong schema
    │   └── InvalidDigestError      a digest that is not ``sha256:`` and 64 hex digits
    ├── ComponentNotFoundError      the model has no tensors for that component
    ├── ConfigNotFoundError         no JSON config layer of that name
    ├── BlobError                   something wrong with one blob
    │   ├── BlobMissingError        the blob file is absent
    │   ├── SizeMismatchError       file size differs from the manifest's size
    │   ├── DigestMismatchError     sha256 of the bytes differs from the digest
    │   └── HeaderError             a safetensors or GGUF header breaks a rule
    │       └── UnsupportedDTypeError
    ├── DuplicateTensorError        two blobs define the same tensor name
    ├── QuantizationError           a quantized weight whose facts do not add up
    ├── BudgetError                 a load larger than the configured memory budget
    ├── ShardError                  a tensor a `Shard` cannot split as asked; ranks that disagree
    ├── SourceError                 an import's source is missing, unreadable or refused
    ├── StoreWriteError             writing the store failed (ENOSPC, EIO, EACCES …)
    ├── RegistryError               a registry request failed (network, protocol, HTTP)
    │   ├── RegistryAuthError       401 after the token retry, or 403
    │   ├── RegistryNotFoundError   404: no such repository, tag or blob (a ModelNotFoundError)
    │   ├── PreconditionFailedError 412: the registry refuses this client (e.g. MLX tags)
    │   └── RegistryServerError     5xx after every retry
    └── LoadError                   reading or evaluating tensors failed (I/O, callbacks)

Messages are built from the stored fields, so the model, tensor, digest and file a
failure concerns are always named the same way. OS errors keep their real errno.
"""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path
from typing import TypeVar

__all__ = [
    "AsyncWeightsError",
    "BlobError",
    "BlobMissingError",
    "BudgetError",
    "ComponentNotFoundError",
    "ConfigNotFoundError",
    "DigestMismatchError",
    "DuplicateTensorError",
    "HeaderError",
    "InvalidDigestError",
    "InvalidNameError",
    "LoadError",
    "ManifestError",
    "ModelExistsError",
    "ModelNotFoundError",
    "PreconditionFailedError",
    "QuantizationError",
    "RegistryAuthError",
    "RegistryError",
    "RegistryNotFoundError",
    "RegistryServerError",
    "ShardError",
    "SizeMismatchError",
    "SourceError",
    "StoreWriteError",
    "UnsupportedDTypeError",
    "UnsupportedModelError",
]

_E = TypeVar("_E", bound=BaseException)


class AsyncWeightsError(Exception):
    """Root of every error asyncweights raises on purpose.

    Attributes:
        model: the model name (or manifest path) the error concerns, if known.
        tensor: the tensor name, if the error concerns one.
        digest: the blob digest (``sha256:<hex>``), if the error concerns one.
        path: the file involved, if any.
        errno: the operating system's error number, when an OS error caused it.
        store: the models root the error concerns, when the operation writes one (import).
    """

    def __init__(
        self,
        reason: str,
        *,
        model: str | None = None,
        tensor: str | None = None,
        digest: str | None = None,
        path: str | os.PathLike[str] | None = None,
        errno: int | None = None,
        store: str | os.PathLike[str] | None = None,
    ) -> None:
        self.reason = reason
        self.store = None if store is None else Path(store)
        self.model = model
        self.tensor = tensor
        self.digest = digest
        self.path = None if path is None else Path(path)
        self.errno = errno
        super().__init__(self._message())
        # OSError.__init__ resets errno; the one we were given is the one that counts.
        self.errno = errno

    def _message(self) -> str:
        where = []
        if self.model is not None:
            where.append(f"model {self.model!r}")
        if self.store is not None:
            where.append(f"store {str(self.store)!r}")
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        if self.digest is not None:
            where.append(f"blob {self.digest}")
        if self.path is not None:
            where.append(f"file {str(self.path)!r}")
        if self.errno is not None:
            where.append(f"errno {_errno.errorcode.get(self.errno, self.errno)}")
        return f"{self.reason} ({', '.join(where)})" if where else self.reason

    def add_context(self, **fields: str | os.PathLike[str] | None) -> None:
        """Fill in fields still unknown where the error was raised, and refresh the message."""
        for name, value in fields.items():
            if value is not None and getattr(self, name) is None:
                setattr(self, name, Path(value) if name in ("path", "store") else value)
        self.args = (self._message(),)

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields would be lost by the default pickling (worker processes).
        return (_rebuild, (type(self), self.reason, self.__dict__.copy(), self.errno))


def _rebuild(
    cls: type[AsyncWeightsError], reason: str, state: dict[str, object], errno: int | None
) -> AsyncWeightsError:
    try:
        err = cls.__new__(cls)
    except TypeError:  # MemoryError's __new__ refuses subclasses ("not safe")
        err = Exception.__new__(cls)
    Exception.__init__(err, reason)
    err.__dict__.update(state)
    err.errno = errno
    err.args = (err._message(),)
    return err


class InvalidNameError(AsyncWeightsError, ValueError):
    """A model name that Ollama's name grammar rejects."""


class ModelNotFoundError(AsyncWeightsError, LookupError):
    """No manifest matches the model name (or more than one does, ignoring case)."""


class ModelExistsError(AsyncWeightsError, FileExistsError):
    """An import would replace a model that is already in the store (pass ``force=True``)."""


class UnsupportedModelError(AsyncWeightsError):
    """The model is not one asyncweights can load: the message says what it is and why.

    Attributes:
        kind: ``"gguf"``, ``"adapter"``, ``"cloud"``, ``"empty"`` or ``"manifest list"``.
        runners: for a manifest list, the runners of its children (``"mlx"``, ``"ggml"`` …).
    """

    def __init__(
        self,
        kind: str,
        reason: str,
        *,
        model: str | None = None,
        path: str | os.PathLike[str] | None = None,
        runners: list[str] | None = None,
    ) -> None:
        self.kind = kind
        self.runners = runners or []
        super().__init__(reason, model=model, path=path)


class ManifestError(AsyncWeightsError):
    """A manifest that cannot be read, is not JSON, or does not follow the schema."""


class InvalidDigestError(ManifestError, ValueError):
    """A digest that is not ``sha256:`` followed by 64 hex digits; no path is built from it."""


class ComponentNotFoundError(AsyncWeightsError, LookupError):
    """The model has no tensor layers for the requested component.

    Attributes:
        component: the component asked for.
        available: the components the model does have.
    """

    def __init__(self, component: str, available: list[str], *, model: str | None) -> None:
        self.component = component
        self.available = available
        listed = ", ".join(repr(c) for c in available) if available else "none"
        super().__init__(f"no component {component!r}; the model has: {listed}", model=model)


class ConfigNotFoundError(AsyncWeightsError, LookupError):
    """No JSON config layer with that exact name in the manifest."""


class BlobError(AsyncWeightsError):
    """Something is wrong with one blob of a model."""


class BlobMissingError(BlobError, FileNotFoundError):
    """The blob file named by the manifest does not exist."""


class SizeMismatchError(BlobError):
    """The blob's size on disk differs from the size in the manifest."""


class DigestMismatchError(BlobError):
    """The SHA-256 of the blob's bytes differs from its digest."""


class HeaderError(BlobError):
    """A safetensors or GGUF header that breaks one of the framing rules."""


class UnsupportedDTypeError(HeaderError):
    """A tensor dtype that asyncweights (and MLX) cannot load."""


class DuplicateTensorError(AsyncWeightsError):
    """Two entries define the same tensor name; asyncweights never keeps 'the last one'."""


class QuantizationError(AsyncWeightsError):
    """A quantized weight whose scales, biases or labels are missing or inconsistent."""


class BudgetError(AsyncWeightsError, MemoryError):
    """A load needs more memory than the configured budget allows."""


class ShardError(AsyncWeightsError):
    """A tensor a `Shard` cannot split as asked (an axis the world size does not divide, a
    column split that cuts a quantization group), or ranks whose loads disagree
    (`check_shards`). Raised before any tensor data is read when planning finds it."""


class SourceError(AsyncWeightsError):
    """An import's source is missing, unreadable, or a layout or format that is refused."""


class StoreWriteError(AsyncWeightsError, OSError):
    """Writing the store failed; ``errno`` is the OS error's (ENOSPC, EIO, EACCES …).

    The import that raised it has removed every blob it created that no manifest references.
    """


class LoadError(AsyncWeightsError):
    """Reading or evaluating tensors failed, or a progress callback raised."""


class RegistryError(AsyncWeightsError):
    """A request to a model registry failed: network, timeout, protocol or HTTP status.

    Attributes:
        registry: the registry's base URL (``https://registry.ollama.ai``).
        repository: the repository path (``library/qwen3``), if the request concerned one.
        status: the HTTP status code, if a response came back.
    """

    def __init__(
        self,
        reason: str,
        *,
        registry: str,
        repository: str | None = None,
        status: int | None = None,
        model: str | None = None,
        digest: str | None = None,
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.status = status
        super().__init__(reason, model=model, digest=digest)

    def _message(self) -> str:
        where = [f"registry {self.registry}"]
        if self.repository is not None:
            where.append(f"repository {self.repository}")
        message = super()._message()
        if message.endswith(")"):
            return f"{message[:-1]}, {', '.join(where)})"
        return f"{message} ({', '.join(where)})"


class RegistryAuthError(RegistryError):
    """The registry refused the credentials (401 after the token retry) or the access (403)."""


class RegistryNotFoundError(RegistryError, ModelNotFoundError):
    """The registry has no such repository, tag or blob (HTTP 404)."""


class PreconditionFailedError(RegistryError):
    """HTTP 412: the registry refuses this client, e.g. Ollama's MLX tags off macOS.

    The registry's own message is kept in the error's text.
    """


class RegistryServerError(RegistryError):
    """The registry kept failing with a 5xx status (or 429) through every retry."""


def first_error(group: BaseExceptionGroup[AsyncWeightsError]) -> AsyncWeightsError:
    """The first typed error of a task group's exception group.

    Concurrent tasks of one load fail for one cause (the first bad blob each met), so the
    first typed error is the one to surface; the group stays reachable as its context.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, AsyncWeightsError)
    return exc


def single_error(
    group: BaseExceptionGroup[BaseException],
    kind: type[_E] | tuple[type[_E], ...],
) -> _E | None:
    """The error to raise in place of a task group's exception group, or None to keep the group.

    A task group always raises an `ExceptionGroup`, even when one task failed. The tasks of
    one load, import or header read fail for one cause (the first bad blob each met), so when
    every error in the group is of `kind` the first one is raised bare: callers write
    ``except aw.BlobMissingError`` and never see the group, which stays reachable as the bare
    error's ``__context__``. A group that holds anything else (an interrupt, a bug) is re-raised
    whole, so nothing is hidden.

    Callers unwrap in a plain ``except BaseExceptionGroup`` block, never by raising inside
    ``except*``: on CPython 3.11.0 to 3.11.3 an exception raised inside ``except*`` comes out
    wrapped in a new group (CPython issue 103590, fixed in 3.11.4).
    """
    leaves: list[_E] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(reversed(exc.exceptions))
        elif isinstance(exc, kind):
            leaves.append(exc)
        else:
            return None
    return leaves[0] if leaves else None


def as_typed(exc: BaseException, *, model: str | None = None) -> AsyncWeightsError | None:
    """The typed error to raise for an exception a load met, with `exc` as its cause.

    * An `AsyncWeightsError` is itself.
    * `MemoryError` (a buffer or MLX allocation that failed) is a `BudgetError`.
    * `OSError` is a `LoadError` with its errno and file.
    * Any other `Exception` (an unexpected error from MLX or a dependency) is a `LoadError`
      naming its type.
    * Anything else (cancellation, `KeyboardInterrupt`, `SystemExit`) is None: those
      propagate as they are.
    """
    if isinstance(exc, AsyncWeightsError):
        return exc
    error: AsyncWeightsError
    if isinstance(exc, MemoryError):
        error = BudgetError(f"out of memory: {str(exc) or 'MemoryError'}", model=model)
    elif isinstance(exc, OSError):
        error = LoadError(
            f"I/O error: {exc.strerror or exc}",
            model=model,
            path=exc.filename if isinstance(exc.filename, str) else None,
            errno=exc.errno,
        )
    elif isinstance(exc, Exception) and not isinstance(exc, BaseExceptionGroup):
        error = LoadError(f"unexpected {type(exc).__name__}: {exc}", model=model)
    else:
        return None
    error.__cause__ = exc
    return error


def typed_error(
    group: BaseExceptionGroup[BaseException], *, model: str | None = None
) -> AsyncWeightsError | None:
    """One typed error for a failed task group of a load, or None to re-raise the group.

    The first `AsyncWeightsError` in the group when there is one, else the first other
    error made typed by `as_typed`; None when the group holds a cancellation or an
    interrupt, which must propagate untouched. Called in a plain ``except
    BaseExceptionGroup`` block (see `single_error` for why not ``except*``).
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(reversed(exc.exceptions))
        elif not isinstance(exc, Exception):
            return None
        else:
            leaves.append(exc)
    for leaf in leaves:
        if isinstance(leaf, AsyncWeightsError):
            return leaf
    return as_typed(leaves[0], model=model) if leaves else None
