"""Which blobs and tensors a load needs, what they are called, and how they are grouped.

Pure: layers, validated headers and the model's hints in, a `Plan` out, no I/O (the async
`_load.make_plan` gathers the inputs). It names each tensor the way Ollama's loaders do,
resolves quantization per tensor (`_quant.resolve`), checks the budget, and cuts the blobs
into groups bounded by bytes and open files. See ``docs/format.md`` for the naming rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import (
    BudgetError,
    ComponentNotFoundError,
    DuplicateTensorError,
    HeaderError,
    ManifestError,
    QuantizationError,
    UnsupportedDTypeError,
)
from ._files import StoreFile
from ._gguf import GGUFFile, GGUFTensorInfo
from ._header import BlobHeader, TensorEntry
from ._limits import Limits
from ._manifest import Layer
from ._names import blob_file_name
from ._quant import Packed, Quantization, canonical_type, label_bits, resolve

if TYPE_CHECKING:
    from ._weights import ShardSlice

__all__ = [
    "BlobPlan",
    "Hints",
    "Namer",
    "Plan",
    "PlannedTensor",
    "blob_paths",
    "group_blobs",
    "load_units",
    "model_quantization",
    "plan_gguf",
    "plan_tensors",
    "resolve_tensors",
    "select_layers",
    "set_nbytes",
]

#: The model-level quantization label and explicit group size (`_quant.model_hints`).
Hints = tuple[str | None, int | None]

_COMPANIONS = ("_scale", "_qbias")


@dataclass(slots=True)
class PlannedTensor:
    """One logical tensor: its final name and where its bytes are."""

    name: str
    key: str
    entry: TensorEntry
    digest: str
    companion: bool = False
    quantization: Quantization | None = None
    #: on a packed weight: its companions by role (``scales``, ``biases``, ``global_scale``)
    companions: dict[str, str] | None = None
    #: the GGUF tensor the array is converted from (GGUF blobs only); `entry` then describes
    #: the converted array (dtype, shape, and ``end`` = its bytes)
    source: GGUFTensorInfo | None = None
    #: the part this rank reads (a sharded load); None for the whole tensor
    slice: ShardSlice | None = None


@dataclass(slots=True)
class BlobPlan:
    """One distinct blob to open, with the tensors taken from it."""

    digest: str
    path: str
    header: BlobHeader
    tensors: list[PlannedTensor] = field(default_factory=list)
    #: bytes of the distinct tensors taken from the blob (set once planning is done)
    nbytes: int = 0
    #: the whole file, when planning read it whole (small blobs): loaded without reopening
    data: bytes | bytearray | None = None
    #: a part of a GGUF blob (one tensor and its companions): read by byte range
    gguf: GGUFFile | None = None
    #: whether verifying hashes the whole file with this part (the first part of a blob)
    hash_whole: bool = True
    #: read by byte ranges for a `Shard` (each tensor whole or its `PlannedTensor.slice`)
    sharded: bool = False
    #: the descriptor planning validated the header through (a streamed load): the load
    #: reads the data through it and closes it, never opening the path again
    file: StoreFile | None = None


@dataclass(slots=True)
class Plan:
    """Everything a load does, decided before it starts."""

    model: str
    component: str | None
    blobs: list[BlobPlan]
    quantization: Quantization | None
    groups: list[list[BlobPlan]]
    #: GGUF metadata of the loaded GGUF layer (the main one when loading every tensor)
    metadata: dict[str, Any] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.blobs)

    @property
    def total_tensors(self) -> int:
        return sum(len(b.tensors) for b in self.blobs)


def select_layers(
    label: str, layers: list[Layer], components: list[str], component: str | None
) -> list[Layer]:
    """The tensor layers of `component` (every one for None), in manifest order.

    Raises:
        ComponentNotFoundError: no layer of that component, or no tensor layer at all.
    """
    if component is not None:
        prefix = component + "/"
        layers = [layer for layer in layers if layer.name and layer.name.startswith(prefix)]
        if not layers:
            raise ComponentNotFoundError(component, components, model=label)
    elif not layers:
        raise ComponentNotFoundError("", [], model=label)
    return layers


def load_units(layers: list[Layer]) -> list[list[Layer]]:
    """The layers a load must plan together, in manifest order of their first layer.

    A packed weight and its scales and biases are planned together (the quantization of
    ``X`` is read from ``X.scale``'s shape): layers whose names share a base (the name without
    Ollama's companion suffixes ``.scale``/``.bias``/``_scale``/``_qbias``) form one unit.
    Companions inside one blob travel with it anyway.
    """
    units: dict[str, list[Layer]] = {}
    for layer in layers:
        units.setdefault(_base(layer.name or layer.digest), []).append(layer)
    return list(units.values())


def _base(name: str) -> str:
    for suffix in (".scale", ".bias", "_scale", "_qbias", ".global_scale", "_scale_2"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def blob_paths(blobs_dir: str, label: str, layers: list[Layer]) -> dict[str, str]:
    """Each distinct blob's path under `blobs_dir`, by digest."""
    # Plain strings: pathlib costs ~10 us a path, which adds up over thousands of blobs.
    prefix = os.path.join(blobs_dir, "")
    paths: dict[str, str] = {}
    for layer in layers:
        if layer.digest not in paths:
            try:
                paths[layer.digest] = prefix + blob_file_name(layer.digest)
            except ValueError as exc:  # only a Layer changed after it was made can get here
                raise ManifestError(str(exc), model=label, tensor=layer.name) from None
    return paths


def plan_tensors(
    label: str,
    component: str | None,
    layers: list[Layer],
    headers: dict[str, BlobHeader],
    contents: dict[str, bytes | bytearray],
    paths: dict[str, str],
    hints: Hints,
    limits: Limits,
    files: int,
) -> Plan:
    """Plan a safetensors load from its layers, their validated headers and the model's hints.

    Args:
        contents: whole small blobs read while gathering headers, kept for the load.
        files: blob files one group may hold open (`_read.files_per_group`).

    Raises:
        HeaderError, DuplicateTensorError, QuantizationError, BudgetError.
    """
    blobs = _name_tensors(label, component, layers, headers, paths)
    for blob in blobs:
        blob.data = contents.get(blob.digest)
    quantization = _resolve_quantization(label, blobs, *hints)
    plan = Plan(label, component, blobs, quantization, [])
    _check_budget(plan, limits)
    plan.groups = group_blobs(blobs, limits, files)
    return plan


def _check_budget(plan: Plan, limits: Limits) -> None:
    if limits.max_bytes is not None and plan.total_bytes > limits.max_bytes:
        raise BudgetError(
            f"load needs {plan.total_bytes} bytes, over the budget of {limits.max_bytes}",
            model=plan.model,
        )


def _name_tensors(
    label: str,
    component: str | None,
    layers: list[Layer],
    headers: dict[str, BlobHeader],
    paths: dict[str, str],
) -> list[BlobPlan]:
    namer = Namer(label, component)
    for layer in layers:
        namer.add(layer, headers[layer.digest], paths[layer.digest])
    blobs = list(namer.blobs.values())
    for blob in blobs:
        set_nbytes(blob)
    return blobs


def set_nbytes(blob: BlobPlan) -> None:
    """Set `BlobPlan.nbytes` once its tensors are all named."""
    if len(blob.header.entries) == 1:
        blob.nbytes = blob.tensors[0].entry.nbytes if blob.tensors else 0
    else:
        blob.nbytes = sum({t.key: t.entry.nbytes for t in blob.tensors}.values())


class Namer:
    """Names the tensors of layers added one at a time, as Ollama's loaders do.

    Duplicates are checked across every layer added, whatever blob they came from.
    `blobs` holds the plan of each blob by digest; a streamed load takes blobs out once
    their group is loaded, and a later layer of the same digest then gets a plan of its own.
    """

    def __init__(self, label: str, component: str | None) -> None:
        self.label = label
        self.component = component
        self.blobs: dict[str, BlobPlan] = {}
        self._owner: dict[str, tuple[str, str]] = {}  # logical name -> (digest, key)
        self._seen: set[tuple[str, str | None]] = set()

    def add(self, layer: Layer, header: BlobHeader, path: str) -> BlobPlan | None:
        """Name `layer`'s tensors into its blob's plan (made if new); returns that plan, or
        None when the layer adds nothing (its blob already named for its component).

        Raises:
            HeaderError: a ``data`` blob with no layer name.
            DuplicateTensorError: a name already taken by another blob or key.
        """
        label, component = self.label, self.component
        layer_comp = layer.name.split("/", 1)[0] if layer.name and "/" in layer.name else None
        entries = header.entries
        if len(entries) == 1 and "data" in entries:
            if not layer.name:
                raise HeaderError(
                    "a 'data' blob needs a layer name", model=label, digest=layer.digest
                )
            names = [(layer.name, "data")]
        else:
            if (layer.digest, layer_comp) in self._seen:
                return None
            try:
                remapped = _remap(entries)
            except _Collision as exc:
                raise DuplicateTensorError(
                    exc.reason, model=label, tensor=exc.name, digest=layer.digest,
                    path=path,
                ) from None  # fmt: skip
            names = [(_namespaced(n, layer_comp), key) for n, key in remapped.items()]
        self._seen.add((layer.digest, layer_comp))
        blob = self.blobs.get(layer.digest)
        if blob is None:
            blob = self.blobs[layer.digest] = BlobPlan(layer.digest, path, header)
        owner = self._owner
        for logical, key in names:
            previous = owner.get(logical)
            if previous is not None:
                if previous == (layer.digest, key):
                    continue
                raise DuplicateTensorError(
                    f"tensor defined twice, also by blob {previous[0]}",
                    model=label,
                    tensor=logical,
                    digest=layer.digest,
                    path=blob.path,
                )
            owner[logical] = (layer.digest, key)
            name = logical[len(component) + 1 :] if component else logical
            blob.tensors.append(PlannedTensor(name, key, entries[key], layer.digest))
        return blob


class _Collision(Exception):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason


def _remap(keys: dict[str, TensorEntry]) -> dict[str, str]:
    """Map blob keys to in-memory names: ``X.scale`` → ``X_scale``, ``X.bias`` → ``X_qbias``.

    A ``.bias`` is a quantization bias only when the same blob has the matching ``.scale``
    (docs/format.md#companion-names, Ollama's current rule), so real layer biases keep their
    names.

    Raises:
        _Collision: two keys map to one name (e.g. ``w.scale`` and a literal ``w_scale``).
    """
    if len(keys) == 1:
        (key,) = keys
        if not key.endswith(".scale"):
            return {key: key}
    present = keys
    out: dict[str, str] = {}
    for key in keys:
        if key.endswith(".scale"):
            name = key[: -len(".scale")] + "_scale"
        elif key.endswith(".bias") and key[: -len(".bias")] + ".scale" in present:
            name = key[: -len(".bias")] + "_qbias"
        else:
            name = key
        if name in out:
            raise _Collision(name, f"keys {out[name]!r} and {key!r} both load as {name!r}")
        out[name] = key
    return out


def _namespaced(name: str, comp: str | None) -> str:
    if comp is None or name.startswith(comp + "/"):
        return name
    return f"{comp}/{name}"


def _resolve_quantization(
    label: str, blobs: list[BlobPlan], hint_label: str | None, hint_group: int | None
) -> Quantization | None:
    return model_quantization(
        hint_label, hint_group, resolve_tensors(label, blobs, hint_label, hint_group)
    )


def resolve_tensors(
    label: str, blobs: list[BlobPlan], hint_label: str | None, hint_group: int | None
) -> list[Quantization]:
    """Mark companions and set each packed weight's quantization, among `blobs` only.

    Returns:
        The quantization of each packed weight found (`model_quantization` picks the
        model's from them).

    Raises:
        QuantizationError: a packed weight without its scales, or scales that fit no type.
    """
    by_name = {t.name: (t, blob) for blob in blobs for t in blob.tensors}
    hint_bits = label_bits(hint_label)
    found: list[Quantization] = []
    for name, (tensor, blob) in by_name.items():
        if name.endswith(_COMPANIONS):  # one call for the common case: no suffix
            for suffix in _COMPANIONS:
                if name.endswith(suffix) and name[: -len(suffix)] in by_name:
                    tensor.companion = True
        scale = by_name.get(name + "_scale")
        bias = by_name.get(name + "_qbias")
        if scale is None and bias is None and tensor.entry.dtype != "U32":
            continue  # the common case: a plain tensor, no metadata looked up
        meta = blob.header.metadata
        tagged = meta.get(tensor.key + ".quant_type") or meta.get("quant_type")
        if scale is None:
            if bias is not None or (tagged and tensor.entry.dtype == "U32" and _main(blob) == 1):
                raise QuantizationError(
                    "quantized weight without its scales", model=label, tensor=name,
                    digest=blob.digest, path=blob.path,
                )  # fmt: skip
            continue
        if tensor.entry.dtype != "U32":
            continue  # a real tensor that happens to have a `_scale` sibling
        # Each field falls back to the blob-wide one on its own: Ollama writes a per-tensor
        # field only where it differs (ollama PR #17731, x/create/prequant.go) and reads them
        # so (x/mlxrunner/model/root.go@fb3076099); a type's default group comes last.
        group_text = meta.get(tensor.key + ".group_size") or meta.get("group_size")
        packed = Packed(
            tensor.entry.dtype,
            tensor.entry.shape,
            scale[0].entry.dtype,
            scale[0].entry.shape,
            None if bias is None else bias[0].entry.shape,
        )
        try:
            q = resolve(
                packed,
                label=tagged,
                label_group=group_text,
                hint_bits=hint_bits,
                hint_group=hint_group,
            )
        except ValueError as exc:
            raise QuantizationError(
                str(exc), model=label, tensor=name, digest=blob.digest, path=blob.path
            ) from None
        tensor.quantization = q
        tensor.companions = {"scales": scale[0].name}
        if bias is not None:
            tensor.companions["biases"] = bias[0].name
        # NVFP4's second-level scale: kept as stored, named as Ollama's runner finds it
        # (x/mlxrunner/model/linear.go: "<X>.global_scale", else ModelOpt's "<X>_scale_2").
        for global_name in (name + ".global_scale", name + "_scale_2"):
            found_global = by_name.get(global_name)
            if found_global is not None:
                found_global[0].companion = True
                tensor.companions["global_scale"] = global_name
                break
        found.append(q)
    return found


def _main(blob: BlobPlan) -> int:
    return sum(1 for t in blob.tensors if not t.name.endswith(_COMPANIONS))


def model_quantization(
    hint_label: str | None, hint_group: int | None, found: list[Quantization]
) -> Quantization | None:
    """The model-level quantization: the hint's type, else the lowest-bit type found."""
    qtype = canonical_type(hint_label)
    if qtype is None and found:
        qtype = min(found, key=lambda q: (q.bits, q.type)).type  # what `ollama show` reports
    if qtype is None:
        return None
    groups = {q.group_size for q in found if q.type == qtype}
    group = hint_group or (groups.pop() if len(groups) == 1 else None)
    return Quantization.of(qtype, group)


def group_blobs(blobs: list[BlobPlan], limits: Limits, files: int) -> list[list[BlobPlan]]:
    """Cut the blobs, in order, into groups of at most `group_bytes` and `files` open files.

    The first groups are smaller (1/32 of `group_bytes`, doubling): the first tensors reach
    a streaming consumer after a few milliseconds instead of a whole group's read.
    """
    groups: list[list[BlobPlan]] = []
    current: list[BlobPlan] = []
    size = 0
    held = 0  # blobs of the group that MLX keeps open until evaluated
    cap = max(1, limits.group_bytes // 32)
    for blob in blobs:
        # a GGUF part's file is read and closed within its group call, never held open
        lazy = blob.gguf is None and blob.header.file_size > limits.direct_read_bytes
        if current and (size + blob.nbytes > cap or (lazy and held >= files)):
            groups.append(current)
            current, size, held = [], 0, 0
            cap = min(limits.group_bytes, cap * 2)
        current.append(blob)
        size += blob.nbytes
        held += lazy
    if current:
        groups.append(current)
    return groups


# ------------------------------------------------------------------------------------- GGUF


def plan_gguf(
    label: str,
    component: str | None,
    chosen: list[tuple[str, Layer, str, GGUFFile]],
    limits: Limits,
    files: int,
) -> Plan:
    """Plan a GGUF model: each tensor (with its companions) is a part of its blob.

    Args:
        chosen: ``(component, layer, path, GGUF header)`` of each GGUF layer to load.
            `component` None loads every one: the main weights under their GGUF names,
            the others (``projector``) prefixed with ``<component>/``.

    Raises:
        UnsupportedDTypeError, DuplicateTensorError, BudgetError.
    """
    blobs: list[BlobPlan] = []
    owner: dict[str, str] = {}
    weighed: dict[Quantization, int] = {}
    for comp, layer, path, gguf in chosen:
        prefix = "" if component is not None or comp == "model" else comp + "/"
        header = BlobHeader(gguf.file_size, gguf.data_start, {})
        first = True
        for info in gguf.tensors.values():
            part = _gguf_part(label, layer, path, header, gguf, info, prefix)
            part.hash_whole = first
            first = False
            for t in part.tensors:
                if t.name in owner:
                    raise DuplicateTensorError(
                        f"tensor name also used by tensor {owner[t.name]!r}",
                        model=label, tensor=t.name, digest=layer.digest, path=path,
                    )  # fmt: skip
                owner[t.name] = info.name
                if t.quantization is not None:
                    weighed[t.quantization] = weighed.get(t.quantization, 0) + info.nbytes
            blobs.append(part)
    quantization = max(weighed, key=lambda q: weighed[q]) if weighed else None
    metadata = chosen[0][3].metadata if chosen else None
    plan = Plan(label, component, blobs, quantization, [], metadata)
    _check_budget(plan, limits)
    plan.groups = group_blobs(blobs, limits, files)
    return plan


def _gguf_part(
    label: str,
    layer: Layer,
    path: str,
    header: BlobHeader,
    gguf: GGUFFile,
    info: GGUFTensorInfo,
    prefix: str,
) -> BlobPlan:
    """One GGUF tensor as a part of its blob: the arrays it loads as, checked supported."""
    # Here, not at the top: _ggml imports numpy, which only GGUF models need (numpy was
    # 60-90 ms of the 250-300 ms `import asyncweights` took on a 2-core VM).
    from ._ggml import DTYPE_BYTES, TARGETS, UNSUPPORTED, outputs

    target = TARGETS.get(info.ggml_type)
    if target is None:
        reason = UNSUPPORTED.get(info.ggml_type, "unknown type")
        raise UnsupportedDTypeError(
            f"GGML type {info.ggml_type} is not supported: {reason}",
            model=label, tensor=info.name, digest=layer.digest, path=path,
        )  # fmt: skip
    part = BlobPlan(layer.digest, path, header, gguf=gguf)
    quantization = None
    if target.kind == "affine":
        quantization = Quantization(info.ggml_type, "affine", target.bits, target.group_size)
    outs = outputs(info)
    for i, (name, dtype, shape) in enumerate(outs):
        nbytes = DTYPE_BYTES[dtype]
        for d in shape:
            nbytes *= d
        entry = TensorEntry(name, dtype, shape, 0, nbytes)
        planned = PlannedTensor(
            prefix + name, name, entry, layer.digest, companion=i > 0,
            quantization=quantization if i == 0 else None, source=info,
        )  # fmt: skip
        if i == 0 and quantization is not None:
            names = [prefix + n for n, _, _ in outs[1:]]
            planned.companions = dict(zip(("scales", "biases"), names, strict=False))
        part.tensors.append(planned)
        part.nbytes += nbytes
    return part
