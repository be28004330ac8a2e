"""What an import reads: the source layouts people download, recognized and selected.

Each layout is selected the way the tool that wrote it loads it with its defaults, reading only
safetensors headers and JSON files (blocking; callers run it in a worker thread):

* **diffusers pipeline**: ``model_index.json``. Every component it declares (``[library,
  class]``, not ``[null, null]``) must have its folder; a component folder that holds weights
  is imported from the file its library loads: transformers ``model.safetensors`` or
  ``model.safetensors.index.json``, diffusers ``diffusion_pytorch_model.safetensors`` or
  ``diffusion_pytorch_model.safetensors.index.json``; the ``.<variant>`` names only when a
  variant is asked for (diffusers ``utils/hub_utils.py`` ``_add_variant`` and
  ``_get_model_file``; transformers ``SAFE_WEIGHTS_NAME``/``SAFE_WEIGHTS_INDEX_NAME``).
  A component whose weights cannot be imported (pickle ``.bin`` only, ONNX, a missing shard)
  fails the import and is named.
* **Hugging Face model**: ``model.safetensors.index.json`` (its ``weight_map`` names the
  shards), else ``model.safetensors`` (the same two with ``diffusion_pytorch_model`` for a
  lone diffusers model), else every ``*.safetensors`` in the folder (what Ollama's importer
  globs). The config is checked for a pre-quantized format before any weight file is read.
* **mlx-lm quantized model**: either of the above with a ``config.json`` ``quantization``
  block (``group_size``, ``bits``, optional ``mode``, per-module overrides keyed by module
  path; mlx-lm ``utils.py`` ``load_model``: a module is quantized when ``<module>.scales``
  exists, with its override's parameters, else the block's). Each module's ``.weight``
  (``U32``), ``.scales`` and ``.biases`` become one packed source weight.
* **Other pre-quantized checkpoints** (a ``quantization_config`` in ``config.json``, a ModelOpt
  ``hf_quant_config.json``, or tensors that only such checkpoints have: FP8 ``F8_E4M3``
  weights, ``weight_scale_inv``, ``weight_packed``, ``_blocks``/``_scales``, ``qweight``)
  are refused with an error that names the format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import msgspec

from ._errors import AsyncWeightsError, BlobMissingError, DuplicateTensorError, SourceError
from ._header import TensorEntry, read_header
from ._quant import Quantization
from ._writer import IMAGEGEN_CONFIGS

__all__ = ["PackedSource", "Source", "SourceTensor", "scan_source"]

SourceLayout: TypeAlias = Literal["hf", "hf-sharded", "mlx-lm", "diffusers"]

_CHUNK = 8 << 20
_HF_INDEX = "model.safetensors.index.json"
#: Ollama's component order for image-generation models; other components follow, sorted.
_OLLAMA_COMPONENTS = ("text_encoder", "transformer", "vae")
#: Weight file families by the library that writes them (transformers, diffusers).
_FAMILIES = {"transformers": ("model",), "diffusers": ("diffusion_pytorch_model",)}
_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".onnx", ".gguf", ".h5",
)  # fmt: skip
# MLX modes and bits that have a type in Ollama's blob grammar (quant_type metadata).
_MLX_TYPES = {
    ("affine", 4): "int4",
    ("affine", 8): "int8",
    ("nvfp4", 4): "nvfp4",
    ("mxfp4", 4): "mxfp4",
    ("mxfp8", 8): "mxfp8",
}
# nn.quantize's defaults when an override leaves a value out (mlx ``nn/layers/quantized.py``).
_MLX_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
_json = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class SourceTensor:
    """One source tensor: its logical name, the component it belongs to, and its bytes.

    ``name`` is ``<component>/<key>`` for a pipeline component and ``key`` otherwise.
    """

    name: str
    key: str
    component: str | None
    path: Path
    entry: TensorEntry
    data_start: int

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    def chunks(self, on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:
        """The tensor's bytes in chunks, so a big tensor never sits in memory whole.

        `on_bytes` hears each chunk's length once the consumer asks for the next one (that
        is, once it has hashed and written it).

        Raises:
            SourceError: the file cannot be read, or is shorter than its header says.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _read_error(self, exc) from exc
        try:
            offset = self.data_start + self.entry.begin
            end = self.data_start + self.entry.end
            while offset < end:
                try:
                    chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
                except OSError as exc:
                    raise _read_error(self, exc) from exc
                if not chunk:
                    raise SourceError(
                        "source file is shorter than its header says",
                        tensor=self.name,
                        path=self.path,
                    )
                offset += len(chunk)
                yield chunk
                if on_bytes is not None:
                    on_bytes(len(chunk))
        finally:
            os.close(fd)


