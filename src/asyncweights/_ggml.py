"""GGML tensor types into MLX arrays: as is, as MLX affine quantization, or dequantized.

Block layouts are those of llama.cpp's ``ggml/src/ggml-common.h`` and the dequantization
routines of ``ggml/src/ggml-quants.c`` (067d44f6c48459f7a82dbafc6fbd0bae97755a4e). MLX's
affine quantization stores ``w = scale * q + bias`` per group of `group_size` elements along the
last axis, `q` unsigned `bits`-bit integers packed little-endian into uint32 words (a
bitstream, lowest element in the lowest bits), and accepts groups of 32, 64 and 128 only
(``mx.quantize`` in mlx 0.32.4 refuses 16).

A block type becomes MLX affine quantization when every block is one or more 32-element
groups with one scale and one bias each, and ``scale * q`` is exact in float32 for every
``q`` (so ``scale * q + bias`` rounds once, fused or not, exactly as the reference's
``d * x - m`` does): see `TARGETS` for the reason per type. Types with 16-element sub-blocks
(Q2_K, Q3_K, Q6_K) or a float32 block scale (Q8_K) are dequantized to float32, exactly as
llama.cpp computes them. Everything here is numpy on whole tensors, run in worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import numpy as np

from ._gguf import GGUFTensorInfo

__all__ = [
    "DTYPE_BYTES",
    "TARGETS",
    "UNSUPPORTED",
    "Target",
    "companion_names",
    "convert",
    "mlx_dtype",
    "output_nbytes",
    "outputs",
]

U8 = np.uint8
_F16 = np.dtype("<f2")
_F32 = np.float32
NDArray = np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class Target:
    """What one GGML type becomes in MLX.

    Attributes:
        ggml_type: the GGML type name.
        kind: ``"raw"`` (loaded as is), ``"affine"`` (MLX affine quantization: a uint32 packed
            weight with ``.scales`` and ``.biases``) or ``"float"`` (dequantized to float32).
        dtype: the loaded array's dtype, as a safetensors dtype string.
        bits, group_size: the MLX affine facts (0 unless affine).
        scale_dtype: the dtype of scales and biases (``"F16"`` or ``"F32"``; affine only).
        reason: why this representation, in one line.
    """

    ggml_type: str
    kind: Literal["raw", "affine", "float"]
    dtype: str
    reason: str
    bits: int = 0
    group_size: int = 0
    scale_dtype: str = ""


def _affine(name: str, bits: int, scale: str, reason: str) -> Target:
    return Target(name, "affine", "U32", reason, bits, 32, scale)


#: Every GGML type asyncweights loads. Bit counts of the f32 products: an f16 ``d`` has 11
#: significant bits; a product of factors with a, b, c bits has at most a+b+c.
TARGETS: dict[str, Target] = {
    "F32": Target("F32", "raw", "F32", "loaded as is"),
    "F16": Target("F16", "raw", "F16", "loaded as is"),
    "BF16": Target("BF16", "raw", "BF16", "loaded as is"),
    "F64": Target("F64", "raw", "F64", "loaded as is (MLX float64: CPU only)"),
    "I8": Target("I8", "raw", "I8", "loaded as is"),
    "I16": Target("I16", "raw", "I16", "loaded as is"),
    "I32": Target("I32", "raw", "I32", "loaded as is"),
    "I64": Target("I64", "raw", "I64", "loaded as is"),
    "Q4_0": _affine("Q4_0", 4, "F16", "d*(q-8): scale d, bias -8d in f16, as mx.load makes them"),
    "Q4_1": _affine("Q4_1", 4, "F16", "d*q+m: scale d, bias m, as mx.load makes them"),
    "Q8_0": _affine(
        "Q8_0", 8, "F16", "d*x: q = x+128, scale d, bias -128d in f16, as mx.load makes them"
    ),
    "Q5_0": _affine("Q5_0", 5, "F16", "d*(q-16): scale d, bias -16d in f16 (exact)"),
    "Q5_1": _affine("Q5_1", 5, "F16", "d*q+m: scale d, bias m"),
    "Q4_K": _affine(
        "Q4_K",
        4,
        "F32",
        "8 sub-blocks of 32: scale d*sc, bias -dmin*m in f32 (d*sc*q has <= 21 bits)",
    ),
    "Q5_K": _affine(
        "Q5_K",
        5,
        "F32",
        "8 sub-blocks of 32: scale d*sc, bias -dmin*m in f32 (d*sc*q has <= 22 bits)",
    ),
    "Q2_K": Target("Q2_K", "float", "F32", "16-element sub-blocks: MLX has no group of 16"),
    "Q3_K": Target("Q3_K", "float", "F32", "16-element sub-blocks: MLX has no group of 16"),
    "Q6_K": Target("Q6_K", "float", "F32", "16-element sub-blocks: MLX has no group of 16"),
    "Q8_K": Target(
        "Q8_K", "float", "F32", "f32 block scale: scale*q is not exact in f32, fused or not"
    ),
}

#: GGML types refused by name before any tensor data is read, with the reason.
UNSUPPORTED: dict[str, str] = {
    **{
        name: "codebook (lattice) quantization has no MLX equivalent"
        for name in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M")
    },
    "IQ4_NL": "non-linear 4-bit codebook has no MLX equivalent",
    "IQ4_XS": "non-linear 4-bit codebook has no MLX equivalent",
    "TQ1_0": "ternary packing is not supported",
    "TQ2_0": "ternary packing is not supported",
    "Q8_1": "an intermediate type of llama.cpp's dot products, not a storage type",
    "MXFP4": "not supported yet",
    "NVFP4": "not supported yet",
    "Q1_0": "not supported yet",
}

_RAW_NUMPY = {
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "F64": "<f8",
    "I8": "<i1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
}
_MX = {
    "F32": mx.float32,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
    "F64": mx.float64,
    "I8": mx.int8,
    "I16": mx.int16,
    "I32": mx.int32,
    "I64": mx.int64,
    "U32": mx.uint32,
}
DTYPE_BYTES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "U32": 4,
}


def mlx_dtype(dtype: str) -> mx.Dtype:
    """The MLX dtype of a `Target.dtype` string."""
    return _MX[dtype]


def companion_names(name: str) -> tuple[str, str]:
    """The ``scales`` and ``biases`` names of a packed weight, as ``mx.load`` names them.

    ``blk.0.attn_q.weight`` -> ``blk.0.attn_q.scales``, ``blk.0.attn_q.biases``.
    """
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return base + ".scales", base + ".biases"


def outputs(info: GGUFTensorInfo) -> list[tuple[str, str, tuple[int, ...]]]:
    """The arrays a tensor loads as: ``(name, dtype, shape)``, the weight first.

    Raises:
        KeyError: the type is not in `TARGETS` (the caller checks `UNSUPPORTED` first).
    """
    target = TARGETS[info.ggml_type]
    if target.kind != "affine":
        return [(info.name, target.dtype, info.shape)]
    *lead, cols = info.shape
    packed = (*lead, cols * target.bits // 32)
    groups = (*lead, cols // target.group_size)
    scales, biases = companion_names(info.name)
    return [
        (info.name, "U32", packed),
        (scales, target.scale_dtype, groups),
        (biases, target.scale_dtype, groups),
    ]


def output_nbytes(info: GGUFTensorInfo) -> int:
    """Bytes of the arrays `info` loads as."""
    total = 0
    for _, dtype, shape in outputs(info):
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        total += n
    return total


def convert(info: GGUFTensorInfo, data: NDArray) -> list[mx.array]:
    """Turn a tensor's bytes into the arrays `outputs` describes, in that order.

    Args:
        info: the tensor.
        data: its ``info.nbytes`` bytes as a uint8 array (not modified).
    """
    target = TARGETS[info.ggml_type]
    if target.kind == "raw":
        raw = data.view(_RAW_NUMPY[target.dtype]).reshape(info.shape)
        array = mx.array(raw)
        return [array.view(mx.bfloat16) if target.dtype == "BF16" else array]
    if not info.count:
        return [mx.zeros(shape, dtype=_MX[dtype]) for _, dtype, shape in outputs(info)]
    blocks = data.reshape(-1, len(data) // (info.count // _BLOCK[info.ggml_type]))
    if target.kind == "float":
        values = _FLOAT[info.ggml_type](blocks)
        return [mx.array(values.reshape(info.shape))]
    packed, scales, biases = _AFFINE[info.ggml_type](blocks)
    (_, _, wshape), (_, _, sshape), _ = outputs(info)
    return [
        mx.array(np.ascontiguousarray(packed).view(np.uint32).reshape(wshape)),
        mx.array(scales.reshape(sshape)),
        mx.array(biases.reshape(sshape)),
    ]


_BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32}
_BLOCK.update(dict.fromkeys(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"), 256))


# ------------------------------------------------------------------------------- bit helpers


def _f16(blocks: NDArray, at: int) -> NDArray:
    """The f16 at byte `at` of every block, shape (n, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(_F16)


def _nibbles(qs: NDArray) -> NDArray:
    """MLX 4-bit bytes for units of L bytes whose low nibbles are elements 0..L-1 and whose
    high nibbles are elements L..2L-1 (ggml's Q4_0 and Q4_K order): (..., L) -> (..., L)."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    low = (even & 0x0F) | ((odd & 0x0F) << 4)
    high = (even >> 4) | (odd & 0xF0)
    return np.concatenate([low, high], axis=-1)


def _pack(q: NDArray, bits: int) -> NDArray:
    """Pack unsigned `bits`-bit values (n, 8k) into MLX's little-endian bitstream (n, k*bits)."""
    n = q.shape[0]
    eights = q.reshape(-1, 8).astype(np.uint64)
    acc = eights[:, 0].copy()
    for i in range(1, 8):
        acc |= eights[:, i] << np.uint64(bits * i)
    return acc.view(U8).reshape(-1, 8)[:, :bits].reshape(n, -1)


def _split(qs: NDArray) -> NDArray:
    """Low nibbles then high nibbles, as separate elements: (..., L) -> (..., 2L)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _scale_min_k4(s: NDArray) -> tuple[NDArray, NDArray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K block's 12 bytes (get_scale_min_k4)."""
    sc = np.empty((s.shape[0], 8), U8)
    m = np.empty((s.shape[0], 8), U8)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


# --------------------------------------------------------------------------- affine targets
# Each returns (packed bytes (n, block*bits/8), scales (n, groups), biases (n, groups)).


def _q4_0(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]), d, d * _F16.type(-8)


