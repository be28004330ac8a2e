"""Importing a downloaded model folder into a store, as Ollama does, all or nothing.

    recognize the source (`_source`: headers and JSON only) ─► one worker call per tensor:
    copy its bytes in chunks, repack a pre-quantized weight, or quantize with MLX ─► atomic
    blobs ─► JSON config layers ─► config blob ─► manifest (the commit point)

Every blob is written to a locked temporary file, fsynced and renamed to its digest, and the
manifest is written last the same way. If anything fails before the manifest is in place, the
blobs this import created that no manifest references are removed again, as are the folders
it created, so the store is left as it was. Temporary files of imports killed earlier are
removed by the next import once they are provably dead (`_writer.remove_stale_temps`).
Identical tensors share one content-addressed blob.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal, TypeAlias

import anyio
import anyio.to_thread
import mlx.core as mx
import msgspec

from ._errors import (
    AsyncWeightsError,
    ManifestError,
    ModelExistsError,
    ModelNotFoundError,
    SourceError,
    StoreWriteError,
    single_error,
)
from ._files import read_file
from ._limits import Limits
from ._manifest import CONFIG_MEDIA_TYPE, JSON_MEDIA_TYPE, TENSOR_MEDIA_TYPE, Layer, build_manifest
from ._names import ModelName
from ._progress import Progress, ProgressCallback, ProgressReporter
from ._quant import Quantization, quant_params, quantize_array, should_quantize
from ._source import PackedSource, Source, SourceTensor, scan_source
from ._store import Model, ModelStore
from ._writer import (
    RawTensor,
    build_config,
    encode_json,
    manifest_path,
    remove_stale_temps,
    tensor_from_array,
    write_blob,
    write_manifest,
    write_tensor_blob,
)

__all__ = ["import_model", "write_quantized"]

ImportLayout: TypeAlias = Literal["named", "data"]
_QUANTIZE = {"q4": "int4", "int4": "int4", "q8": "int8", "int8": "int8"}
# E0 labels in model_index.json: "Q4" is affine 4-bit group 32, "Q8" group 64 (ollama
# x/create/client/quantize.go@6ddd8862c).
_E0_LABELS = {"int4": "Q4", "int8": "Q8"}
_DIGEST = re.compile(rb"sha256:[0-9a-f]{64}")
_CAP = 64 << 20  # no manifest is this large; a link to a weight blob is not read whole
_json = msgspec.json.Decoder()


class _Tally:
    """Bytes and tensors done, shared by the worker threads and the progress ticker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.tensors = 0
        self.last: str | None = None

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def finish(self, name: str, nbytes_left: int) -> None:
        with self._lock:
            self.bytes += nbytes_left
            self.tensors += 1
            self.last = name


def write_quantized(
    root: Path,
    name: str,
    array: mx.array,
    params: Quantization,
    *,
    layout: ImportLayout,
    created: dict[str, int] | None = None,
) -> list[Layer]:
    """Quantize one weight and write it as Ollama does; return its layers (blocking).

    ``named``: one MLX-written blob holding ``X``, ``X.scale`` and ``X.bias`` with the
    ``quant_type``/``group_size`` metadata; its keys keep a component prefix (ollama
    ``x/create/client/quantize.go@a0407d07f``). ``data``: three E0 ``"data"`` blobs,
    layers ``X``, ``X_scale``, ``X_qbias``.
    """
    weight, scales, biases = quantize_array(array, params)
    if layout == "data":
        parts = [(name, weight), (name + "_scale", scales), (name + "_qbias", biases)]
        layers = []
        for layer_name, part in parts:
            if part is None:
                continue
            blob = write_tensor_blob(
                root, [tensor_from_array("data", part)], style="mlx", created=created
            )
            layers.append(Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, layer_name))
        return layers
    entries = [tensor_from_array(name, weight), tensor_from_array(name + ".scale", scales)]
    if biases is not None:
        entries.append(tensor_from_array(name + ".bias", biases))
    meta = {"quant_type": params.type, "group_size": str(params.group_size)}
    blob = write_tensor_blob(root, entries, style="mlx", metadata=meta, created=created)
    return [Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, name)]


