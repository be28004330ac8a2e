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
llama.cpp computes them. Everything here is vectorized numpy over cache-sized chunks of
blocks, run in the loader's worker threads, writing into fresh MLX arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    "convert_blocks",
    "outputs",
    "read_raw",
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

    def copy(view: NDArray, at: int) -> None:
        view[:] = data[at : at + len(view)]

    return convert_blocks(info, copy)


def convert_blocks(info: GGUFTensorInfo, read: Callable[[NDArray, int], None]) -> list[mx.array]:
    """Convert a block-type tensor whose bytes `read` supplies, a cache-sized chunk at a time.

    Args:
        info: the tensor (its type in `TARGETS`, not ``"raw"``).
        read: ``read(buffer, at)`` fills the uint8 `buffer` with the tensor's bytes from
            offset `at` (a file read, so reading and converting stay in the CPU cache).
    """
    target = TARGETS[info.ggml_type]
    if not info.count:
        return [mx.zeros(shape, dtype=_MX[dtype]) for _, dtype, shape in outputs(info)]
    n = info.count // _BLOCK[info.ggml_type]
    size = info.nbytes // n
    # Chunks of about _CHUNK bytes keep each step's temporaries in the CPU cache (2-3x
    # faster than whole-tensor numpy passes, measured on Q6_K); results are written straight
    # into fresh MLX arrays, so no large copy holds the GIL.
    step = max(1, _CHUNK // size)
    buffer = np.empty(min(step, n) * size, U8)

    def chunks() -> Iterator[tuple[int, NDArray]]:
        for i in range(0, n, step):
            m = min(step, n - i)
            chunk = buffer[: m * size]
            read(chunk, i * size)
            yield i, chunk.reshape(m, size)

    with np.errstate(all="ignore"):  # inf/NaN scales convert as llama.cpp computes them
        return _convert_chunks(info, target, n, chunks)


def _convert_chunks(
    info: GGUFTensorInfo,
    target: Target,
    n: int,
    chunks: Callable[[], Iterator[tuple[int, NDArray]]],
) -> list[mx.array]:
    if target.kind == "float":
        array, values = _output(info.shape, mx.float32, (n, _BLOCK[info.ggml_type]))
        for i, blocks in chunks():
            values[i : i + len(blocks)] = _FLOAT[info.ggml_type](blocks)
        return [array]
    convert_chunk = _AFFINE[info.ggml_type]
    (_, _, wshape), (_, sdtype, sshape), _ = outputs(info)
    per_block = _BLOCK[info.ggml_type] * target.bits // 8
    groups = _BLOCK[info.ggml_type] // target.group_size
    weight, packed = _output(wshape, mx.uint32, (n, per_block), view=U8)
    scales, scale_view = _output(sshape, _MX[sdtype], (n, groups))
    biases, bias_view = _output(sshape, _MX[sdtype], (n, groups))
    for i, blocks in chunks():
        p, sc, bi = convert_chunk(blocks)
        packed[i : i + len(blocks)].reshape(p.shape)[...] = p  # p may be a strided view
        scale_view[i : i + len(blocks)] = sc
        bias_view[i : i + len(blocks)] = bi
    return [weight, scales, biases]


def read_raw(info: GGUFTensorInfo, read: Callable[[NDArray, int], None]) -> mx.array:
    """A raw-type tensor (F16, F32, BF16 …) read by `read` straight into a fresh MLX array,
    8 MiB at a time (``read(buffer, at)`` as for `convert_blocks`; file reads release the
    GIL)."""
    target = TARGETS[info.ggml_type]
    if not info.count:
        return mx.zeros(info.shape, dtype=_MX[target.dtype])
    # bfloat16 has no buffer format: its bytes are read through a uint16 array
    dtype = mx.uint16 if target.dtype == "BF16" else _MX[target.dtype]
    array = mx.zeros(info.shape, dtype=dtype)
    mx.eval(array)
    mem = np.frombuffer(memoryview(array), dtype=U8)  # type: ignore[arg-type, unused-ignore]
    for at in range(0, len(mem), _RAW_CHUNK):
        read(mem[at : at + _RAW_CHUNK], at)
    return array.view(mx.bfloat16) if target.dtype == "BF16" else array


_RAW_CHUNK = 8 << 20


def _output(
    shape: tuple[int, ...], dtype: mx.Dtype, rows: tuple[int, int], view: Any = None
) -> tuple[mx.array, NDArray]:
    """A fresh, evaluated MLX array and a writable numpy view of its memory as `rows`."""
    array = mx.zeros(shape, dtype=dtype)
    mx.eval(array)
    # The stubs of MLX's 3.11 wheels lack __buffer__ (3.12+ have it): the ignore may be unused.
    buffer = memoryview(array)  # type: ignore[arg-type, unused-ignore]
    mem = np.frombuffer(buffer, dtype=view or _NUMPY_OF[dtype])
    return array, mem.reshape(rows)


_NUMPY_OF = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32}
_CHUNK = 256 * 1024


_BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32}
_BLOCK.update(dict.fromkeys(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"), 256))


# ------------------------------------------------------------------------------- bit helpers


def _f16(blocks: NDArray, at: int) -> NDArray:
    """The f16 at byte `at` of every block, shape (n, 1): a view (blocks are contiguous rows
    of an even number of bytes, and every f16 of every layout sits at an even offset)."""
    return blocks.view("<f2")[:, at // 2 : at // 2 + 1]


_KEEP = np.uint64(0xF00FF00FF00FF00F)
_DOWN = np.uint64(0x00F000F000F000F0)
_UP = np.uint64(0x0F000F000F000F00)
_S4 = np.uint64(4)


def _nibbles(qs: NDArray) -> NDArray:
    """MLX 4-bit bytes for units of L bytes whose low nibbles are elements 0..L-1 and whose
    high nibbles are elements L..2L-1 (ggml's Q4_0 and Q4_K order).

    Each byte pair ``b0, b1`` (a 16-bit lane ``v`` of a uint64) becomes the byte of their
    low nibbles ``v & 0xF | (v >> 4) & 0xF0`` and the byte of their high nibbles, in place:
    ``v & 0xF00F | (v >> 4) & 0x00F0 | (v << 4) & 0x0F00``. Returns a (…, 2, L/2) view
    (low-nibble bytes, then high-nibble bytes) for the caller to copy into place.
    """
    words = qs.view("<u8")
    lanes = (words & _KEEP) | ((words >> _S4) & _DOWN) | ((words << _S4) & _UP)
    pairs = lanes.view(U8).reshape(*qs.shape[:-1], qs.shape[-1] // 2, 2)
    return np.swapaxes(pairs, -1, -2)


def _pack(q: NDArray, bits: int) -> NDArray:
    """Pack unsigned `bits`-bit values, one a byte (n, 8k), into MLX's little-endian
    bitstream (n, k*bits): eight values are one uint64 whose bytes are merged pairwise."""
    n = q.shape[0]
    x = np.ascontiguousarray(q).view("<u8")
    m16, m32 = np.uint64(0x00FF00FF00FF00FF), np.uint64(0x0000FFFF0000FFFF)
    x = (x & m16) | ((x >> np.uint64(8)) & m16) << np.uint64(bits)
    x = (x & m32) | ((x >> np.uint64(16)) & m32) << np.uint64(2 * bits)
    x = (x & np.uint64(0xFFFFFFFF)) | (x >> np.uint64(32)) << np.uint64(4 * bits)
    return x.view(U8).reshape(-1, 8)[:, :bits].reshape(n, -1)


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


def _times(d: NDArray, k: float) -> NDArray:
    """``k * d`` rounded to f16, as f16 arithmetic rounds it (the product is exact in f32)."""
    return (d.astype(_F32) * _F32(k)).astype(_F16)


def _q4_0(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]), d, _times(d, -8)


def _q4_1(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2)


def _q8_0(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    d = _f16(b, 0)
    flipped = b[:, 2:34].view("<u2") ^ np.uint16(0x8080)  # x + 128 for two's complement x
    return flipped.view(U8), d, _times(d, -128)


def _five(qs: NDArray, qh: NDArray) -> NDArray:
    high = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")
    return _pack(_split(qs) | (high << 4), 5)


def _q5_0(b: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    d = _f16(b, 0)
    return _five(b[:, 6:22], b[:, 2:6]), d, _times(d, -16)


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
    packed = _nibbles(b[:, 16:144].reshape(-1, 4, 32))  # (n, 4, 2, 16)
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
# Q2_K and Q3_K: element e = 128*h + 32*j + 16*p + l (half h, shift j, part p, lane l) is
# quant byte 32*h + 16*p + l at bits 2j..2j+1, with sub-block scale 8*h + 2*j + p (ggml's
# dequantize_row_q2_K / _q3_K). Arrays below are shaped (n, h, j, p, l): no gathers.

_SHIFT_J = (np.arange(4, dtype=U8) * 2).reshape(1, 1, 4, 1, 1)


def _two_bits(qs: NDArray) -> NDArray:
    return (qs.reshape(-1, 2, 1, 2, 16) >> _SHIFT_J) & 3


def _q2_k(b: NDArray) -> NDArray:
    sc = b[:, 0:16].reshape(-1, 2, 4, 2, 1)
    d = _f16(b, 80).astype(_F32).reshape(-1, 1, 1, 1, 1)
    dmin = _f16(b, 82).astype(_F32).reshape(-1, 1, 1, 1, 1)
    dl = d * (sc & 0x0F).astype(_F32)
    ml = dmin * (sc >> 4).astype(_F32)
    result: NDArray = dl * _two_bits(b[:, 16:80]).astype(_F32) - ml
    return result.reshape(-1, 256)


_HBIT = (
    np.arange(2, dtype=U8).reshape(1, 2, 1, 1, 1) * 4
    + np.arange(4, dtype=U8).reshape(1, 1, 4, 1, 1)
).astype(U8)
_I16 = np.arange(16)


def _q3_k(b: NDArray) -> NDArray:
    s = b[:, 96:108]
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low, then high nibbles), high 2 bits
    # from bytes 8..11 (ggml's kmask1/kmask2 unpacking), minus 32.
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    high = (s[:, 8 + _I16 % 4] >> (2 * (_I16 // 4)).astype(U8)) & 3
    sc = (low | (high << 4)).astype(np.int8) - np.int8(32)
    d = _f16(b, 108).astype(_F32).reshape(-1, 1, 1, 1, 1)
    dl = d * sc.astype(_F32).reshape(-1, 2, 4, 2, 1)
    hbit = (b[:, 0:32].reshape(-1, 1, 1, 2, 16) >> _HBIT) & 1
    q = _two_bits(b[:, 32:96]).astype(np.int8) - (np.int8(4) - np.int8(4) * hbit.astype(np.int8))
    result: NDArray = dl * q.astype(_F32)
    return result.reshape(-1, 256)


# Q6_K: element e = 128*h + 32*k + l takes ql byte 64*h + 32*(k%2) + l (nibble k//2), qh byte
# 32*h + l (bits 2k..2k+1), scale 8*h + 2*k + l//16 (ggml's dequantize_row_q6_K).


def _q6_k(b: NDArray) -> NDArray:
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)
    qh = b[:, 128:192].reshape(-1, 2, 32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(_F32)
    d = _f16(b, 208).astype(_F32)
    q = np.empty((len(b), 2, 4, 32), U8)
    for k in range(4):
        q[:, :, k] = ((ql[:, :, k % 2] >> (4 * (k // 2))) & 0x0F) | (((qh >> (2 * k)) & 3) << 4)
    scale = (d * sc).reshape(-1, 2, 4, 2, 1)
    signed = q.astype(np.int8) - np.int8(32)
    result: NDArray = scale * signed.reshape(-1, 2, 4, 2, 16).astype(_F32)
    return result.reshape(-1, 256)


def _q8_k(b: NDArray) -> NDArray:
    d = np.ascontiguousarray(b[:, 0:4]).view("<f4")
    qs = np.ascontiguousarray(b[:, 4:260]).view(np.int8)
    result: NDArray = d * qs.astype(_F32)
    return result


_FLOAT = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q6_K": _q6_k, "Q8_K": _q8_k}
