"""Importing a Hugging Face or diffusers safetensors directory into a store, as Ollama does.

    scan the source (headers only) ─► one worker call per tensor: copy its bytes in chunks,
    or quantize it with MLX ─► atomic blobs ─► JSON config layers ─► config blob ─► manifest

Three source shapes are recognized (FORMAT.md §4): a diffusers pipeline (``model_index.json``
with ``text_encoder/``, ``transformer/`` and ``vae/`` folders), a sharded model
(``model.safetensors.index.json``), and a single-model folder (``config.json`` beside its
``*.safetensors``). Every blob is written to a temporary file, fsynced and renamed to its
digest, and the manifest is written last the same way, so an import killed at any point
leaves no partial blob and no manifest. Identical tensors share one content-addressed blob.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import anyio
import anyio.to_thread
import mlx.core as mx
import msgspec

from ._errors import AsyncWeightsError, DuplicateTensorError, SourceError, single_error
from ._header import TensorEntry, read_header
from ._limits import Limits
from ._model import Model
from ._progress import Progress, ProgressCallback, ProgressReporter
from ._quantize import QuantParams, quant_params, quantize_array, should_quantize
from ._store import ModelName, ModelStore
from ._writer import (
    COMPONENTS,
    CONFIG_MEDIA_TYPE,
    IMAGEGEN_CONFIGS,
    JSON_MEDIA_TYPE,
    TENSOR_MEDIA_TYPE,
    Layer,
    Tensor,
    build_config,
    build_manifest,
    encode_json,
    tensor_from_array,
    write_blob,
    write_manifest,
    write_tensor_blob,
)

__all__ = ["import_model", "write_quantized"]

ImportLayout: TypeAlias = Literal["named", "data"]
_SHARD_INDEX = "model.safetensors.index.json"
_QUANTIZE = {"q4": "int4", "int4": "int4", "q8": "int8", "int8": "int8"}
# E0 labels in model_index.json ("Q4" is affine 4-bit group 32, "Q8" group 64: §5.1).
_E0_LABELS = {"int4": "Q4", "int8": "Q8"}
_CHUNK = 8 << 20
_json = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class SourceTensor:
    """One tensor of the source: its logical name and where its bytes are."""

    name: str
    path: Path
    entry: TensorEntry
    data_start: int

    @property
    def component(self) -> str | None:
        return self.name.split("/", 1)[0] if "/" in self.name else None

    @property
    def bare(self) -> str:
        return self.name.split("/", 1)[1] if "/" in self.name else self.name

    def chunks(self) -> Iterator[bytes]:
        """The tensor's bytes, read in chunks so a big tensor never sits in memory whole."""
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            offset = self.data_start + self.entry.begin
            end = self.data_start + self.entry.end
            while offset < end:
                chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
                if not chunk:
                    raise SourceError("source file is shorter than its header says", path=self.path)
                offset += len(chunk)
                yield chunk
        finally:
            os.close(fd)


@dataclass(slots=True)
class Source:
    """A scanned source directory: tensors in manifest order and config files."""

    root: Path
    pipeline: bool
    tensors: list[SourceTensor]
    configs: list[tuple[str, Path]]

    @property
    def total_bytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


def scan_source(root: Path) -> Source:
    """Find the tensors and configs of a source directory, reading only headers (blocking).

    Raises:
        SourceError: not a directory, or no safetensors files where the layout wants them.
        HeaderError: a source file's header breaks a safetensors rule.
        DuplicateTensorError: two files define the same tensor.
    """
    if not root.is_dir():
        raise SourceError("source is not a directory", path=root)
    if (root / "model_index.json").is_file():
        files: list[tuple[str | None, Path]] = []
        for comp in COMPONENTS:
            files += [(comp, p) for p in sorted((root / comp).glob("*.safetensors"))]
        configs = [(n, root / n) for n in IMAGEGEN_CONFIGS if (root / n).is_file()]
        pipeline = True
    else:
        index = root / _SHARD_INDEX
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SourceError("shard index has no weight_map", path=index)
            shards = sorted({str(f) for f in weight_map.values()})
            files = [(None, root / f) for f in shards]
            for _, path in files:
                if not path.is_file() or path.parent != root:
                    raise SourceError("shard named by the index is missing", path=path)
        else:
            files = [(None, p) for p in sorted(root.glob("*.safetensors"))]
        configs = [(p.name, p) for p in sorted(root.glob("*.json")) if p.name != _SHARD_INDEX]
        pipeline = False
    if not files:
        raise SourceError("no *.safetensors files found", path=root)
    tensors: list[SourceTensor] = []
    seen: dict[str, Path] = {}
    for prefix, path in files:
        header = read_header(path, expected_size=None)
        for key in sorted(header.entries):
            name = f"{prefix}/{key}" if prefix else key
            if name in seen:
                raise DuplicateTensorError(
                    f"tensor defined twice, also by {str(seen[name])!r}", tensor=name, path=path
                )
            seen[name] = path
            tensors.append(SourceTensor(name, path, header.entries[key], header.data_start))
    return Source(root, pipeline, tensors, configs)