def _import_item(
    root: Path,
    item: SourceTensor | PackedSource,
    params: Quantization | None,
    layout: ImportLayout,
    pipeline: bool,
    created: dict[str, int],
    tally: _Tally,
    model_quantization: Quantization | None = None,
) -> list[Layer]:
    """Write one source tensor's blobs (a worker-thread call: MLX arrays stay on one thread)."""
    if isinstance(item, PackedSource):
        # Repacked as Ollama's prequantized import does (ollama x/create/prequant.go@fb3076099):
        # X, X.scale and X.bias in one Go-written blob, the source's bytes unchanged. A module
        # quantized like the model says gets blob-wide keys; one that differs gets per-tensor
        # keys (x/create/quantize.go@fb3076099), so a reader never takes the model's label.
        q = item.quantization
        names = [item.name, item.name + ".scale", item.name + ".bias"]
        parts = [
            RawTensor(key, t.entry.dtype, t.entry.shape, t.chunks(tally.add_bytes))
            for key, t in zip(names, item.parts, strict=False)
        ]
        prefix = "" if q == model_quantization else item.name + "."
        meta = {prefix + "quant_type": q.type, prefix + "group_size": str(q.group_size)}
        blob = write_tensor_blob(root, parts, style="go", metadata=meta, created=created)
        tally.finish(item.name, 0)
        return [Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, item.name)]
    tensor = item
    entry = tensor.entry
    if params is not None:
        loaded = mx.load(os.fspath(tensor.path), format="safetensors")
        assert isinstance(loaded, dict)
        try:
            layers = write_quantized(
                root, tensor.name, loaded[tensor.key], params, layout=layout, created=created
            )
        finally:
            del loaded
        tally.finish(tensor.name, entry.nbytes)
        return layers
    if layout == "data":
        key = "data"
    elif pipeline and not tensor.key.startswith(f"{tensor.component}/"):
        # Ollama keys an unquantized image-gen blob by the bare name (x/create/imagegen.go)
        key = tensor.key
    else:
        key = tensor.name  # the reader names it exactly this, "/" and all (docs/format.md)
    data = RawTensor(key, entry.dtype, entry.shape, tensor.chunks(tally.add_bytes))
    blob = write_tensor_blob(root, [data], style="go", created=created)
    tally.finish(tensor.name, 0)
    return [Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, tensor.name)]