def _read_error(tensor: SourceTensor, exc: OSError) -> SourceError:
    return SourceError(
        f"cannot read the source file: {exc.strerror}",
        tensor=tensor.name,
        path=tensor.path,
        errno=exc.errno,
    )


@dataclass(frozen=True, slots=True)
class PackedSource:
    """A weight that the source already quantized: packed ``U32`` weight, scales, biases.

    ``name`` is the weight's logical name (``<module>.weight``); the three tensors are stored
    as ``name``, ``name.scale`` and ``name.bias`` in one blob with ``quantization``'s facts.
    """

    name: str
    component: str | None
    weight: SourceTensor
    scales: SourceTensor
    biases: SourceTensor | None
    quantization: Quantization

    @property
    def parts(self) -> list[SourceTensor]:
        return [self.weight, self.scales] + ([self.biases] if self.biases else [])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts)


SourceItem: TypeAlias = SourceTensor | PackedSource


@dataclass(slots=True)
class Source:
    """A scanned source directory: what to write, in manifest order, and its config files.

    Attributes:
        layout: which layout was recognized (``hf``, ``hf-sharded``, ``mlx-lm``, ``diffusers``).
        pipeline: True for a diffusers pipeline (tensor names carry a component).
        items: plain and packed tensors in manifest order.
        configs: (layer name, file) of the JSON files to store.
        quantization: the model-level quantization of a pre-quantized source, else None.
        files: the weight files read.
        components: a pipeline's components that hold weights, in manifest order.
    """

    root: Path
    layout: SourceLayout
    pipeline: bool
    items: list[SourceItem]
    configs: list[tuple[str, Path]]
    quantization: Quantization | None = None
    files: list[Path] = field(default_factory=list)
    components: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    @property
    def tensors(self) -> list[SourceTensor]:
        """Every source tensor, packed ones' parts included."""
        out: list[SourceTensor] = []
        for item in self.items:
            out += item.parts if isinstance(item, PackedSource) else [item]
        return out


def scan_source(root: Path, *, variant: str | None = None) -> Source:
    """Recognize the layout of `root` and list what an import writes (blocking).

    Args:
        root: the source directory.
        variant: a Hugging Face weight variant (``"fp16"``): load ``model.fp16.safetensors``,
            ``diffusion_pytorch_model.fp16.safetensors`` and their ``index.fp16.json``
            instead of the plain names, as ``from_pretrained(variant=...)`` does.

    Raises:
        SourceError: not a directory, no weights where the layout wants them, a declared
            component that cannot be imported, or a pre-quantized format that is refused.
        HeaderError: a source file's header breaks a safetensors rule.
        DuplicateTensorError: two files define the same tensor.
    """
    if not root.is_dir():
        raise SourceError("source is not a directory", path=root)
    if (root / "model_index.json").is_file():
        return _scan_pipeline(root, variant)
    return _scan_model(root, variant)


# ------------------------------------------------------------------------------ plain models


def _scan_model(root: Path, variant: str | None) -> Source:
    config_path = root / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    mlx = "quantization" in config
    if not mlx:
        _refuse_by_config(root, config, config_path)  # before any weight file is read
    files, layout = _model_files(root, variant)
    tensors = _read_tensors([(None, p) for p in files])
    items: list[SourceItem] = list(tensors.values())
    quantization = None
    if mlx:
        items, quantization = _pack_mlx(tensors, config["quantization"], config_path)
        layout = "mlx-lm"
    else:
        _refuse_by_tensors(tensors)
    index_names = {p.name for p in files} | {
        _variant(f"{family}.safetensors.index.json", variant)
        for family in ("model", "diffusion_pytorch_model")
    }
    configs = [(p.name, p) for p in sorted(root.glob("*.json")) if p.name not in index_names]
    return Source(root, layout, False, items, configs, quantization, files)