def write_quantized(
    root: Path,
    name: str,
    array: mx.array,
    params: QuantParams,
    *,
    layout: ImportLayout,
) -> list[Layer]:
    """Quantize one weight and write it as Ollama does; return its layers (blocking).

    ``named``: one MLX-written blob holding ``X``, ``X.scale`` and ``X.bias`` with the
    ``quant_type``/``group_size`` metadata; its keys keep a component prefix (FORMAT.md
    §3.3). ``data``: three E0 ``"data"`` blobs, layers ``X``, ``X_scale``, ``X_qbias``.
    """
    weight, scales, biases = quantize_array(array, params)
    if layout == "data":
        parts = [(name, weight), (name + "_scale", scales), (name + "_qbias", biases)]
        layers = []
        for layer_name, part in parts:
            if part is None:
                continue
            blob = write_tensor_blob(root, [tensor_from_array("data", part)], style="mlx")
            layers.append(Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, layer_name))
        return layers
    entries = [tensor_from_array(name, weight), tensor_from_array(name + ".scale", scales)]
    if biases is not None:
        entries.append(tensor_from_array(name + ".bias", biases))
    meta = {"quant_type": params.type, "group_size": str(params.group_size)}
    blob = write_tensor_blob(root, entries, style="mlx", metadata=meta)
    return [Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, name)]


def _import_tensor(
    root: Path, tensor: SourceTensor, params: QuantParams | None, layout: ImportLayout
) -> list[Layer]:
    """Write one source tensor's blobs (a worker-thread call: MLX arrays stay on one thread)."""
    entry = tensor.entry
    if params is not None:
        loaded = mx.load(os.fspath(tensor.path), format="safetensors")
        assert isinstance(loaded, dict)
        try:
            return write_quantized(root, tensor.name, loaded[entry.key], params, layout=layout)
        finally:
            del loaded
    # Unquantized named blobs are keyed by the bare name, the layer keeps the prefix (§3.2).
    key = "data" if layout == "data" else tensor.bare
    data = Tensor(key, entry.dtype, entry.shape, tensor.chunks())
    blob = write_tensor_blob(root, [data], style="go")
    return [Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, tensor.name)]


