"""msgspec Structs for Ollama manifests, manifest lists, their layers and the config blob,
and model kinds: one set of Structs that the reader decodes and the writer encodes.

docs/format.md describes the format; the media types and the list document follow Ollama's
``manifest/manifest.go`` (ollama/ollama PR #16590 at ``baa78e711``, shipped in v0.40).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

import msgspec

from ._errors import InvalidDigestError, ManifestError
from ._json import FAST_BYTES, JSONError, decode_text, gc_paused, loads_stepwise, release
from ._names import DIGEST_PATTERN

__all__ = [
    "ADAPTER_MEDIA_TYPE",
    "ANCHOR_MEDIA_TYPES",
    "CONFIG_MEDIA_TYPE",
    "JSON_MEDIA_TYPE",
    "MANIFEST_LIST_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPE",
    "MANIFEST_MEDIA_TYPES",
    "MODEL_MEDIA_TYPE",
    "ONE_CALL_BYTES",
    "PROJECTOR_MEDIA_TYPE",
    "TENSOR_MEDIA_TYPE",
    "Layer",
    "Manifest",
    "ManifestList",
    "ManifestRef",
    "ModelConfig",
    "ModelKind",
    "RootFS",
    "build_manifest",
    "classify",
    "decode_config",
    "decode_document",
    "decode_manifest",
    "encode_config",
    "encode_manifest",
]

TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"
JSON_MEDIA_TYPE = "application/vnd.ollama.image.json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
#: A GGUF weights blob (the main weights of a GGUF model).
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
#: A GGUF LoRA adapter blob.
ADAPTER_MEDIA_TYPE = "application/vnd.ollama.image.adapter"
#: A GGUF multimodal projector blob.
PROJECTOR_MEDIA_TYPE = "application/vnd.ollama.image.projector"
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
#: Ollama 0.40's manifest list: children per runner (``mlx``, ``ggml``, ``llamacpp``).
MANIFEST_LIST_MEDIA_TYPE = "application/vnd.ollama.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = frozenset(
    {MANIFEST_MEDIA_TYPE, "application/vnd.oci.image.manifest.v1+json"}
)
#: Layers of a legacy "anchor" manifest that point at manifest documents, not weights: they
#: keep those documents alive under an older Ollama's garbage collection.
ANCHOR_MEDIA_TYPES = frozenset({MANIFEST_MEDIA_TYPE, MANIFEST_LIST_MEDIA_TYPE})
_GGUF_MEDIA_TYPES = frozenset({MODEL_MEDIA_TYPE, ADAPTER_MEDIA_TYPE, PROJECTOR_MEDIA_TYPE})

#: What a manifest holds (`classify`): safetensors tensors, a GGUF model, only a GGUF adapter
#: or projector, a cloud model (weights on a remote host), or no weights at all.
ModelKind = Literal["tensor", "gguf", "adapter", "cloud", "empty"]

Digest = Annotated[str, msgspec.Meta(pattern=DIGEST_PATTERN)]
Size = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
_DIGEST = re.compile(DIGEST_PATTERN)
_MAX_SIZE = 2**62
# Decoding failures that mean "not a manifest": msgspec's own, bytes that are not UTF-8 (checked
# with bytes.decode before msgspec runs: msgspec's own report of it changed wording in 0.23), and
# nesting deeper than the interpreter allows.
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class Layer(msgspec.Struct, rename="camel", omit_defaults=True, gc=False):
    """One manifest entry: a blob's media type, digest, size and optional logical name.

    The digest is normalized to lowercase hex on decoding; unknown fields are ignored. An
    empty name is no name (None), and is left out when encoded, as Ollama writes it.
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
        if not self.name:
            self.name = None

    @property
    def is_tensor(self) -> bool:
        """Whether the layer is a safetensors tensor blob."""
        return self.media_type == TENSOR_MEDIA_TYPE

    @property
    def is_json(self) -> bool:
        """Whether the layer is a JSON config file addressed by name."""
        return self.media_type == JSON_MEDIA_TYPE


