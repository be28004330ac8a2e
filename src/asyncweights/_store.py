"""The store on disk: `ModelStore` (the models root, its manifests and blobs) and the `Model`
opened from it (its manifest, components, configs and sizes).

Names, digests and blob file names come from `_names`, the Structs from `_manifest`, the
layouts of the manifest trees from `_layout`; this module finds and reads them. Reading
goes through `_files`; nothing here writes the store.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread

from ._errors import (
    AsyncWeightsError,
    BlobError,
    ComponentNotFoundError,
    ConfigNotFoundError,
    InvalidNameError,
    ManifestError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from ._files import read_file
from ._json import FAST_BYTES, JSONError, gc_paused, loads
from ._layout import (
    Document,
    InvalidEntryError,
    blob_path,
    list_entries,
    read_document,
    resolve,
    store_root_of,
)
from ._limits import Limits
from ._manifest import (
    ADAPTER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PROJECTOR_MEDIA_TYPE,
    Layer,
    Manifest,
    ManifestList,
    ManifestRef,
    ModelConfig,
    ModelKind,
    classify,
    decode_config,
    decode_document,
    decode_manifest,
    encode_manifest,
)
from ._names import ModelName, blob_file_name, name_from_parts

__all__ = ["Model", "ModelStore", "default_root"]

_GGUF_COMPONENTS = {MODEL_MEDIA_TYPE: "model", PROJECTOR_MEDIA_TYPE: "projector"}
_RUNNERS = {"tensor": "mlx", "gguf": "ggml", "adapter": "ggml"}
_FORMATS = {"tensor": "safetensors", "gguf": "gguf", "adapter": "gguf"}


def default_root() -> Path:
    """The models root: ``$OLLAMA_MODELS`` trimmed as Ollama trims it, else ``~/.ollama/models``."""
    value = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'")
    if value:
        return Path(value)
    return Path.home() / ".ollama" / "models"


class ModelStore:
    """An Ollama model store: ``manifests-v2/``, ``manifests/`` and ``blobs/`` under one root.

    Args:
        root: the models root; defaults to ``$OLLAMA_MODELS``, else ``~/.ollama/models``.

    Raises:
        ManifestError: `root` contains a NUL character.
        runner: which child of an Ollama manifest list to open: ``"mlx"``, ``"ggml"``,
            ``"llamacpp"``; by default the ``mlx`` (safetensors) child, else a GGUF one.
    """

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, runner: str | None = None
    ) -> None:
        if root is not None and "\0" in os.fspath(root):
            # No file can have such a path; the OS would answer with a ValueError.
            raise ManifestError(
                "models root path contains a NUL character",
                path=os.fspath(root).replace("\0", "\\x00"),
            )
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

    def list_names(
        self, on_error: Callable[[ManifestError], object] | None = None
    ) -> list[ModelName]:
        """Every model name with a manifest in the store, sorted (blocking; see `models`).

        Names from ``manifests-v2`` and ``manifests`` are merged as Ollama lists them: the
        public host shows as ``registry.ollama.ai`` whichever spelling is on disk. A folder
        or entry that cannot be read (EACCES, a symlink loop) is skipped; the listing goes
        on, and `on_error`, when given, receives a `ManifestError` for it with its errno.
        """

        errors: list[OSError] = []
        found = list_entries(self.root, errors)
        if on_error is not None:
            for exc in errors:
                on_error(
                    ManifestError(
                        f"cannot list manifests: {exc.strerror}", path=exc.filename, errno=exc.errno
                    )
                )
        names = []
        for entry in found:
            try:
                parsed = name_from_parts(*entry.parts, original=str(entry.path))
            except InvalidNameError:
                continue  # not a name Ollama could have written
            names.append(parsed)
        return sorted(names, key=str)

    async def models(
        self, on_error: Callable[[ManifestError], object] | None = None
    ) -> AsyncIterator[ModelName]:
        """Yield the names of the models in the store, sorted.

        Unreadable folders and entries are skipped, never raised; `on_error` (a plain
        callable, called in a worker thread) receives a `ManifestError` for each.
        """
        for name in await anyio.to_thread.run_sync(self.list_names, on_error):
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

        limits = limits or Limits()
        if isinstance(model, Manifest):
            _check_manifest_caps(model, limits, label="<manifest>", path=None)
            # In a worker: a manifest without weight layers has its config blob read to tell
            # a cloud model from an empty one.
            return await anyio.to_thread.run_sync(
                functools.partial(Model, self, model, label="<manifest>", path=None, limits=limits)
            )
        return await anyio.to_thread.run_sync(self._open, model, runner or self.runner, limits)

    def _open(
        self, model: str | os.PathLike[str] | ModelName, runner: str | None, limits: Limits
    ) -> Model:

        store, document, label = self._locate(model, limits)
        # A big manifest is decoded in steps; what follows walks its layers in Python, so
        # it keeps the 1 ms GIL switch interval (and the paused collector) of that decoding.
        with gc_paused() if len(document.data) > FAST_BYTES else contextlib.nullcontext():
            return self._open_document(store, document, label, runner, limits)

    def _open_document(
        self, store: ModelStore, document: Document, label: str, runner: str | None, limits: Limits
    ) -> Model:
        decoded = document.decoded or decode_document(
            document.data, model=label, path=document.path
        )
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


class Model:
    """A decoded manifest together with the store its blobs live in.

    Get one with ``await ModelStore().open(name)``.
    """

    def __init__(
        self,
        store: ModelStore,
        manifest: Manifest,
        *,
        label: str,
        path: Path | None,
        digest: str | None = None,
        limits: Limits | None = None,
        document: Document | None = None,
        manifest_list: ManifestList | None = None,
        runner: str | None = None,
    ) -> None:
        self.store = store
        #: the caps its configs are read under (`Limits.max_config_bytes`)
        self.limits = limits or Limits()
        self.manifest = manifest
        #: how the model was named by the caller (name, path, or ``"<manifest>"``)
        self.label = label
        #: the manifest entry (file or ``manifests-v2`` link), when the model came from one
        self.path = path
        #: ``sha256:<hex>`` of the runnable manifest document (the selected child of a
        #: manifest list; the anchored document of a legacy anchor; else the bytes read, or
        #: as encoded for a `Manifest` given directly): a re-pulled model has a new digest
        self.digest = digest or "sha256:" + hashlib.sha256(encode_manifest(manifest)).hexdigest()
        #: the manifest list the model was selected from, if its tag holds one
        self.manifest_list = manifest_list
        #: ``sha256:<hex>`` of that list's document
        self.list_digest = document.digest if document and manifest_list else None
        #: how the manifest is stored: ``"manifests-v2 symlink"``, ``"manifests-v2 hard link"``,
        #: ``"manifests-v2 copy"``, ``"manifests"`` (legacy), ``"file"`` or None (in memory)
        self.layout = document.layout if document else None
        #: modification time of the manifest entry, seconds since the epoch
        self.modified = document.modified if document else None
        #: why a ``manifests-v2`` entry of the name was skipped for the legacy one, if it was
        self.skipped = document.skipped if document else None
        self._config: ModelConfig | None = None
        self.kind: ModelKind = classify(manifest, None)
        if self.kind == "empty":
            self._config = self._read_config_now()
            self.kind = classify(manifest, self._config)
        #: the runner this manifest is for: the list child chosen, the manifest's own
        #: ``runner``, else derived from its weights (``mlx`` for tensors, ``ggml`` for GGUF)
        self.runner = runner or manifest.runner.lower() or _RUNNERS.get(self.kind, "")
        #: the weight format: ``"safetensors"``, ``"gguf"``, or ``""`` when no local weights
        self.format = manifest.format.lower() or _FORMATS.get(self.kind, "")

    def __repr__(self) -> str:
        return f"<Model {self.label!r} {self.kind}: {len(self.manifest.layers)} layers>"

    def _read_config_now(self) -> ModelConfig | None:
        """The config blob read at once (blocking): only models without weights need it,
        to tell a cloud model from an empty one."""
        layer = self.manifest.config
        try:
            path = self.store.blob_path(layer.digest)
            if layer.size > self.limits.max_config_bytes:
                return None
            data = read_file(path, "config", expected_size=layer.size)
            return decode_config(bytes(data), model=self.label)
        except (OSError, AsyncWeightsError):
            return None

    def check_loadable(self) -> None:
        """Raise unless the model holds weights asyncweights can load: safetensors tensor
        layers, or a GGUF model's ``image.model`` layer.

        Raises:
            UnsupportedModelError: an adapter-only, cloud or empty model; the message says
                which and why.
        """
        if self.kind in ("tensor", "gguf"):
            return
        if self.kind == "adapter":
            kinds = sorted(
                {"adapter" if x.media_type == ADAPTER_MEDIA_TYPE else "projector"
                 for x in self.manifest.gguf_layers}
            )  # fmt: skip
            reason = (
                f"adapter-only model: it holds only a GGUF {' and '.join(kinds)} layer and no "
                "base weights; load the base model it applies to"
            )
        elif self.kind == "cloud":
            config = self._config or ModelConfig()
            reason = (
                f"cloud model: it runs on {config.remote_host or 'a remote host'}"
                f" as {config.remote_model or self.label!r}; there are no local weights to load"
            )
        else:
            reason = "model has no weights: no tensor or GGUF layers, and no remote host"
        raise UnsupportedModelError(self.kind, reason, model=self.label, path=self.path)

    @property
    def tensor_layers(self) -> list[Layer]:
        """Tensor layers, in manifest order."""
        return self.manifest.tensor_layers

    @property
    def components(self) -> list[str]:
        """Components present, in manifest order: the first segment of prefixed tensor layer
        names; for a GGUF model, ``model`` and (multimodal) ``projector``."""
        seen: dict[str, None] = {}
        for layer in self.tensor_layers:
            if layer.name and "/" in layer.name:
                seen.setdefault(layer.name.split("/", 1)[0], None)
        for component, _ in self.gguf_components:
            seen.setdefault(component, None)
        return list(seen)

    @property
    def gguf_components(self) -> list[tuple[str, Layer]]:
        """A GGUF model's loadable layers with the component each loads as: the main weights
        (``application/vnd.ollama.image.model``) as ``model``, a multimodal projector
        (``application/vnd.ollama.image.projector``) as ``projector``. Empty unless the
        model's kind is ``"gguf"``; adapters are not loaded."""
        if self.kind != "gguf":
            return []
        return [
            (_GGUF_COMPONENTS[layer.media_type], layer)
            for layer in self.manifest.layers
            if layer.media_type in _GGUF_COMPONENTS
        ]

    async def gguf_metadata(self, component: str = "model") -> dict[str, Any]:
        """The metadata of a GGUF layer, its header validated (read in a worker thread).

        Values are int, float, bool, str, or `GGUFArray` (tokenizer vocabularies and other
        arrays, decoded only when read).

        Raises:
            ComponentNotFoundError: no GGUF layer for `component`; BlobError and its
                subclasses (HeaderError …) naming the blob and file.
        """
        from ._gguf import read_gguf_header

        layer = self._gguf_layer(component)
        path = self.store.blob_path(layer.digest)
        try:
            header = await anyio.to_thread.run_sync(
                functools.partial(read_gguf_header, path, expected_size=layer.size)
            )
        except AsyncWeightsError as exc:
            exc.add_context(model=self.label, digest=layer.digest, path=path)
            raise
        return header.metadata

    def _gguf_layer(self, component: str) -> Layer:
        for name, layer in self.gguf_components:
            if name == component:
                return layer
        raise ComponentNotFoundError(
            component, [name for name, _ in self.gguf_components], model=self.label
        )

    @property
    def config_names(self) -> list[str]:
        """Names of the JSON config layers (``model_index.json``, ``vae/config.json`` …)."""
        return [layer.name for layer in self.manifest.json_layers if layer.name]

    @property
    def total_tensor_size(self) -> int:
        """Sum of tensor layer sizes, headers included, each distinct blob counted once."""
        return sum({layer.digest: layer.size for layer in self.tensor_layers}.values())

    async def read_config_bytes(self, name: str) -> bytes:
        """The raw bytes of the JSON layer whose name is exactly `name`.

        Raises:
            ConfigNotFoundError: no such layer; BlobMissingError: its blob is absent.
        """
        return bytes(await self._read_blob(self._config_layer(name), what=f"config {name!r}"))

    def _config_layer(self, name: str) -> Layer:
        for layer in self.manifest.json_layers:
            if layer.name == name:
                return layer
        raise ConfigNotFoundError(f"config {name!r} not found in manifest", model=self.label)

    async def read_config(self, name: str) -> Any:
        """The decoded JSON of the config layer `name` (e.g. ``"model_index.json"``).

        Raises:
            ConfigNotFoundError: no such layer. ManifestError: the layer is not valid JSON.
        """
        layer = self._config_layer(name)
        data = await self._read_blob(layer, what=f"config {name!r}")
        try:
            # In a worker thread, in bounded steps when large: the event loop stays free.
            return await anyio.to_thread.run_sync(loads, data)
        except JSONError as exc:
            reason = exc.reason
            if reason.startswith("not valid JSON: "):
                reason = reason[len("not valid JSON: ") :]
            what = (
                "has a" if reason.startswith("JSON object with more than") else "is not valid JSON:"
            )
            raise ManifestError(
                f"config {name!r} {what} {reason}",
                model=self.label,
                digest=layer.digest,
                path=self.store.blob_path(layer.digest),
            ) from None

    async def config(self) -> ModelConfig:
        """The model's config blob (Ollama's ConfigV2), decoded once."""
        if self._config is None:
            data = await self._read_blob(self.manifest.config, what="config blob")
            decode = functools.partial(
                decode_config, data, model=self.label, digest=self.manifest.config.digest
            )
            self._config = await anyio.to_thread.run_sync(decode)
        return self._config

    async def _read_blob(self, layer: Layer, *, what: str) -> bytes | bytearray:
        path = self.store.blob_path(layer.digest)
        cap = self.limits.max_config_bytes
        if layer.size > cap:
            raise BlobError(
                f"{what} is {layer.size} bytes, over Limits.max_config_bytes ({cap})",
                model=self.label,
                digest=layer.digest,
                path=path,
            )
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(read_file, path, "config", expected_size=layer.size)
            )
        except AsyncWeightsError as exc:
            exc.add_context(model=self.label, digest=layer.digest)
            raise