async def import_model(
    source_dir: str | os.PathLike[str],
    name: str,
    *,
    store: str | os.PathLike[str] | ModelStore | None = None,
    layout: ImportLayout = "named",
    quantize: str | None = None,
    on_progress: ProgressCallback | None = None,
    limits: Limits | None = None,
) -> Model:
    """Import a safetensors model directory into the store under `name`.

    Args:
        source_dir: a diffusers pipeline folder (``model_index.json``), a sharded model
            (``model.safetensors.index.json``) or a folder with ``config.json`` and
            ``*.safetensors``.
        name: the model name to write, e.g. ``"z-image:latest"``.
        store: the models root or a `ModelStore`; defaults as for `load_weights`.
        layout: ``"named"`` (blobs keyed by tensor name, E1 and later) or ``"data"``
            (one ``"data"`` tensor a blob, E0).
        quantize: ``"q4"``/``"int4"`` or ``"q8"``/``"int8"`` to quantize the weights
            Ollama's rule selects with MLX (affine); None keeps the source dtypes.
        on_progress: receives `Progress` events as tensors are written (``phase``
            ``"loading"``, then ``"done"``).
        limits: ``workers`` bounds the tensors written at once.

    Returns:
        The imported model, opened from the store.

    Raises:
        SourceError, HeaderError, DuplicateTensorError: the source is unusable.
        InvalidNameError: `name` breaks Ollama's grammar. OSError: writing the store failed.
    """
    ModelName.parse(name)
    if layout not in ("named", "data"):
        raise ValueError(f"layout must be 'named' or 'data', not {layout!r}")
    qtype = None
    if quantize is not None:
        qtype = _QUANTIZE.get(quantize.lower())
        if qtype is None:
            raise ValueError(f"quantize must be 'q4' or 'q8', not {quantize!r}")
    params = None if qtype is None else quant_params(qtype, era="E0" if layout == "data" else "E3")
    limits = limits or Limits()
    model_store = store if isinstance(store, ModelStore) else ModelStore(store)
    root = model_store.root
    started = time.monotonic()
    source = await anyio.to_thread.run_sync(scan_source, Path(source_dir))

    results: list[list[Layer]] = [[] for _ in source.tensors]
    total = source.total_bytes
    done = [0, 0]  # bytes, tensors
    reporter = ProgressReporter(on_progress, limits.progress_interval, name)

    def event(phase: Literal["loading", "done"], tensor: str | None) -> Progress:
        return Progress(
            phase, done[0], total, done[1], len(source.tensors), time.monotonic() - started,
            tensor, name,
        )  # fmt: skip

    indices = iter(range(len(source.tensors)))

    async def worker() -> None:
        for i in indices:  # shared: each worker takes the next tensor not yet taken
            t = source.tensors[i]
            p = (
                params
                if params and should_quantize(t.name, *_facts(t), params.group_size)
                else None
            )
            results[i] = await anyio.to_thread.run_sync(_import_tensor, root, t, p, layout)
            done[0] += t.entry.nbytes
            done[1] += 1
            reporter.emit(event("loading", t.name))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            reporter.emit(event("loading", None), force=True)
            try:
                async with anyio.create_task_group() as writers:
                    for _ in range(min(limits.workers, len(source.tensors))):
                        writers.start_soon(worker)
            except BaseException:
                reporter.close(None)
                raise
            layers = [layer for group in results for layer in group]
            layers += await anyio.to_thread.run_sync(_write_configs, root, source, qtype, layout)
            config = build_config(
                file_type="" if layout == "data" else (qtype or ""),
                capabilities=["image"] if source.pipeline else ["completion"],
                requires="0.14.0" if layout == "data" else "0.19.0",
            )
            blob = await anyio.to_thread.run_sync(write_blob, root, [config])
            config_layer = Layer(CONFIG_MEDIA_TYPE, blob.digest, blob.size)
            manifest = build_manifest(config_layer, layers)
            await anyio.to_thread.run_sync(write_manifest, root, name, manifest)
            reporter.close(event("done", None))
    except BaseExceptionGroup as group:
        error = single_error(group, (AsyncWeightsError, OSError))
        if error is None:
            raise
        raise error from error.__cause__
    return await model_store.open(name)


def _facts(tensor: SourceTensor) -> tuple[str, tuple[int, ...]]:
    return tensor.entry.dtype, tensor.entry.shape


def _write_configs(
    root: Path, source: Source, qtype: str | None, layout: ImportLayout
) -> list[Layer]:
    """Write the JSON config layers (blocking); model_index.json rewritten as Ollama does."""
    layers = []
    for name, path in source.configs:
        data = path.read_bytes()
        if source.pipeline and name == "model_index.json":
            data = _pipeline_index(source, _read_json(path), qtype, layout)
        blob = write_blob(root, [data])
        layers.append(Layer(JSON_MEDIA_TYPE, blob.digest, blob.size, name))
    if not source.pipeline and qtype is not None and layout == "data":
        # E0 LLM imports added a synthetic model_index.json when quantizing (FORMAT.md §4.3).
        group = quant_params(qtype, era="E0").group_size
        data = encode_json({"group_size": group, "quantization": _E0_LABELS[qtype]})
        blob = write_blob(root, [data])
        layers.append(Layer(JSON_MEDIA_TYPE, blob.digest, blob.size, "model_index.json"))
    return layers


def _pipeline_index(
    source: Source, index: dict[str, Any], qtype: str | None, layout: ImportLayout
) -> bytes:
    """A diffusers model_index.json as Ollama stores it (FORMAT.md §4.3)."""
    out = {k: v for k, v in index.items() if k not in ("_class_name", "_diffusers_version")}
    out["architecture"] = index.get("_class_name", "")
    out["parameter_count"] = sum(math.prod(t.entry.shape) for t in source.tensors)
    if qtype is not None:
        out["quantization"] = _E0_LABELS[qtype] if layout == "data" else qtype.upper()
    else:
        te = source.root / "text_encoder" / "config.json"
        dtype = _read_json(te).get("torch_dtype", "") if te.is_file() else ""
        out["quantization"] = dtype if isinstance(dtype, str) else ""
    return encode_json(out, indent=4)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = _json.decode(path.read_bytes())
    except msgspec.DecodeError as exc:
        raise SourceError(f"invalid JSON: {exc}", path=path) from None
    if not isinstance(value, dict):
        raise SourceError("JSON file is not an object", path=path)
    return value
