"""Quantizing weights for writing (import, demo, test stores): FORMAT.md §4.1 and §5.1.

Reading quantization facts back is `_quant`'s job; this is the writing side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple, TypeAlias

import mlx.core as mx

__all__ = ["Era", "QuantParams", "QuantSpec", "quant_params", "quantize_array", "should_quantize"]

Era: TypeAlias = Literal["E0", "E1", "E2", "E3"]
QuantSpec: TypeAlias = str | tuple[str, int]


class QuantParams(NamedTuple):
    """How one weight is quantized: canonical type, MLX mode, bits and group size (§5.1)."""

    type: str
    mode: str
    bits: int
    group_size: int


# canonical type -> (MLX mode, bits, default group since 2026-03-06)
_QUANT_TYPES: Mapping[str, tuple[str, int, int]] = {
    "int4": ("affine", 4, 64),
    "int8": ("affine", 8, 64),
    "nvfp4": ("nvfp4", 4, 16),
    "mxfp4": ("mxfp4", 4, 32),
    "mxfp8": ("mxfp8", 8, 32),
}


def quant_params(spec: QuantSpec, *, era: Era = "E3") -> QuantParams:
    """Resolve ``"int4"`` or ``("int4", 32)`` to full parameters (int4 is group 32 in E0)."""
    qtype, group = (spec, None) if isinstance(spec, str) else spec
    qtype = qtype.lower()
    if qtype not in _QUANT_TYPES:
        raise ValueError(f"unknown quant type {qtype!r}; expected one of {sorted(_QUANT_TYPES)}")
    mode, bits, default = _QUANT_TYPES[qtype]
    if group is None:
        group = 32 if era == "E0" and qtype == "int4" else default
    return QuantParams(qtype, mode, bits, group)


def quantize_array(
    array: mx.array, params: QuantParams
) -> tuple[mx.array, mx.array, mx.array | None]:
    """Quantize with MLX: packed U32 weight, scales, and biases (None for the FP modes)."""
    out = mx.quantize(array, group_size=params.group_size, bits=params.bits, mode=params.mode)
    biases = out[2] if params.mode == "affine" else None
    mx.eval(out)
    return out[0], out[1], biases


_FLOATS = frozenset({"F16", "BF16", "F32"})
_SKIP = ("embed", "norm", "ln_")


def should_quantize(name: str, dtype: str, shape: Sequence[int], group_size: int) -> bool:
    """Ollama's rule of which tensors a requested quantization applies to (FORMAT.md §4.1).

    Skipped: the ``vae`` component, names with ``embed``, ``norm`` or ``ln_``, non-float
    tensors, anything but a ``*.weight`` of rank 2 or more, and last dimensions the group
    does not divide.
    """
    if name.startswith("vae/") or any(s in name for s in _SKIP):
        return False
    if not name.endswith(".weight") or dtype not in _FLOATS or len(shape) < 2:
        return False
    return shape[-1] % group_size == 0