class Manifest(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """An Ollama manifest: schema version 2, a config blob and the layers in order.

    Fields are encoded in Ollama's order; a missing media type means Docker's v2 manifest.
    """

    schema_version: int
    media_type: str = ""
    config: Layer
    layers: list[Layer]
    #: Ollama 0.40: the runner the manifest is for (``mlx``, ``ggml``, ``llamacpp``), if given
    runner: str = ""
    #: Ollama 0.40: the weight format (``safetensors``, ``gguf``), if given
    format: str = ""

    def __post_init__(self) -> None:
        # Decoded or built in Python alike; set, it is always encoded (Ollama always writes it).
        if not self.media_type:
            self.media_type = MANIFEST_MEDIA_TYPE

    @property
    def tensor_layers(self) -> list[Layer]:
        """The tensor layers, in manifest order."""
        return [layer for layer in self.layers if layer.is_tensor]

    @property
    def anchor_layers(self) -> list[Layer]:
        """Layers that point at manifest documents (an Ollama 0.40 legacy anchor), not weights."""
        return [layer for layer in self.layers if layer.media_type in ANCHOR_MEDIA_TYPES]

    @property
    def gguf_layers(self) -> list[Layer]:
        """GGUF model, adapter and projector layers, in manifest order."""
        return [layer for layer in self.layers if layer.media_type in _GGUF_MEDIA_TYPES]

    @property
    def json_layers(self) -> list[Layer]:
        """The JSON config layers, in manifest order."""
        return [layer for layer in self.layers if layer.is_json]


class ManifestRef(msgspec.Struct, rename="camel", omit_defaults=True):
    """One child of a manifest list: a reference to a manifest document stored as a blob.

    Ollama also allows a child written inline (``config`` and ``layers`` in place of
    ``digest``); `inline` holds it then.
    """

    media_type: str = MANIFEST_MEDIA_TYPE
    digest: str = ""
    runner: str = ""
    format: str = ""
    config: Layer | None = None
    layers: list[Layer] | None = None
    schema_version: int = 2

    @property
    def inline(self) -> Manifest | None:
        """The child itself when it is written inline rather than referenced by digest."""
        if self.config is None:
            return None
        return Manifest(
            schema_version=self.schema_version, media_type=self.media_type, config=self.config,
            layers=list(self.layers or []), runner=self.runner, format=self.format,
        )  # fmt: skip


class ManifestList(msgspec.Struct, rename="camel", omit_defaults=True):
    """An Ollama 0.40 manifest list: one runnable manifest per runner and weight format."""

    schema_version: int
    media_type: str
    manifests: list[ManifestRef]


class RootFS(msgspec.Struct):
    """The config blob's ``rootfs`` (required by the image spec; Ollama writes it empty)."""

    type: str = ""
    diff_ids: list[str] | None = None


class ModelConfig(msgspec.Struct, kw_only=True):
    """The config blob (Ollama's ConfigV2), fields in the order Ollama writes them.

    ``remote_host``/``remote_model`` mark a cloud model (``types/model/config.go`` at
    ollama ``fb3076099``); ``parser``/``renderer`` come with Ollama 0.40's MLX imports.
    Unknown fields are ignored when decoding; `encode_config` writes it as Ollama does.
    """

    model_format: str = ""
    model_family: str = ""
    model_families: list[str] | None = None
    model_type: str = ""
    file_type: str = ""
    renderer: str = ""
    parser: str = ""
    requires: str = ""
    remote_host: str = ""
    remote_model: str = ""
    capabilities: list[str] | None = None
    architecture: str = ""
    os: str = ""
    rootfs: RootFS | None = msgspec.field(default_factory=RootFS)
    draft: dict[str, Any] | None = None


#: ConfigV2 fields Go writes only when set (``omitempty``); the others are always written.
_OMIT_EMPTY = frozenset(
    {"renderer", "parser", "requires", "remote_host", "remote_model", "capabilities", "draft"}
)


def classify(manifest: Manifest, config: ModelConfig | None) -> ModelKind:
    """What a manifest holds, from its layers (and, when it has no weights, its config).

    Tensor layers make a tensor model; a GGUF ``image.model`` layer a GGUF model; adapter or
    projector layers alone an adapter-only model; no weights and a ``remote_host`` a cloud
    model; anything else holds no weights.
    """
    media = {layer.media_type for layer in manifest.layers}
    if TENSOR_MEDIA_TYPE in media:
        return "tensor"
    if MODEL_MEDIA_TYPE in media:
        return "gguf"
    if media & _GGUF_MEDIA_TYPES:
        return "adapter"
    if config is not None and (config.remote_host or config.remote_model):
        return "cloud"
    return "empty"


class _Kind(msgspec.Struct):
    media_type: str = msgspec.field(default="", name="mediaType")


_T = TypeVar("_T")
_MANIFEST_DECODER = msgspec.json.Decoder(Manifest)
_LIST_DECODER = msgspec.json.Decoder(ManifestList)
_KIND_DECODER = msgspec.json.Decoder(_Kind)
_CONFIG_DECODER = msgspec.json.Decoder(ModelConfig)
_ENCODER = msgspec.json.Encoder()


def decode_manifest(
    data: bytes | bytearray | _Document,
    *,
    model: str | None = None,
    path: Path | None = None,
) -> Manifest:
    """Decode and check a manifest.

    Raises:
        ManifestError: not JSON, a wrong type or missing field (the message carries its JSON
            path, e.g. ``$.layers[3].digest``), an unknown schema version or media type.
    """
    try:
        if isinstance(data, _Document):
            manifest = data.decode(_MANIFEST_DECODER)
        else:
            with _Document(data) as document:
                manifest = document.decode(_MANIFEST_DECODER)
    except (*_DECODE_ERRORS, JSONError) as exc:
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


def decode_document(
    data: bytes | bytearray, *, model: str | None = None, path: Path | None = None
) -> Manifest | ManifestList:
    """Decode a manifest document: a runnable `Manifest` or an Ollama `ManifestList`.

    Raises:
        ManifestError: as `decode_manifest`; a list nested in a list.
    """
    with _Document(data) as document:
        try:
            kind = document.parse().decode(_KIND_DECODER)
        except (*_DECODE_ERRORS, JSONError) as exc:
            raise ManifestError(
                f"invalid manifest: {_describe(exc)}", model=model, path=path
            ) from exc
        if kind.media_type != MANIFEST_LIST_MEDIA_TYPE:
            return decode_manifest(document, model=model, path=path)
        try:
            listed = document.decode(_LIST_DECODER)
        except _DECODE_ERRORS as exc:
            raise ManifestError(
                f"invalid manifest list: {_describe(exc)}", model=model, path=path
            ) from exc
    for child in listed.manifests:
        if child.media_type == MANIFEST_LIST_MEDIA_TYPE:
            raise ManifestError("nested manifest lists are not supported", model=model, path=path)
        if child.config is None and not _DIGEST.fullmatch(child.digest):
            raise ManifestError(
                f"manifest list child has an invalid digest {child.digest!r}",
                model=model,
                path=path,
            )
    return listed


def decode_config(
    data: bytes | bytearray, *, model: str | None = None, digest: str | None = None
) -> ModelConfig:
    """Decode the config blob (ConfigV2); unknown fields are ignored.

    Raises:
        ManifestError: the blob is not a JSON object of the expected field types.
    """
    try:
        # One msgspec call only up to FAST_BYTES: `draft` is a free-form object, which a
        # hostile blob can make huge, and building a big dict is one long C step.
        with _Document(data, one_call_bytes=FAST_BYTES) as document:
            tree = None if document.one_call else document.parse().tree
            if not isinstance(tree, dict) or not isinstance(tree.get("draft"), dict):
                return document.decode(_CONFIG_DECODER)
            draft: dict[str, Any] = tree["draft"]
            # Kept as parsed, not copied by ``msgspec.convert`` in one call (a 349,000-key
            # object: 72 ms): a JSON object's keys are strings, and its values are `Any`.
            del tree["draft"]
            config = document.decode(_CONFIG_DECODER)
            config.draft = draft
            return config
    except (*_DECODE_ERRORS, JSONError) as exc:
        raise ManifestError(
            f"invalid model config blob: {_describe(exc)}", model=model, digest=digest
        ) from exc


#: manifests up to this size are decoded by one msgspec call per type (config blobs: up to
#: `FAST_BYTES`, see `decode_config`). Measured
#: on a 2-core VM with a 1 ms asyncio ticker beside a worker thread decoding: a 4 MiB manifest
#: of 20,000 layers 27 ms with a worst lag of 5.6 ms (the 5 ms switch interval: the GIL changes
#: hands in ``Layer.__post_init__``), against 380 ms stepwise; a 15 MiB unknown field of long
#: strings 8-12 ms in one C call. Real manifests are far below it (5,120 layers: 0.95 MiB).
ONE_CALL_BYTES = 4 * 1024 * 1024


class _Document:
    """A JSON document, parsed once however many types it is decoded as.

    Up to `one_call_bytes` (`ONE_CALL_BYTES` unless given) each type is one msgspec call
    on the bytes, with the garbage
    collector paused above `FAST_BYTES`; above that the text is parsed once in bounded steps
    (`_json`), and each type is built from that tree by ``msgspec.convert``. Either way a
    worker thread decoding a big one leaves the GIL to the event loop often: ``Layer`` runs
    ``__post_init__`` (Python) per layer, so the interpreter can switch threads between
    layers, and what msgspec does in C between two layers is bounded by the document's size
    (a skipped unknown field of 4 MiB: about 3 ms).

    Use as ``with _Document(data) as document: document.decode(...)``: a big one keeps the
    garbage collector paused while it is decoded and frees a stepwise tree piecewise on exit
    (`_json.gc_paused`, `_json.release`).

    Raises:
        JSONError: not UTF-8 (checked here for both sizes: msgspec does not look inside
            skipped fields, and its wording changes between releases), not JSON.
    """

    def __init__(self, data: bytes | bytearray, *, one_call_bytes: int = ONE_CALL_BYTES) -> None:
        self.data = data
        self.tree: Any = None
        self.parsed = False
        self.one_call = len(data) <= one_call_bytes
        self._paused = contextlib.ExitStack()

    def __enter__(self) -> _Document:
        if len(self.data) > FAST_BYTES:
            self._paused.enter_context(gc_paused())
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            release(self.tree)
            self.tree = None
        finally:
            self._paused.close()

    def parse(self) -> _Document:
        if not self.parsed:
            if self.one_call:
                decode_text(self.data)
            else:
                self.tree = loads_stepwise(self.data)
            self.parsed = True
        return self

    def decode(self, decoder: msgspec.json.Decoder[_T]) -> _T:
        self.parse()
        if self.one_call:
            return decoder.decode(self.data)
        return cast("_T", msgspec.convert(self.tree, decoder.type))


def _describe(exc: Exception) -> str:
    if isinstance(exc, JSONError):
        return exc.reason
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.start})"
    return str(exc)


def encode_manifest(manifest: Manifest) -> bytes:
    """Encode a manifest as compact JSON, as Ollama writes it (without the final newline)."""
    return _ENCODER.encode(manifest)


def build_manifest(config: Layer, layers: Sequence[Layer]) -> Manifest:
    """A schema-2 Docker manifest: the config layer, then the layers in order."""
    return Manifest(
        schema_version=2, media_type=MANIFEST_MEDIA_TYPE, config=config, layers=list(layers)
    )


def encode_config(config: ModelConfig) -> bytes:
    """Encode a config blob as Ollama writes it: compact, fields in its order, ``omitempty``
    fields left out when empty."""
    fields = {
        name: value
        for name in config.__struct_fields__
        if (value := getattr(config, name)) or name not in _OMIT_EMPTY
    }
    return _ENCODER.encode(fields)