async def import_model(
    source_dir: str | os.PathLike[str],
    name: str,
    *,
    store: str | os.PathLike[str] | ModelStore | None = None,
    layout: ImportLayout = "named",
    quantize: str | None = None,
    variant: str | None = None,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
    limits: Limits | None = None,
) -> Model:
    """Import a downloaded safetensors model folder into the store under `name`.

    A model already in the store under `name` (any layout, matched as loading matches it) is
    never replaced unless `force` is true; the refusal comes before anything is written.

    Source layouts recognized (each selected as the tool that wrote it loads it by default):
    a Hugging Face folder (``model.safetensors``, or any ``*.safetensors``), a sharded one
    (``model.safetensors.index.json``), an mlx-lm quantized model (``config.json`` with a
    ``quantization`` block: its packed weights are stored as they are, in Ollama's quantized
    blob grammar), and a diffusers pipeline (``model_index.json``; every declared component
    that holds weights, each from its own file or shard index). Other pre-quantized
    checkpoints (FP8, NVFP4, MXFP4, GPTQ, AWQ …) are refused with an error naming the format.

    Args:
        source_dir: the folder to import.
        name: the model name to write, e.g. ``"z-image:latest"``.
        store: the models root or a `ModelStore`; defaults as for `load_weights`.
        layout: ``"named"`` (blobs keyed by tensor name, E1 and later) or ``"data"``
            (one ``"data"`` tensor a blob, E0; not for pre-quantized sources).
        quantize: ``"q4"``/``"int4"`` or ``"q8"``/``"int8"`` to quantize the weights
            Ollama's rule selects with MLX (affine); None keeps the source as it is.
        variant: a Hugging Face weight variant such as ``"fp16"``
            (``model.fp16.safetensors``), as ``from_pretrained(variant=...)`` loads.
        force: replace a model of the same name (its ``manifests-v2`` entry is removed, so
            the new manifest is the one that resolves).
        on_progress: receives `Progress` events: ``"planning"`` while the source is read,
            ``"writing"`` as source bytes are hashed and written (``completed_bytes`` of
            ``total_bytes``, the source tensors' sizes), then ``"done"``.
        limits: ``workers`` bounds the tensors written at once; ``progress_interval``.

    Returns:
        The imported model, opened from the store.

    Raises:
        SourceError: the source is missing, unreadable (``errno`` set) or refused.
        HeaderError, DuplicateTensorError: a source file is malformed.
        StoreWriteError: writing the store failed (ENOSPC, EIO, EACCES …; an `OSError`
            with ``errno``, naming the model, store and file).
        InvalidNameError: `name` breaks Ollama's grammar.
        ModelExistsError: `name` is in the store already and `force` is false.
        ValueError: a bad `layout` or `quantize` value.

    On any error (and on cancellation) every blob this import created that no manifest
    references is removed, and the store is as it was before.
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
    existing = await anyio.to_thread.run_sync(_existing, model_store, name)
    if existing is not None and not force:
        raise ModelExistsError(
            f"a model of that name is already in store {str(root)!r}; pass force=True "
            "(CLI: --force) to replace it",
            model=name,
            path=existing,
        )
    started = time.monotonic()
    reporter = ProgressReporter(on_progress, limits.progress_interval, name)
    tally = _Tally()
    created: dict[str, int] = {}  # digest -> st_mtime_ns when this import made it
    new_dirs = await anyio.to_thread.run_sync(_missing_dirs, root, name)
    total = [0, 0]  # bytes, tensors

    def event(phase: Literal["planning", "writing", "done"]) -> Progress:
        return Progress(
            phase, tally.bytes, total[0], tally.tensors, total[1], time.monotonic() - started,
            tally.last, name,
        )  # fmt: skip

    async def ticker() -> None:
        # Bytes move inside worker threads; this reads their tally between tensors too.
        while True:
            await anyio.sleep(max(limits.progress_interval, 0.01))
            reporter.emit(event("writing"))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            reporter.emit(event("planning"), force=True)
            try:
                source = await anyio.to_thread.run_sync(_scan, Path(source_dir), variant)
                _check_options(source, qtype, layout)
                total[:] = [source.total_bytes, len(source.items)]
                await anyio.to_thread.run_sync(_sweep, root, name)
                async with anyio.create_task_group() as inner:
                    if on_progress is not None:
                        inner.start_soon(ticker)
                    layers = await _write_items(
                        root, source, params, layout, created, tally, limits, reporter, event
                    )
                    layers += await anyio.to_thread.run_sync(
                        _write_configs, root, source, qtype, layout, created
                    )
                    file_type = source.quantization.type if source.quantization else ""
                    config = build_config(
                        file_type="" if layout == "data" else (qtype or file_type),
                        capabilities=["image"] if source.pipeline else ["completion"],
                        requires="0.14.0" if layout == "data" else "0.19.0",
                    )
                    blob = await anyio.to_thread.run_sync(_write_bytes, root, config, created)
                    config_layer = Layer(CONFIG_MEDIA_TYPE, blob.digest, blob.size)
                    manifest = build_manifest(config_layer, layers)
                    await anyio.to_thread.run_sync(write_manifest, root, name, manifest)
                    if existing is not None:
                        await anyio.to_thread.run_sync(_drop_v2_entries, model_store, name)
                    inner.cancel_scope.cancel()  # the ticker
            except BaseException:
                reporter.close(None)
                raise
            reporter.close(event("done"))
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_roll_back, root, created, new_dirs)
        typed = _typed(exc, name, root)
        if typed is exc:
            raise
        raise typed from typed.__cause__
    return await model_store.open(name)


def _existing(store: ModelStore, name: str) -> Path | None:
    """The entry a model of this name resolves to, if the store has one (even unreadable)."""
    try:
        return store.resolve(name)
    except ModelNotFoundError:
        return None
    except ManifestError as exc:
        return exc.path or store.manifest_path(name)


def _drop_v2_entries(store: ModelStore, name: str) -> None:
    """Remove the ``manifests-v2`` entries of `name`: the manifest just written replaces them."""
    from ._layout import find_entries

    for path in find_entries(store.root, "manifests-v2", ModelName.parse(name).parts, name):
        path.unlink(missing_ok=True)


async def _write_items(
    root: Path,
    source: Source,
    params: Quantization | None,
    layout: ImportLayout,
    created: dict[str, int],
    tally: _Tally,
    limits: Limits,
    reporter: ProgressReporter,
    event: Any,
) -> list[Layer]:
    results: list[list[Layer]] = [[] for _ in source.items]
    indices = iter(range(len(source.items)))

    async def worker() -> None:
        for i in indices:  # shared: each worker takes the next tensor not yet taken
            item = source.items[i]
            p = None
            if params is not None and isinstance(item, SourceTensor):
                facts = (item.entry.dtype, item.entry.shape, params.group_size)
                p = params if should_quantize(item.name, *facts) else None
            results[i] = await anyio.to_thread.run_sync(
                _import_item, root, item, p, layout, source.pipeline, created, tally,
                source.quantization,
            )  # fmt: skip
            reporter.emit(event("writing"))

    async with anyio.create_task_group() as writers:
        for _ in range(min(limits.workers, len(source.items))):
            writers.start_soon(worker)
    return [layer for group in results for layer in group]


def _scan(path: Path, variant: str | None) -> Source:
    return scan_source(path, variant=variant)


def _check_options(source: Source, qtype: str | None, layout: ImportLayout) -> None:
    if source.quantization is None and not any(isinstance(i, PackedSource) for i in source.items):
        return
    if qtype is not None:
        raise SourceError(
            f"source is already quantized ({source.layout}); it cannot be quantized again",
            path=source.root,
        )
    if layout == "data":
        raise SourceError(
            "a pre-quantized source needs the 'named' layout: E0 'data' blobs have no "
            "quantization labels",
            path=source.root,
        )


def _typed(exc: BaseException, model: str, root: Path) -> BaseException:
    """The error to raise: ours with model and store filled in, OS errors as StoreWriteError.

    Anything else (cancellation, KeyboardInterrupt) is returned unchanged.
    """
    if isinstance(exc, BaseExceptionGroup):
        error = single_error(exc, (AsyncWeightsError, OSError))
        if error is None:
            return exc  # an interrupt or a bug: the whole group, nothing hidden
        exc = error
    if isinstance(exc, AsyncWeightsError):
        exc.add_context(model=model, store=root)
        return exc
    if isinstance(exc, OSError):
        err = StoreWriteError(
            f"cannot write the store: {exc.strerror or exc}",
            model=model, store=root, path=exc.filename, errno=exc.errno,
        )  # fmt: skip
        err.__cause__ = exc
        return err
    return exc


def _sweep(root: Path, name: str) -> None:
    """Remove dead writers' temporary files from blobs/ and every manifest folder."""
    remove_stale_temps(root / "blobs")
    folders = {manifest_path(root, name).parent, *root.glob("manifests/*/*/*")}
    for folder in folders:
        if folder.is_dir() and not folder.is_symlink():
            remove_stale_temps(folder)


