"""A model opened from a store: its manifest, components, configs and sizes."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ._errors import AsyncWeightsError, BlobError, ConfigNotFoundError, ManifestError
from ._files import read_file
from ._limits import Limits
from ._manifest import Layer, Manifest, ModelConfig, decode_config, encode_manifest

if TYPE_CHECKING:
    from ._store import ModelStore

__all__ = ["Model"]

_JSON_DECODER = msgspec.json.Decoder()


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
    ) -> None:
        self.store = store
        #: the caps its configs are read under (`Limits.max_config_bytes`)
        self.limits = limits or Limits()
        self.manifest = manifest
        #: how the model was named by the caller (name, path, or ``"<manifest>"``)
        self.label = label
        #: the manifest file, when the model came from one
        self.path = path
        #: ``sha256:<hex>`` of the manifest's bytes as read (or as encoded, for a `Manifest`
        #: given directly): a re-pulled model under the same name has a new digest
        self.digest = digest or "sha256:" + hashlib.sha256(encode_manifest(manifest)).hexdigest()
        self._config: ModelConfig | None = None

    def __repr__(self) -> str:
        return f"<Model {self.label!r} {len(self.tensor_layers)} tensor layers>"

    @property
    def tensor_layers(self) -> list[Layer]:
        """Tensor layers, in manifest order."""
        return self.manifest.tensor_layers

    @property
    def components(self) -> list[str]:
        """Components present (first segment of prefixed layer names), in manifest order."""
        seen: dict[str, None] = {}
        for layer in self.tensor_layers:
            if layer.name and "/" in layer.name:
                seen.setdefault(layer.name.split("/", 1)[0], None)
        return list(seen)

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
            return _JSON_DECODER.decode(data)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
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
            self._config = decode_config(data, model=self.label, digest=self.manifest.config.digest)
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