def _q4_1(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2)


def _q8_0(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    d = _f16(b, 0)
    return b[:, 2:34] ^ U8(0x80), d, d * _F16.type(-128)


def _five(qs: NDArray, qh: NDArray) -> NDArray:
    high = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")
    return _pack(_split(qs) | (high << 4), 5)


def _q5_0(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    d = _f16(b, 0)
    return _five(b[:, 6:22], b[:, 2:6]), d, d * _F16.type(-16)


def _q5_1(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    return _five(b[:, 8:24], b[:, 4:8]), _f16(b, 0), _f16(b, 2)


def _k_scales(b: NDArray) -> tuple[NDArray, NDArray]:
    d = _f16(b, 0).astype(_F32)
    dmin = _f16(b, 2).astype(_F32)
    sc, m = _scale_min_k4(b[:, 4:16])
    return d * sc.astype(_F32), -(dmin * m.astype(_F32))


def _q4_k(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    scales, biases = _k_scales(b)
    # 4 chunks of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c+1
    packed = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(len(b), 128)
    return packed, scales, biases


def _q5_k(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    scales, biases = _k_scales(b)
    qh = b[:, 16:48]
    ql = b[:, 48:176].reshape(-1, 4, 32)
    # chunk c: low nibbles take qh bit 2c, high nibbles qh bit 2c+1
    shifts = np.arange(4, dtype=U8).reshape(1, 4, 1) * 2
    lo = (ql & 0x0F) | (((qh[:, None, :] >> shifts) & 1) << 4)
    hi = (ql >> 4) | (((qh[:, None, :] >> (shifts + 1)) & 1) << 4)
    q = np.concatenate([lo, hi], axis=-1).reshape(len(b), 256)
    return _pack(q, 5), scales, biases


_AFFINE = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q8_0": _q8_0,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
}

# ---------------------------------------------------------------------------- float targets
# Element e of a 128-element half n of a Q2_K/Q3_K block: e = 32*j + 16*part + l reads byte
# 32*n + 16*part + l of the quants at shift 2*j, with sub-block scale 8*n + 2*j + part.


def _half_layout() -> tuple[NDArray, NDArray, NDArray]:
    e = np.arange(256)
    n, r = e // 128, e % 128
    j, part, lane = r // 32, (r % 32) // 16, r % 16
    return 32 * n + 16 * part + lane, 2 * j, 8 * n + 2 * j + part


_Q23_BYTE, _Q23_SHIFT, _Q23_SCALE = _half_layout()
_Q23_SHIFT_U8 = _Q23_SHIFT.astype(U8)


def _q2_k(b: NDArray) -> NDArray:
    sc = b[:, 0:16]
    qs = b[:, 16:80]
    d = _f16(b, 80).astype(_F32)
    dmin = _f16(b, 82).astype(_F32)
    dl = d * (sc & 0x0F).astype(_F32)
    ml = dmin * (sc >> 4).astype(_F32)
    q = ((qs[:, _Q23_BYTE] >> _Q23_SHIFT_U8) & 3).astype(_F32)
    result: NDArray = dl[:, _Q23_SCALE] * q - ml[:, _Q23_SCALE]
    return result


def _q3_k(b: NDArray) -> NDArray:
    hmask = b[:, 0:32]
    qs = b[:, 32:96]
    s = b[:, 96:108]
    d = _f16(b, 108).astype(_F32)
    i = np.arange(16)
    low = np.where(i < 8, s[:, i % 8] & 0x0F, s[:, i % 8] >> 4)
    high = (s[:, 8 + i % 4] >> (2 * (i // 4)).astype(U8)) & 3
    sc = (low | (high << 4)).astype(np.int8) - np.int8(32)
    dl = d * sc.astype(_F32)
    e = np.arange(256)
    hbit = ((hmask[:, e % 128 % 32] >> (4 * (e // 128) + (e % 128) // 32).astype(U8)) & 1).astype(
        np.int8
    )
    q = ((qs[:, _Q23_BYTE] >> _Q23_SHIFT_U8) & 3).astype(np.int8) - np.int8(4) * (1 - hbit)
    result: NDArray = dl[:, _Q23_SCALE] * q.astype(_F32)
    return result


def _q6_k_layout() -> tuple[NDArray, NDArray, NDArray, NDArray, NDArray]:
    # Element e = 128*n + 32*k + l (k: which of q1..q4): ql byte 64n + l + 32*(k%2), nibble
    # k//2; qh byte 32n + l, bits 2k..2k+1; scale 8n + l//16 + 2k.
    e = np.arange(256)
    n, r = e // 128, e % 128
    k, lane = r // 32, r % 32
    return (
        64 * n + lane + 32 * (k % 2),
        4 * (k // 2),
        32 * n + lane,
        2 * k,
        8 * n + lane // 16 + 2 * k,
    )


_Q6_QL, _Q6_NIB, _Q6_QH, _Q6_HSHIFT, _Q6_SCALE = _q6_k_layout()


def _q6_k(b: NDArray) -> NDArray:
    ql = b[:, 0:128]
    qh = b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(_F32)
    d = _f16(b, 208).astype(_F32)
    low = (ql[:, _Q6_QL] >> _Q6_NIB.astype(U8)) & 0x0F
    high = (qh[:, _Q6_QH] >> _Q6_HSHIFT.astype(U8)) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    result: NDArray = (d * sc)[:, _Q6_SCALE] * q.astype(_F32)
    return result


def _q8_k(b: NDArray) -> NDArray:
    d = np.ascontiguousarray(b[:, 0:4]).view("<f4")
    qs = np.ascontiguousarray(b[:, 4:260]).view(np.int8)
    result: NDArray = d * qs.astype(_F32)
    return result


_FLOAT = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q6_K": _q6_k, "Q8_K": _q8_k}
