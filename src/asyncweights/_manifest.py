"""msgspec Structs for Ollama manifests and their layers (FORMAT.md §2)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import msgspec

from ._errors import InvalidDigestError, ManifestError

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "JSON_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPES",
    "TENSOR_MEDIA_TYPE",
    "Layer",
    "Manifest",
    "ModelConfig",
    "decode_manifest",
    "encode_manifest",
]

TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MANIFEST_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    }
)

Digest = Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-fA-F]{64}$")]
Size = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
_DIGEST = re.compile(r"sha256:[0-9a-fA-F]{64}")
_MAX_SIZE = 2**62
# Decoding failures that mean "not a manifest": msgspec's own, bytes that are not UTF-8 (checked
# with bytes.decode before msgspec runs: msgspec's own report of it changed wording in 0.23), and
# nesting deeper than the interpreter allows.
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class Layer(msgspec.Struct, rename="camel", omit_defaults=True, gc=False):
    """One manifest entry: a blob's media type, digest, size and optional logical name.

    The digest is normalized to lowercase hex on decoding; unknown fields are ignored.
    """

    media_type: str
    digest: Digest
    size: Size
    name: str | None = None

    def __post_init__(self) -> None:
        # Decoding checks the Annotated constraints already; a Layer built in Python does not,
        # and its digest becomes a file name, so check it here as well.
        if not isinstance(self.digest, str) or not _DIGEST.fullmatch(self.digest):
            raise InvalidDigestError(
                f"invalid digest {self.digest!r}: expected 'sha256:' and 64 hex digits"
            )
        if type(self.size) is not int or not 0 <= self.size <= _MAX_SIZE:
            raise ValueError(f"invalid layer size {self.size!r}")
        self.digest = self.digest.lower()

    @property
    def is_tensor(self) -> bool:
        """Whether the layer is a safetensors tensor blob."""
        return self.media_type == TENSOR_MEDIA_TYPE

    @property
    def is_json(self) -> bool:
        """Whether the layer is a JSON config file addressed by name."""
        return self.media_type == JSON_MEDIA_TYPE


class Manifest(msgspec.Struct, rename="camel", omit_defaults=True):
    """An Ollama manifest: schema version 2, a config blob and the layers in order."""

    schema_version: int
    config: Layer
    layers: list[Layer]
    media_type: str = "application/vnd.docker.distribution.manifest.v2+json"

    @property
    def tensor_layers(self) -> list[Layer]:
        """The tensor layers, in manifest order."""
        return [layer for layer in self.layers if layer.is_tensor]

    @property
    def json_layers(self) -> list[Layer]:
        """The JSON config layers, in manifest order."""
        return [layer for layer in self.layers if layer.is_json]


class ModelConfig(msgspec.Struct, omit_defaults=True):
    """The fields of the config blob (Ollama's ConfigV2) a tensor loader uses."""

    model_format: str = ""
    file_type: str = ""
    capabilities: list[str] | None = None
    requires: str = ""
    architecture: str = ""


_MANIFEST_DECODER = msgspec.json.Decoder(Manifest)
_CONFIG_DECODER = msgspec.json.Decoder(ModelConfig)
_ENCODER = msgspec.json.Encoder()


def decode_manifest(
    data: bytes | bytearray, *, model: str | None = None, path: Path | None = None
) -> Manifest:
    """Decode and check a manifest.

    Raises:
        ManifestError: not JSON, a wrong type or missing field (the message carries its JSON
            path, e.g. ``$.layers[3].digest``), an unknown schema version or media type.
    """
    try:
        # Strict UTF-8 for the whole document: msgspec does not look inside skipped fields.
        bytes(data).decode("utf-8")
        manifest = _MANIFEST_DECODER.decode(data)
    except _DECODE_ERRORS as exc:
        raise ManifestError(f"invalid manifest: {_describe(exc)}", model=model, path=path) from exc
    if manifest.schema_version != 2:
        raise ManifestError(
            f"unsupported manifest schemaVersion {manifest.schema_version} (expected 2)",
            model=model,
            path=path,
        )
    if manifest.media_type not in MANIFEST_MEDIA_TYPES:
        raise ManifestError(
            f"unsupported manifest mediaType {manifest.media_type!r}", model=model, path=path
        )
    return manifest


def decode_config(
    data: bytes | bytearray, *, model: str | None = None, digest: str | None = None
) -> ModelConfig:
    """Decode the config blob (ConfigV2); unknown fields are ignored.

    Raises:
        ManifestError: the blob is not a JSON object of the expected field types.
    """
    try:
        bytes(data).decode("utf-8")  # checked here, not left to msgspec's wording
        return _CONFIG_DECODER.decode(data)
    except _DECODE_ERRORS as exc:
        raise ManifestError(
            f"invalid model config blob: {_describe(exc)}", model=model, digest=digest
        ) from exc


def _describe(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.start})"
    return str(exc)


def encode_manifest(manifest: Manifest) -> bytes:
    """Encode a manifest as compact JSON, as Ollama writes it (without the final newline)."""
    return _ENCODER.encode(manifest)