def _missing_dirs(root: Path, name: str) -> list[Path]:
    """The folders an import may create that do not exist yet, deepest first."""
    manifest_dir = manifest_path(root, name).parent
    chain = [manifest_dir, *manifest_dir.parents]
    candidates = [root / "blobs", *(p for p in chain if p == root or root in p.parents)]
    missing = {p for p in candidates if not p.exists()}
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def _roll_back(root: Path, created: dict[str, int], new_dirs: list[Path]) -> None:
    """Remove the blobs this import made that no manifest references, and its new folders.

    A manifest's references are every ``sha256:<hex>`` in its bytes, so even a manifest that
    does not parse keeps its blobs.
    """
    referenced: set[bytes] = set()
    for tree in ("manifests", "manifests-v2"):  # Ollama 0.40 links manifests-v2 to blobs
        if not created:
            break
        for dirpath, _, files in os.walk(root / tree):
            for file in files:
                try:
                    data = read_file(os.path.join(dirpath, file), "manifest", max_size=_CAP)
                except AsyncWeightsError:
                    continue  # a FIFO, a device or a huge file is no manifest
                referenced.update(_DIGEST.findall(data))
    for digest, mtime_ns in created.items():
        path = Path(root, "blobs", digest.replace(":", "-"))
        try:
            reused = os.stat(path).st_mtime_ns != mtime_ns  # another writer took it since
        except OSError:
            continue
        if digest.encode() not in referenced and not reused:
            path.unlink(missing_ok=True)
    for path in new_dirs:
        with contextlib.suppress(OSError):  # not empty (another writer uses it), or gone
            path.rmdir()


def _write_bytes(root: Path, data: bytes, created: dict[str, int]) -> Any:
    return write_blob(root, [data], created=created)


def _write_configs(
    root: Path, source: Source, qtype: str | None, layout: ImportLayout, created: dict[str, int]
) -> list[Layer]:
    """Write the JSON config layers (blocking); model_index.json rewritten as Ollama does."""
    layers = []
    for name, path in source.configs:
        data = path.read_bytes()
        if source.pipeline and name == "model_index.json":
            data = _pipeline_index(source, _read_json(path), qtype, layout)
        blob = write_blob(root, [data], created=created)
        layers.append(Layer(JSON_MEDIA_TYPE, blob.digest, blob.size, name))
    if not source.pipeline and qtype is not None and layout == "data":
        # E0 LLM imports added a synthetic model_index.json when quantizing (ollama
        # x/create/create.go@6ddd8862c).
        group = quant_params(qtype, era="E0").group_size
        data = encode_json({"group_size": group, "quantization": _E0_LABELS[qtype]})
        blob = write_blob(root, [data], created=created)
        layers.append(Layer(JSON_MEDIA_TYPE, blob.digest, blob.size, "model_index.json"))
    return layers


def _pipeline_index(
    source: Source, index: dict[str, Any], qtype: str | None, layout: ImportLayout
) -> bytes:
    """A diffusers model_index.json as Ollama stores it (x/create/imagegen.go@6ddd8862c)."""
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