def _model_files(root: Path, variant: str | None) -> tuple[list[Path], SourceLayout]:
    """The weight files ``from_pretrained`` (transformers, or diffusers for a single
    ``diffusion_pytorch_model`` folder) or mlx-lm reads from `root`."""
    for family in ("model", "diffusion_pytorch_model"):
        index = root / _variant(f"{family}.safetensors.index.json", variant)
        if index.is_file():
            return _index_shards(index), "hf-sharded"
        single = root / _variant(f"{family}.safetensors", variant)
        if single.is_file():
            return [single], "hf"
    if variant is not None:
        raise SourceError(
            f"no model.{variant}.safetensors or its index for variant {variant!r}", path=root
        )
    files = sorted(p for p in root.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        _no_safetensors(root, "no *.safetensors files found")
    return files, "hf"


def _index_shards(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError("shard index has no weight_map", path=index)
    shards = []
    for name in sorted({str(f) for f in weight_map.values()}):
        path = index.parent / name
        if path.parent != index.parent or not path.is_file():
            raise SourceError(f"shard {name!r} named by the index is missing", path=index)
        shards.append(path)
    return shards


def _variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` → ``model.fp16.safetensors`` (diffusers ``_add_variant``)."""
    if variant is None:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def _no_safetensors(folder: Path, reason: str, variant: str | None = None) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    loadable = [n for n in names if n.endswith(".safetensors")]
    if loadable:
        when = "without a variant" if variant is None else f"for variant {variant!r}"
        raise SourceError(
            f"{reason}; {loadable[0]!r} is not a file its library loads {when}",
            path=folder / loadable[0],
        )
    if names:
        raise SourceError(
            f"{reason}; {names[0]!r} is not safetensors (pickle, ONNX and GGUF files are "
            "not imported)",
            path=folder / names[0],
        )
    raise SourceError(reason, path=folder)


# ------------------------------------------------------------------------------ pipelines


def _scan_pipeline(root: Path, variant: str | None) -> Source:
    index_path = root / "model_index.json"
    index = _read_json(index_path)
    declared: dict[str, str] = {}
    for comp, value in index.items():
        if comp.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, cls = value
        if library is None and cls is None:
            continue  # an optional component left out (e.g. safety_checker)
        if not isinstance(library, str) or not isinstance(cls, str):
            raise SourceError(f"component {comp!r} is not [library, class]", path=index_path)
        folder = root / comp
        if "/" in comp or comp in ("", ".", "..") or not folder.is_dir():
            raise SourceError(
                f"component {comp!r} declared in model_index.json has no folder", path=folder
            )
        declared[comp] = library
    order = [c for c in _OLLAMA_COMPONENTS if c in declared]
    order += sorted(c for c in declared if c not in _OLLAMA_COMPONENTS)
    files: list[tuple[str | None, Path]] = []
    components: list[str] = []
    configs: list[tuple[str, Path]] = [("model_index.json", index_path)]
    for comp in order:
        folder = root / comp
        weights, index_file = _component_files(folder, declared[comp], variant)
        if weights:
            components.append(comp)
            files += [(comp, p) for p in weights]
        configs += [
            (f"{comp}/{p.name}", p)
            for p in sorted(folder.glob("*.json"))
            if p.name != index_file and not p.name.endswith(".index.json")
        ]
    if not files:
        raise SourceError("no component of the pipeline holds safetensors weights", path=root)
    for comp in components:
        config_path = root / comp / "config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if "quantization" in config:
            raise SourceError(
                f"component {comp!r} is MLX-quantized (config.json 'quantization'); "
                "pre-quantized pipeline components are not imported",
                path=config_path,
            )
        _refuse_by_config(root / comp, config, config_path)
    tensors = _read_tensors(files)
    _refuse_by_tensors(tensors)
    return Source(
        root, "diffusers", True, list(tensors.values()), _config_order(configs),
        None, [p for _, p in files], components,
    )  # fmt: skip


def _component_files(
    folder: Path, library: str, variant: str | None
) -> tuple[list[Path], str | None]:
    """The weight files the component's library loads, and the index file's name, if any.

    An empty list means the folder holds no weights at all (a tokenizer or scheduler).
    """
    families = _FAMILIES.get(library, _FAMILIES["transformers"] + _FAMILIES["diffusers"])
    found: list[tuple[list[Path], str | None]] = []
    for family in families:
        index = folder / _variant(f"{family}.safetensors.index.json", variant)
        single = folder / _variant(f"{family}.safetensors", variant)
        if index.is_file():
            found.append((_index_shards(index), index.name))
        elif single.is_file():
            found.append(([single], None))
    if len(found) > 1:
        raise SourceError(
            f"component {folder.name!r} has both transformers and diffusers weight files",
            path=folder,
        )
    if found:
        return found[0]
    if any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir()):
        names = " or ".join(_variant(f"{f}.safetensors", variant) for f in families)
        reason = f"component {folder.name!r} has no {names} (nor its index)"
        _no_safetensors(folder, reason, variant)
    return [], None


def _config_order(configs: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Ollama's config order for the files it knows, then the rest by name.

    Ollama's list and order: ``x/create/imagegen.go@6ddd8862c``.
    """
    rank = {name: i for i, name in enumerate(IMAGEGEN_CONFIGS)}
    return sorted(configs, key=lambda c: (rank.get(c[0], len(rank)), c[0]))


# ------------------------------------------------------------------------------ headers


def _read_tensors(files: list[tuple[str | None, Path]]) -> dict[str, SourceTensor]:
    tensors: dict[str, SourceTensor] = {}
    for comp, path in files:
        try:
            header = read_header(path, expected_size=None)
        except BlobMissingError as exc:
            raise SourceError("source file is missing", path=path, errno=exc.errno) from None
        except AsyncWeightsError as exc:
            exc.add_context(path=path)
            raise
        except OSError as exc:
            raise SourceError(
                f"cannot read the source file: {exc.strerror}", path=path, errno=exc.errno
            ) from exc
        for key in sorted(header.entries):
            name = f"{comp}/{key}" if comp else key
            if name in tensors:
                raise DuplicateTensorError(
                    f"tensor defined twice, also by {str(tensors[name].path)!r}",
                    tensor=name,
                    path=path,
                )
            entry = header.entries[key]
            tensors[name] = SourceTensor(name, key, comp, path, entry, header.data_start)
    return tensors


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = _json.decode(path.read_bytes())
    except OSError as exc:
        raise SourceError(f"cannot read: {exc.strerror}", path=path, errno=exc.errno) from exc
    except msgspec.DecodeError as exc:
        raise SourceError(f"not valid JSON: {exc}", path=path) from None
    if not isinstance(data, dict):
        raise SourceError("not a JSON object", path=path)
    return data


# ------------------------------------------------------------------------------ quantized


def _pack_mlx(
    tensors: dict[str, SourceTensor], block: object, config: Path
) -> tuple[list[SourceItem], Quantization | None]:
    """Group an mlx-lm model's ``.weight``/``.scales``/``.biases`` into packed weights.

    Raises:
        SourceError: a malformed block, a module whose shapes do not match its parameters,
            or bits/modes that Ollama's grammar has no type for (3-, 5-, 6-bit affine …).
    """
    if not isinstance(block, dict):
        raise SourceError("config.json 'quantization' is not an object", path=config)
    mode = block.get("mode", "affine")
    group, bits = block.get("group_size"), block.get("bits")
    if type(group) is not int or type(bits) is not int or not isinstance(mode, str):
        raise SourceError(
            "config.json 'quantization' needs integer 'group_size' and 'bits' (mlx-lm)",
            path=config,
        )
    model_type = _MLX_TYPES.get((mode, bits))
    model_level = None if model_type is None else Quantization.of(model_type, group)
    packed: dict[str, PackedSource] = {}
    consumed: set[str] = set()
    for name in tensors:
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        override = block.get(module)
        if override is False:
            raise SourceError(
                f"module {module!r} has scales but config.json says it is not quantized",
                tensor=name,
                path=config,
            )
        q = _module_quantization(module, override, mode, group, bits, config)
        weight = tensors.get(module + ".weight")
        if weight is None:
            raise SourceError("scales without a packed weight", tensor=name, path=config)
        scales = tensors[name]
        biases = tensors.get(module + ".biases")
        if q.mode != "affine":
            biases = None  # an FP mode has none; a stray `.biases` stays a plain tensor
        _check_packed(weight, scales, biases, q)
        packed[weight.name] = PackedSource(weight.name, None, weight, scales, biases, q)
        consumed.update(t.name for t in packed[weight.name].parts)
    items: list[SourceItem] = []
    for name, tensor in tensors.items():
        if name in packed:
            items.append(packed[name])
        elif name not in consumed:
            items.append(tensor)
    return items, model_level


def _module_quantization(
    module: str, override: object, mode: str, group: int, bits: int, config: Path
) -> Quantization:
    if isinstance(override, dict):
        # nn.quantize passes an override dict to to_quantized as is: missing keys take
        # that mode's defaults, not the block's (mlx nn.quantize, QuantizedLinear).
        mode = override.get("mode", "affine")
        if mode not in _MLX_DEFAULTS:
            raise SourceError(f"unknown MLX quantization mode {mode!r}", path=config)
        d_group, d_bits = _MLX_DEFAULTS[mode]
        group = override.get("group_size") or d_group
        bits = override.get("bits") or d_bits
    qtype = _MLX_TYPES.get((mode, bits)) if type(bits) is int and type(group) is int else None
    if qtype is None:
        raise SourceError(
            f"mlx-lm {mode} {bits}-bit quantization (module {module!r}) has no type in "
            "Ollama's blob grammar (int4, int8, nvfp4, mxfp4, mxfp8); not imported",
            path=config,
        )
    assert type(group) is int
    return Quantization.of(qtype, group)


def _check_packed(
    weight: SourceTensor, scales: SourceTensor, biases: SourceTensor | None, q: Quantization
) -> None:
    w, s = weight.entry.shape, scales.entry.shape
    problem = None
    if weight.entry.dtype != "U32":
        problem = f"packed weight is {weight.entry.dtype}, not U32"
    elif not w or len(w) != len(s) or w[:-1] != s[:-1]:
        problem = f"scales {list(s)} do not match the packed weight {list(w)}"
    elif w[-1] * (32 // q.bits) != s[-1] * q.group_size:
        problem = f"shapes {list(w)}/{list(s)} do not fit {q.type} with group {q.group_size}"
    elif q.mode == "affine" and (biases is None or biases.entry.shape != s):
        problem = "affine quantization needs biases shaped like the scales"
    elif q.mode != "affine" and scales.entry.dtype != "U8":
        problem = f"{q.mode} scales must be U8, not {scales.entry.dtype}"
    if problem is not None:
        raise SourceError(problem, tensor=weight.name, path=weight.path)


def _refuse_by_config(folder: Path, config: dict[str, Any], config_path: Path) -> None:
    """Raise SourceError naming the format of a checkpoint its config calls pre-quantized."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        raise SourceError(
            f"pre-quantized {_format_name(qc)} checkpoint (config.json quantization_config) "
            "is not imported: import the unquantized model, with --quantize if wanted",
            path=config_path,
        )
    modelopt = folder / "hf_quant_config.json"
    if modelopt.is_file():
        algo = _read_json(modelopt).get("quantization", {})
        algo = algo.get("quant_algo") if isinstance(algo, dict) else None
        raise SourceError(
            f"pre-quantized NVIDIA ModelOpt {algo or 'unknown'} checkpoint is not imported",
            path=modelopt,
        )


def _refuse_by_tensors(tensors: dict[str, SourceTensor]) -> None:
    """Raise SourceError naming the format of tensors only pre-quantized checkpoints hold."""
    for name, t in tensors.items():
        fmt = _format_of_tensor(name, t, tensors)
        if fmt is not None:
            raise SourceError(
                f"tensor of a pre-quantized {fmt} checkpoint; not imported",
                tensor=name,
                path=t.path,
            )


def _format_name(qc: dict[str, Any]) -> str:
    method = str(qc.get("quant_method", "unknown"))
    if method == "compressed-tensors":
        fmt = qc.get("format")
        groups = qc.get("config_groups")
        if isinstance(groups, dict):
            for group in groups.values():
                w = group.get("weights") if isinstance(group, dict) else None
                if isinstance(w, dict):
                    kind = "FP" if w.get("type") == "float" else "INT"
                    bits = w.get("num_bits")
                    name = "NVFP4" if (kind, bits) == ("FP", 4) else f"{kind}{bits}"
                    return f"{name} (compressed-tensors{', ' + str(fmt) if fmt else ''})"
        return f"compressed-tensors ({fmt or 'unknown format'})"
    names = {
        "fp8": "FP8 (block-scaled, weight_scale_inv)",
        "mxfp4": "MXFP4 (blocks and scales)",
        "modelopt": f"NVIDIA ModelOpt {qc.get('quant_algo', '')}".strip(),
        "gptq": "GPTQ",
        "awq": "AWQ",
        "bitsandbytes": "bitsandbytes",
    }
    return names.get(method, repr(method))


def _format_of_tensor(name: str, t: SourceTensor, tensors: dict[str, SourceTensor]) -> str | None:
    dtype = t.entry.dtype
    if name.endswith("weight_scale_inv") or dtype == "F8_E4M3":
        return "FP8"
    if name.endswith((".weight_packed", ".weight_global_scale", ".weight_scale_2")):
        return "NVFP4"
    if name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in tensors:
        return "MXFP4"
    if name.endswith((".qweight", ".qzeros")):
        return "GPTQ/AWQ"
    if name.endswith(".scales"):
        stem = name[: -len(".scales")]
        weight = tensors.get(stem + ".weight")
        if weight is not None and weight.entry.dtype == "U32":
            return "MLX (config.json has no 'quantization' block)"
    return None
