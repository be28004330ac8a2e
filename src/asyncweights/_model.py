"""A model opened from a store: its manifest, components, configs and sizes."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._errors import (
    AsyncWeightsError,
    BlobError,
    ComponentNotFoundError,
    ConfigNotFoundError,
    ManifestError,
    UnsupportedModelError,
)
from ._files import read_file
from ._json import JSONError, loads
from ._limits import Limits
from ._manifest import (
    ADAPTER_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    PROJECTOR_MEDIA_TYPE,
    Layer,
    Manifest,
    ManifestList,
    ModelConfig,
    ModelKind,
    classify,
    decode_config,
    encode_manifest,
)

if TYPE_CHECKING:
    from ._layout import Document
    from ._store import ModelStore

__all__ = ["Model"]

_GGUF_COMPONENTS = {MODEL_MEDIA_TYPE: "model", PROJECTOR_MEDIA_TYPE: "projector"}
_RUNNERS = {"tensor": "mlx", "gguf": "ggml", "adapter": "ggml"}
_FORMATS = {"tensor": "safetensors", "gguf": "gguf", "adapter": "gguf"}


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
            raise ManifestError(
                f"config {name!r} is not valid JSON: {reason}",
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
