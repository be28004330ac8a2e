"""Quantization: one `Quantization` type, one table of types, the read rule and the write rule.

Reading (`resolve`): facts come from blob metadata, then model-level labels, then the shape
rule; there is never a guess from byte-size ratios. Writing (`quant_params`,
`should_quantize`, `quantize_array`): which tensors an import quantizes and how, as Ollama's
``x/create`` does. See ``docs/format.md`` for the upstream sources of each rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import mlx.core as mx

from ._header import FLOAT_DTYPES

__all__ = [
    "Era",
    "QuantSpec",
    "Quantization",
    "canonical_type",
    "model_hints",
    "quant_params",
    "quantize_array",
    "resolve",
    "should_quantize",
]

#: The blob grammars of Ollama's safetensors stores, oldest first.
Era: TypeAlias = Literal["E0", "E1", "E2", "E3"]
#: A requested quantization: a type (``"int4"``), or a type and a group size.
QuantSpec: TypeAlias = str | tuple[str, int]

# canonical type -> (MLX mode, bits, default group size since 2026-03-06)
_TYPES: dict[str, tuple[str, int, int]] = {
    "int4": ("affine", 4, 64),
    "int8": ("affine", 8, 64),
    "nvfp4": ("nvfp4", 4, 16),
    "mxfp4": ("mxfp4", 4, 32),
    "mxfp8": ("mxfp8", 8, 32),
}
_ALIASES = {
    "int4": "int4",
    "q4": "int4",
    "fp4": "int4",
    "int8": "int8",
    "q8": "int8",
    "fp8": "int8",
    "nvfp4": "nvfp4",
    "mxfp4": "mxfp4",
    "mxfp8": "mxfp8",
}
_FP_SCALE_DTYPES = frozenset({"U8", "F8_E4M3", "F8_E8M0"})
_AFFINE_GROUPS = frozenset({32, 64, 128})


@dataclass(frozen=True, slots=True)
class Quantization:
    """How a packed weight is quantized: canonical type, MLX mode, bits and group size.

    The same type describes what a loader found and what a writer asks for.

    ``mx.dequantize(w, scales, biases, group_size=q.group_size, bits=q.bits, mode=q.mode)``.
    """

    type: str
    mode: str
    bits: int
    group_size: int

    @classmethod
    def of(cls, qtype: str, group_size: int | None = None) -> Quantization:
        """The facts of a canonical type, with its default group size unless one is given."""
        mode, bits, default = _TYPES[qtype]
        return cls(qtype, mode, bits, group_size or default)


def quant_params(spec: QuantSpec, *, era: Era = "E3") -> Quantization:
    """The write rule's parameters for ``"int4"`` or ``("int4", 32)``: the type's default
    group unless one is given (int4 was group 32 in E0).

    Raises:
        ValueError: not one of the canonical types.
    """
    qtype, group = (spec, None) if isinstance(spec, str) else spec
    qtype = qtype.lower()
    if qtype not in _TYPES:
        raise ValueError(f"unknown quant type {qtype!r}; expected one of {sorted(_TYPES)}")
    mode, bits, default = _TYPES[qtype]
    if group is None:
        group = 32 if era == "E0" and qtype == "int4" else default
    return Quantization(qtype, mode, bits, group)


def quantize_array(
    array: mx.array, params: Quantization
) -> tuple[mx.array, mx.array, mx.array | None]:
    """Quantize with MLX: packed U32 weight, scales, and biases (None for the FP modes)."""
    out = mx.quantize(array, group_size=params.group_size, bits=params.bits, mode=params.mode)
    biases = out[2] if params.mode == "affine" else None
    mx.eval(out)
    return out[0], out[1], biases


_SKIP = ("embed", "norm", "ln_")


def should_quantize(name: str, dtype: str, shape: Sequence[int], group_size: int) -> bool:
    """Ollama's rule of which tensors a requested quantization applies to.

    See docs/format.md#quant-policy.

    Skipped: the ``vae`` component, names with ``embed``, ``norm`` or ``ln_``, non-float
    tensors, anything but a ``*.weight`` of rank 2 or more, and last dimensions the group
    does not divide.
    """
    if name.startswith("vae/") or any(s in name for s in _SKIP):
        return False
    if not name.endswith(".weight") or dtype not in FLOAT_DTYPES or len(shape) < 2:
        return False
    return shape[-1] % group_size == 0


def model_hints(index: Any, file_type: str) -> tuple[str | None, int | None]:
    """The model-level quantization label and explicit group size, from the decoded
    ``model_index.json`` (or None) and the config blob's ``file_type``: the config's
    canonical label wins, as in Ollama's HEAD (see ``docs/format.md``)."""
    label: str | None = None
    group: int | None = None
    if isinstance(index, dict):
        value = index.get("quantization")
        if isinstance(value, str) and canonical_type(value):
            label = value
        size = index.get("group_size")
        if type(size) is int and size > 0:
            group = size
    if canonical_type(file_type):
        label = file_type
    return label, group


