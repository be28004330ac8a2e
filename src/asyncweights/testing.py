"""Builders of small synthetic Ollama stores, with real bytes, for every era (docs/format.md#eras).

``StoreBuilder.add_model`` writes a whole model the way Ollama wrote it in a given era and
returns a ``BuiltModel`` that says what a loader must produce. The lower-level methods
(``add_blob``, ``add_bytes``, ``add_json``, ``add_config``, ``write_manifest``) build unusual
layouts by hand::

    from asyncweights.testing import StoreBuilder, random_weights

    b = StoreBuilder(tmp_path)
    weights = random_weights({"model.layers.0.mlp.up_proj.weight": (64, 128)}, seed=1)
    model = b.add_model("toy:latest", weights, era="E3", quantize="int4")
    model.expected   # {"...up_proj.weight": U32, "..._scale": BF16, "..._qbias": BF16}
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import mlx.core as mx
import msgspec

from ._header import dtype_name
from ._manifest import (
    CONFIG_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    TENSOR_MEDIA_TYPE,
    Layer,
    build_manifest,
)
from ._quant import Era, Quantization, QuantSpec, quant_params, quantize_array, should_quantize
from ._writer import (
    COMPONENTS,
    IMAGEGEN_CONFIGS,
    RawTensor,
    Style,
    build_config,
    encode_json,
    manifest_path,
    tensor_from_array,
    write_blob,
    write_manifest,
    write_tensor_blob,
)

if TYPE_CHECKING:
    from _typeshed import StrPath

__all__ = [
    "BuiltModel",
    "Era",
    "Layer",
    "LayoutName",
    "MetadataStyle",
    "RawTensor",
    "StoreBuilder",
    "default_policy",
    "quant_params",
    "quantize_array",
    "random_array",
    "random_weights",
]

MetadataStyle: TypeAlias = Literal["none", "global", "per_tensor", "both", "auto"]
#: How a manifest is laid out, as each Ollama version writes it: ``legacy`` (every version up
#: to 0.34: ``manifests/`` only); Ollama 0.40's ``manifests-v2`` entry as a relative symlink,
#: a hard link or a copy of the manifest document blob, each with the legacy anchor; and a
#: dangling ``manifests-v2`` symlink beside a legacy manifest.
LayoutName: TypeAlias = Literal["legacy", "v2-symlink", "v2-hardlink", "v2-copy", "v2-dangling"]
_MANIFEST_LIST_MEDIA_TYPE = "application/vnd.ollama.manifest.list.v2+json"
_GGUF_MEDIA_TYPES = {
    "model": "application/vnd.ollama.image.model",
    "adapter": "application/vnd.ollama.image.adapter",
    "projector": "application/vnd.ollama.image.projector",
    "template": "application/vnd.ollama.image.template",
    "system": "application/vnd.ollama.image.system",
    "params": "application/vnd.ollama.image.params",
    "license": "application/vnd.ollama.image.license",
}
QuantPolicy: TypeAlias = Callable[[str, mx.array], QuantSpec | None]
Quantize: TypeAlias = str | Mapping[str, QuantSpec] | QuantPolicy | None


# Labels written to E0 model_index.json for each requested type.
_E0_LABELS: Mapping[str, str] = {
    "int4": "Q4",
    "int8": "Q8",
    "nvfp4": "NVFP4",
    "mxfp4": "MXFP4",
    "mxfp8": "MXFP8",
}
_DEFAULT_METADATA: Mapping[str, MetadataStyle] = {
    "E0": "none",
    "E1": "none",
    "E2": "per_tensor",
    "E3": "auto",
}


def default_policy(qtype: QuantSpec, *, era: Era = "E3") -> QuantPolicy:
    """Ollama's E0/E1 rule of which tensors to quantize, for one requested type.

    See docs/format.md#quant-policy.

    Skipped: the ``vae`` component, names with ``embed``, ``norm`` or ``ln_``, non-float
    tensors, anything but a ``*.weight`` of rank 2 or more, and last dimensions the group
    does not divide (`should_quantize`, shared with the importer).
    """
    group = quant_params(qtype, era=era).group_size

    def policy(name: str, array: mx.array) -> QuantSpec | None:
        dtype = dtype_name(array.dtype)
        return qtype if should_quantize(name, dtype, array.shape, group) else None

    return policy


def _seed_key(seed: int | str) -> mx.array:
    if isinstance(seed, str):
        seed = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little")
    return mx.random.key(seed)


def random_array(
    shape: Sequence[int], dtype: mx.Dtype = mx.bfloat16, *, seed: int | str = 0
) -> mx.array:
    """A deterministic random array: normal floats, small integers, or fair booleans."""
    key = _seed_key(seed)
    if dtype == mx.bool_:
        out = mx.random.bernoulli(0.5, list(shape), key=key)
    elif mx.issubdtype(dtype, mx.integer):
        out = mx.random.randint(0, 100, list(shape), dtype=dtype, key=key)
    else:
        out = mx.random.normal(list(shape), key=key).astype(dtype)
    mx.eval(out)
    return out


def random_weights(
    shapes: Mapping[str, Sequence[int]], dtype: mx.Dtype = mx.bfloat16, *, seed: int | str = 0
) -> dict[str, mx.array]:
    """Deterministic random tensors by name; each depends only on ``seed`` and its name."""
    return {name: random_array(s, dtype, seed=f"{seed}:{name}") for name, s in shapes.items()}


@dataclass
class BuiltModel:
    """What ``add_model`` wrote, and what a loader must produce from it.

    ``expected`` maps every logical name (with its ``component/`` prefix, as loaded with no
    component) to its array: packed weights ``X``, scales ``X_scale``, biases ``X_qbias``
    (docs/format.md#companion-names), and unquantized tensors. ``quantization`` maps each
    packed ``X`` to its parameters.
    """

    name: str
    path: Path
    manifest: dict[str, Any]
    config: Layer
    layers: list[Layer]
    expected: dict[str, mx.array]
    quantization: dict[str, Quantization]
    source: dict[str, mx.array] = field(repr=False)

    def component(self, component: str | None) -> dict[str, mx.array]:
        """The expected tensors of one component, prefix stripped (all of them for None)."""
        if not component:
            return dict(self.expected)
        prefix = component + "/"
        n = len(prefix)
        return {k[n:]: v for k, v in self.expected.items() if k.startswith(prefix)}


class StoreBuilder:
    """Writes blobs, JSON layers and manifests into a store rooted at ``root``."""

    def __init__(self, root: StrPath) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)

    def add_blob(
        self,
        name: str,
        tensors: Mapping[str, mx.array] | Iterable[RawTensor],
        *,
        style: Style = "go",
        metadata: Mapping[str, str] | None = None,
        media_type: str = TENSOR_MEDIA_TYPE,
    ) -> Layer:
        """Write one safetensors blob, data in the order given, and return its layer ``name``."""
        if isinstance(tensors, Mapping):
            items = [tensor_from_array(k, v) for k, v in tensors.items()]
        else:
            items = list(tensors)
        blob = write_tensor_blob(self.root, items, style=style, metadata=metadata)
        return Layer(media_type, blob.digest, blob.size, name)

    def add_bytes(self, name: str, data: bytes, *, media_type: str = TENSOR_MEDIA_TYPE) -> Layer:
        """Write arbitrary bytes as a blob (e.g. a malformed tensor blob) and return its layer."""
        blob = write_blob(self.root, [data])
        return Layer(media_type, blob.digest, blob.size, name)

    def add_json(self, name: str, value: object, *, indent: int | None = None) -> Layer:
        """Write a JSON config layer: bytes verbatim, else sorted keys (compact ends in ``\\n``)."""
        if isinstance(value, bytes):
            data = value
        else:
            data = encode_json(value, indent=indent, newline=not indent)
        return self.add_bytes(name, data, media_type=JSON_MEDIA_TYPE)

    def add_config(
        self,
        *,
        file_type: str = "",
        capabilities: Sequence[str] = ("completion",),
        requires: str = "0.19.0",
        draft: Mapping[str, str] | None = None,
    ) -> Layer:
        """Write the ConfigV2 blob (``model_format: safetensors``) and return its layer."""
        data = build_config(
            file_type=file_type, capabilities=capabilities, requires=requires, draft=draft
        )
        return self.add_bytes("", data, media_type=CONFIG_MEDIA_TYPE)

    def write_manifest(
        self, name: str, layers: Sequence[Layer], *, config: Layer | None = None
    ) -> Path:
        """Write the manifest of ``name`` (a default LLM config blob if none is given)."""
        config = config or self.add_config()
        return write_manifest(self.root, name, build_manifest(config, layers))

    def add_model(
        self,
        name: str,
        tensors: Mapping[str, mx.array],
        *,
        era: Era = "E3",
        quantize: Quantize = None,
        pack: Mapping[str, Sequence[str]] | None = None,
        configs: Mapping[str, object] | None = None,
        metadata_style: MetadataStyle | None = None,
        file_type: str | None = None,
        label: str | None = None,
        draft: Mapping[str, str] | None = None,
    ) -> BuiltModel:
        """Write a whole model as Ollama wrote it in ``era`` and return what a loader must see.

        Args:
            name: the model name, e.g. ``"toy:latest"``.
            tensors: source tensors by name; a ``component/`` prefix makes an image-gen model.
            era: the blob grammar (docs/format.md#eras).
            quantize: a type for every tensor ``default_policy`` accepts, a mapping of names to
                a type or ``(type, group_size)``, or a callable ``(name, array)`` returning one
                or None.
            pack: E1+ packed blobs: layer name (a group prefix) -> tensor names it holds.
            configs: JSON layers by path, dicts or bytes. An image-gen ``model_index.json`` dict
                is rewritten the way Ollama stores it (docs/format.md#model-index).
            metadata_style: labels of quantized packed blobs: ``none`` (E1), ``global`` (E2a,
                only when uniform), ``per_tensor`` (E2b), ``both`` or ``auto`` (E3: global when
                uniform, else per tensor). Defaults by era.
            file_type: the config's ``file_type``; by default ``""`` before E2, else the type.
            label: the E0/image-gen ``model_index.json`` ``quantization`` label.
            draft: the config's ``draft`` object.
        """
        params = self._resolve_quantize(tensors, quantize, era)
        types = Counter(p.type for p in params.values())
        model_type = types.most_common(1)[0][0] if types else ""
        components = any("/" in n for n in tensors)
        order = sorted(tensors, key=lambda n: (_component_rank(n), n))

        expected: dict[str, mx.array] = {}
        quantized: dict[str, tuple[mx.array, mx.array, mx.array | None]] = {}
        for n in order:
            if n in params:
                quantized[n] = q = quantize_array(tensors[n], params[n])
                expected[n], expected[n + "_scale"] = q[0], q[1]
                if q[2] is not None:
                    expected[n + "_qbias"] = q[2]
            else:
                expected[n] = tensors[n]

        if era == "E0":
            if pack:
                raise ValueError("E0 has no packed blobs")
            layers = self._e0_layers(order, tensors, quantized)
        else:
            style = metadata_style or _DEFAULT_METADATA[era]
            layers = self._named_layers(order, tensors, quantized, params, pack or {}, style)

        if label is None:
            label = _E0_LABELS[model_type] if era == "E0" and model_type else model_type.upper()
        layers += self._config_layers(configs or {}, tensors, components, label, era, model_type)
        if file_type is None:
            file_type = model_type if era in ("E2", "E3") else ""
        config = self.add_config(
            file_type=file_type,
            capabilities=["image"] if components else ["completion"],
            requires="0.14.0" if era in ("E0", "E1") else "0.19.0",
            draft=draft,
        )
        manifest = build_manifest(config, layers)
        path = write_manifest(self.root, name, manifest)
        return BuiltModel(
            name,
            path,
            msgspec.to_builtins(manifest),
            config,
            layers,
            expected,
            dict(params),
            dict(tensors),
        )

    # ------------------------------------------------------------- Ollama's layouts and kinds

    def add_raw_config(self, config: Mapping[str, Any]) -> Layer:
        """Write a ConfigV2 blob with exactly these fields (a GGUF or cloud model's)."""
        return self.add_bytes("", _encode_go(config), media_type=CONFIG_MEDIA_TYPE)

    def add_gguf_model(
        self,
        name: str,
        *,
        weights: StrPath | bytes | None = None,
        projector: StrPath | bytes | None = None,
        adapter: StrPath | bytes | None = None,
        base: bool = True,
        layout: LayoutName = "legacy",
    ) -> Path:
        """Write a GGUF model as ``ollama pull`` writes one: a GGUF ``image.model`` layer
        (unless `base` is False: an adapter-only model), optional projector and adapter,
        template, params and license layers, and a ``model_format: gguf`` config.

        `weights`, `projector` and `adapter` are a GGUF file's bytes or path (streamed into
        a blob). The weights default to a GGUF magic and version followed by filler: enough
        for a store listing, not a readable GGUF file. Returns the manifest path (see
        `lay_out`).
        """
        layers = []
        if base:
            data = weights if weights is not None else b"GGUF\x03\x00\x00\x00" + name.encode()
            layers.append(self._gguf_layer(data, _GGUF_MEDIA_TYPES["model"]))
        for what, extra in (("projector", projector), ("adapter", adapter)):
            if extra is not None:
                layers.append(self._gguf_layer(extra, _GGUF_MEDIA_TYPES[what]))
        layers.append(
            self.add_bytes("", b"{{ .Prompt }}", media_type=_GGUF_MEDIA_TYPES["template"])
        )
        layers.append(
            self.add_bytes("", b'{"stop":["<|eot|>"]}', media_type=_GGUF_MEDIA_TYPES["params"])
        )
        layers.append(self.add_bytes("", b"MIT License", media_type=_GGUF_MEDIA_TYPES["license"]))
        config = self.add_raw_config(
            {"model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
             "model_type": "1B", "file_type": "Q4_K_M", "architecture": "amd64", "os": "linux",
             "rootfs": {"type": "layers", "diff_ids": [x.digest for x in layers]}}
        )  # fmt: skip
        write_manifest(self.root, name, build_manifest(config, layers))
        return self.lay_out(name, layout)

    def _gguf_layer(self, source: StrPath | bytes, media_type: str) -> Layer:
        if isinstance(source, bytes):
            return self.add_bytes("", source, media_type=media_type)

        def chunks() -> Iterable[bytes]:
            with open(source, "rb") as f:
                while chunk := f.read(8 << 20):
                    yield chunk

        blob = write_blob(self.root, chunks())
        return Layer(media_type, blob.digest, blob.size, "")

    def add_cloud_model(
        self,
        name: str,
        *,
        remote_host: str = "https://ollama.com:443",
        remote_model: str = "gpt-oss:120b",
        layout: LayoutName = "legacy",
    ) -> Path:
        """Write a cloud model as Ollama does: a config with ``remote_host`` and
        ``remote_model`` and no weight layers at all. Returns the manifest path."""
        config = self.add_raw_config(
            {"model_format": "", "model_family": "", "model_families": None, "model_type": "",
             "file_type": "", "renderer": "harmony", "parser": "harmony",
             "remote_host": remote_host, "remote_model": remote_model,
             "capabilities": ["completion", "tools", "thinking"], "architecture": "",
             "os": ""}
        )  # fmt: skip
        write_manifest(self.root, name, build_manifest(config, []))
        return self.lay_out(name, layout)

    def lay_out(self, name: str, layout: LayoutName, *, anchor: bool = True) -> Path:
        """Re-lay the legacy manifest of `name` out as an Ollama version writes it.

        ``legacy`` leaves it. The ``v2-*`` layouts store the manifest bytes as a blob, make
        ``manifests-v2/<host>/<namespace>/<model>/<tag>`` (public host ``ollama.com``, ``:``
        written ``%3A``) a relative symlink to it, a hard link or a copy, and keep the legacy
        file as an anchor (the manifest plus a layer pointing at the document blob) unless
        `anchor` is False, when the legacy file is removed. ``v2-dangling`` adds a
        ``manifests-v2`` symlink to a blob that does not exist and keeps the legacy file.

        Returns:
            the entry a loader resolves first: the ``manifests-v2`` path, or the legacy one
            for ``legacy`` and ``v2-dangling``.
        """
        legacy = manifest_path(self.root, name)
        if layout == "legacy":
            return legacy
        v2 = _v2_path(self.root, legacy)
        v2.parent.mkdir(parents=True, exist_ok=True)
        if layout == "v2-dangling":
            _relink(v2, "sha256:" + "0" * 64, self.root, "symlink")
            return legacy
        data = legacy.read_bytes()
        blob = write_blob(self.root, [data])
        _relink(v2, blob.digest, self.root, layout.removeprefix("v2-"))
        if anchor:
            doc = msgspec.json.decode(data)
            doc["layers"] = [*doc.get("layers", []),
                             {"mediaType": MANIFEST_MEDIA_TYPE, "digest": blob.digest,
                              "size": blob.size}]  # fmt: skip
            write_manifest(self.root, name, doc)
        else:
            legacy.unlink()
        return v2

    def add_manifest_list(
        self,
        name: str,
        children: Sequence[tuple[str, str, Path]],
        *,
        layout: LayoutName = "v2-symlink",
        anchor: int | None = None,
    ) -> Path:
        """Write an Ollama 0.40 manifest list under `name`.

        Args:
            children: ``(runner, format, manifest path)`` per child; each child manifest's
                bytes are stored as a blob and referenced by digest, as Ollama writes them.
                Write the children first under names of their own (e.g. ``m:tag-mlx``).
            layout: how the list's own entry is stored (a ``v2-*`` layout).
            anchor: index of the child whose manifest the legacy anchor clones (with layers
                for the list and that child's document), or None for no legacy file.

        Returns:
            the ``manifests-v2`` entry.
        """
        refs = []
        docs = []
        for runner, fmt, child in children:
            data = Path(child).read_bytes()
            blob = write_blob(self.root, [data])
            docs.append((data, blob))
            refs.append({"mediaType": MANIFEST_MEDIA_TYPE, "digest": blob.digest,
                         "runner": runner, "format": fmt})  # fmt: skip
        listed = msgspec.json.encode(
            {"schemaVersion": 2, "mediaType": _MANIFEST_LIST_MEDIA_TYPE, "manifests": refs}
        )
        legacy = manifest_path(self.root, name)
        if anchor is not None:
            data, child_blob = docs[anchor]
            list_blob = write_blob(self.root, [listed])
            doc = msgspec.json.decode(data)
            doc["layers"] = [*doc.get("layers", []),
                             {"mediaType": _MANIFEST_LIST_MEDIA_TYPE, "digest": list_blob.digest,
                              "size": list_blob.size},
                             {"mediaType": MANIFEST_MEDIA_TYPE, "digest": child_blob.digest,
                              "size": child_blob.size}]  # fmt: skip
            write_manifest(self.root, name, doc)
        else:
            write_manifest(self.root, name, listed)
        v2 = _v2_path(self.root, legacy)
        v2.parent.mkdir(parents=True, exist_ok=True)
        blob = write_blob(self.root, [listed])
        _relink(v2, blob.digest, self.root, layout.removeprefix("v2-"))
        if anchor is None:
            legacy.unlink()
        return v2

    def _resolve_quantize(
        self, tensors: Mapping[str, mx.array], quantize: Quantize, era: Era
    ) -> dict[str, Quantization]:
        if quantize is None:
            return {}
        if isinstance(quantize, str):
            quantize = default_policy(quantize, era=era)
        if isinstance(quantize, Mapping):
            unknown = set(quantize) - set(tensors)
            if unknown:
                raise KeyError(f"quantize names unknown tensors: {sorted(unknown)}")
            specs = dict(quantize)
        else:
            specs = {n: s for n, a in tensors.items() if (s := quantize(n, a)) is not None}
        return {n: quant_params(s, era=era) for n, s in specs.items()}

    def _e0_layers(
        self,
        order: Sequence[str],
        tensors: Mapping[str, mx.array],
        quantized: Mapping[str, tuple[mx.array, mx.array, mx.array | None]],
    ) -> list[Layer]:
        layers = []
        for n in order:
            if n not in quantized:
                layers.append(self.add_blob(n, {"data": tensors[n]}))
                continue
            wq, scales, biases = quantized[n]
            layers.append(self.add_blob(n, {"data": wq}, style="mlx"))
            layers.append(self.add_blob(n + "_scale", {"data": scales}, style="mlx"))
            if biases is not None:
                layers.append(self.add_blob(n + "_qbias", {"data": biases}, style="mlx"))
        return layers

    def _named_layers(
        self,
        order: Sequence[str],
        tensors: Mapping[str, mx.array],
        quantized: Mapping[str, tuple[mx.array, mx.array, mx.array | None]],
        params: Mapping[str, Quantization],
        pack: Mapping[str, Sequence[str]],
        metadata_style: MetadataStyle,
    ) -> list[Layer]:
        group_of: dict[str, str] = {}
        for prefix, members in pack.items():
            for m in members:
                if m not in tensors or m in group_of:
                    raise ValueError(f"pack member {m!r} is unknown or in two groups")
                group_of[m] = prefix
        layers = []
        written: set[str] = set()
        for n in order:
            group = group_of.get(n)
            if group in written:
                continue
            members = [n] if group is None else list(pack[group])
            if group is not None:
                written.add(group)
            entries: list[RawTensor] = []
            keys: dict[str, Quantization] = {}
            for m in members:
                key = _blob_key(m, m in quantized)
                if m in quantized:
                    keys[key] = params[m]
                    wq, scales, biases = quantized[m]
                    entries += [
                        tensor_from_array(key, wq),
                        tensor_from_array(key + ".scale", scales),
                    ]
                    if biases is not None:
                        entries.append(tensor_from_array(key + ".bias", biases))
                else:
                    entries.append(tensor_from_array(key, tensors[m]))
            if not keys:  # Go writes unquantized blobs, data in key order.
                entries.sort(key=lambda t: t.name)
                blob = write_tensor_blob(self.root, entries, style="go")
            else:
                style = metadata_style if group is not None else "global"
                meta = _quant_metadata(keys, style)
                blob = write_tensor_blob(self.root, entries, style="mlx", metadata=meta)
            layers.append(Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, group or n))
        return layers

    def _config_layers(
        self,
        configs: Mapping[str, object],
        tensors: Mapping[str, mx.array],
        components: bool,
        label: str,
        era: Era,
        model_type: str,
    ) -> list[Layer]:
        configs = dict(configs)
        if components:
            index = configs.get("model_index.json", {"_class_name": "SyntheticPipeline"})
            if isinstance(index, Mapping):
                te = configs.get("text_encoder/config.json")
                dtype = te.get("torch_dtype", "") if isinstance(te, Mapping) else ""
                count = sum(a.size for a in tensors.values())
                configs["model_index.json"] = _ollama_model_index(index, count, label or dtype)
            known = [c for c in IMAGEGEN_CONFIGS if c in configs]
            names = known + [c for c in configs if c not in known]
        else:
            if era == "E0" and model_type and "model_index.json" not in configs:
                group = quant_params(model_type, era="E0").group_size
                index = {"group_size": group, "quantization": label}
                configs["model_index.json"] = encode_json(index)
            names = list(configs)
        return [self.add_json(c, configs[c]) for c in names]


def _encode_go(value: Mapping[str, Any]) -> bytes:
    """Compact JSON in the given key order, as Go's encoding/json writes a struct."""
    return msgspec.json.encode(value)


def _v2_path(root: Path, legacy: Path) -> Path:
    """The ``manifests-v2`` path of a legacy manifest path: public host as ``ollama.com``,
    ``:`` in a host as ``%3A`` (ollama/ollama PR #16590, ``manifest/paths.go``)."""
    host, namespace, model, tag = legacy.parts[-4:]
    if host.casefold() in ("registry.ollama.ai", "ollama.com"):
        host = "ollama.com"
    return Path(root, "manifests-v2", host.replace(":", "%3A"), namespace, model, tag)


def _relink(entry: Path, digest: str, root: Path, how: str) -> None:
    """Point a ``manifests-v2`` entry at a blob the way Ollama's ``linkManifest`` does."""
    blob = Path(root, "blobs", digest.replace(":", "-"))
    if entry.is_symlink() or entry.exists():
        entry.unlink()
    if how == "symlink":
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    elif how == "hardlink":
        os.link(blob, entry)
    elif how == "copy":
        shutil.copyfile(blob, entry)
    else:
        raise ValueError(f"unknown manifests-v2 link kind {how!r}")


def _component_rank(name: str) -> int:
    comp = name.partition("/")[0] if "/" in name else ""
    return COMPONENTS.index(comp) if comp in COMPONENTS else len(COMPONENTS)


def _blob_key(name: str, quantized: bool) -> str:
    # E1 image-gen quirk: quantized keys keep the component prefix, unquantized ones do not.
    return name if quantized else name.partition("/")[2] or name


def _quant_metadata(keys: Mapping[str, Quantization], style: MetadataStyle) -> dict[str, str]:
    uniform = len({(p.type, p.group_size) for p in keys.values()}) == 1
    first = next(iter(keys.values()))
    global_ = {"quant_type": first.type, "group_size": str(first.group_size)}
    per_tensor: dict[str, str] = {}
    for k, p in keys.items():
        per_tensor[k + ".quant_type"] = p.type
        per_tensor[k + ".group_size"] = str(p.group_size)
    if style == "none":
        return {}
    if style == "global":
        return global_ if uniform else {}
    if style == "per_tensor":
        return per_tensor
    if style == "both":
        return {**per_tensor, **global_} if uniform else per_tensor
    return global_ if uniform else per_tensor


def _ollama_model_index(index: Mapping[str, Any], count: int, label: str) -> bytes:
    """A diffusers ``model_index.json`` as Ollama stores it (docs/format.md#model-index)."""
    out = {k: v for k, v in index.items() if k not in ("_class_name", "_diffusers_version")}
    out["architecture"] = index.get("_class_name", "")
    out["parameter_count"] = count
    out["quantization"] = label
    return encode_json(out, indent=4)


# Helpers re-exported from private modules are documented as this module's.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("asyncweights._"):
        _obj.__module__ = __name__
del _name, _obj