def canonical_type(label: str | None) -> str | None:
    """Map a label (``"Q4"``, ``"INT8"``, ``"nvfp4"`` …) to its canonical type, else None.

    Torch dtype strings (``"bfloat16"``) and empty labels mean "not quantized".
    """
    if not label:
        return None
    return _ALIASES.get(label.strip().lower())


def label_bits(label: str | None) -> int | None:
    """The bits a model-level label implies, for tie-breaking (docs/format.md#quant-rule)."""
    qtype = canonical_type(label)
    return None if qtype is None else _TYPES[qtype][1]


@dataclass(frozen=True, slots=True)
class Packed:
    """The shape facts of one packed weight and its companions (no data needed)."""

    weight_dtype: str
    weight_shape: tuple[int, ...]
    scale_dtype: str
    scale_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None


def resolve(
    packed: Packed,
    *,
    label: str | None,
    label_group: str | None,
    hint_bits: int | None,
    hint_group: int | None = None,
) -> Quantization:
    """Apply docs/format.md#quant-rule to one packed weight.

    Args:
        packed: dtypes and shapes of the weight, its scales and (optional) biases.
        label: the tensor's ``quant_type`` metadata (per tensor, else blob-global), if any.
        label_group: the matching ``group_size`` metadata string, if any.
        hint_bits: bits of the model-level label (model_index.json, config file_type).
        hint_group: an explicit model-level group size, if any.

    Raises:
        ValueError: the shapes fit no quantization (the caller adds model and tensor).
    """
    w, s, b = packed.weight_shape, packed.scale_shape, packed.bias_shape
    if packed.weight_dtype != "U32":
        raise ValueError(f"packed weight must be U32, not {packed.weight_dtype}")
    if not w or not s or len(w) != len(s) or w[:-1] != s[:-1]:
        raise ValueError(f"scales {list(s)} do not match packed weight {list(w)}")
    if b is not None and b != s:
        raise ValueError(f"biases {list(b)} do not match scales {list(s)}")
    wc, sc = w[-1], s[-1]
    qtype = canonical_type(label)
    if qtype is not None:
        group = _parse_group(label_group)
        q = Quantization.of(qtype, group)
        if _fits(q, wc, sc, b is not None):
            return q
        warnings.warn(
            f"quantization label {label!r} (group {q.group_size}) does not match shapes "
            f"{list(w)}/{list(s)}; inferring from shapes",
            stacklevel=2,
        )
    q = _infer(packed, wc, sc, hint_bits, hint_group)
    if not _fits(q, wc, sc, b is not None):
        raise ValueError(f"inferred {q.type}/{q.group_size} does not fit shapes {list(w)}")
    return q


def _parse_group(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def _fits(q: Quantization, wc: int, sc: int, has_bias: bool) -> bool:
    logical = wc * (32 // q.bits)
    return (
        logical % q.group_size == 0
        and sc * q.group_size == logical
        and (has_bias == (q.mode == "affine"))
    )


def _infer(
    packed: Packed, wc: int, sc: int, hint_bits: int | None, hint_group: int | None
) -> Quantization:
    if sc == 0:
        raise ValueError("scales have a zero last dimension")
    if packed.bias_shape is None:
        if packed.scale_dtype not in _FP_SCALE_DTYPES:
            raise ValueError(
                f"no biases and {packed.scale_dtype} scales: not an affine or FP quantization"
            )
        by_ratio = {2: "nvfp4", 4: "mxfp4", 8: "mxfp8"}
        if wc % sc or wc // sc not in by_ratio:
            raise ValueError(f"packed/scale ratio {wc}/{sc} fits no FP quantization")
        return Quantization.of(by_ratio[wc // sc])
    if packed.scale_dtype not in FLOAT_DTYPES:
        raise ValueError(f"affine scales must be floating point, not {packed.scale_dtype}")
    candidates = []
    for bits, per_word in ((4, 8), (8, 4)):
        if (wc * per_word) % sc == 0 and (wc * per_word) // sc in _AFFINE_GROUPS:
            candidates.append(Quantization.of(f"int{bits}", (wc * per_word) // sc))
    if not candidates:
        raise ValueError(f"packed/scale ratio {wc}/{sc} fits no affine 4- or 8-bit group")
    if len(candidates) == 1:
        return candidates[0]
    int4, int8 = candidates
    if int4.group_size == 64:  # ratio 8: int4/64 or int8/32
        return int8 if hint_bits == 8 else int4
    # ratio 16: int4/128 only when the model says 4 bits and group 128 explicitly
    return int4 if hint_bits == 4 and hint_group == 128 else int8
