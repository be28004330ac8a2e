"""_ggml's own conversion rules on hand-built blocks, without a GGUF file or a store.

References: the ``gguf`` package's ``gguf.quants.dequantize`` (llama.cpp's Python port of
``ggml-quants.c``) and bit patterns worked out by hand from ``ggml-common.h``'s block layouts
and MLX's packing (element ``e`` of a group in bits ``bits*e`` of a little-endian bitstream).
Whole GGUF loads of every type are in test_gguf.py.
"""

from __future__ import annotations

from typing import Any

import gguf
import mlx.core as mx
import numpy as np
import pytest

from asyncweights import _ggml
from asyncweights._ggml import TARGETS, companion_names, convert, convert_blocks, outputs
from asyncweights._gguf import GGUFTensorInfo

NDArray = np.ndarray[Any, Any]
rng = np.random.default_rng(20261130)


def tensor(ggml_type: str, rows: int, cols: int) -> GGUFTensorInfo:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return GGUFTensorInfo("blk.0.w.weight", ggml_type, (cols, rows), (rows, cols), 0,
                          rows * cols // block * size)  # fmt: skip


def f16_bytes(value: float) -> NDArray:
    return np.array([value], np.float16).view(np.uint8)


def npy(a: mx.array) -> NDArray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def test_companion_names_follow_mx_load() -> None:
    assert companion_names("blk.0.attn_q.weight") == ("blk.0.attn_q.scales", "blk.0.attn_q.biases")
    assert companion_names("token_embd") == ("token_embd.scales", "token_embd.biases")


@pytest.mark.parametrize(
    ("ggml_type", "expected"),
    [
        ("F16", [("blk.0.w.weight", "F16", (3, 256))]),
        ("Q6_K", [("blk.0.w.weight", "F32", (3, 256))]),
        ("Q4_0", [("blk.0.w.weight", "U32", (3, 32)), ("blk.0.w.scales", "F16", (3, 8)),
                  ("blk.0.w.biases", "F16", (3, 8))]),
        ("Q5_K", [("blk.0.w.weight", "U32", (3, 40)), ("blk.0.w.scales", "F32", (3, 8)),
                  ("blk.0.w.biases", "F32", (3, 8))]),
        ("Q8_0", [("blk.0.w.weight", "U32", (3, 64)), ("blk.0.w.scales", "F16", (3, 8)),
                  ("blk.0.w.biases", "F16", (3, 8))]),
    ],
)  # fmt: skip
def test_outputs_name_dtype_and_shape(
    ggml_type: str, expected: list[tuple[str, str, tuple[int, ...]]]
) -> None:
    assert outputs(tensor(ggml_type, 3, 256)) == expected


def test_affine_targets_use_groups_of_32_only() -> None:
    affine = {t.ggml_type: (t.bits, t.group_size) for t in TARGETS.values() if t.kind == "affine"}
    assert affine == {
        "Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (5, 32), "Q5_1": (5, 32), "Q8_0": (8, 32),
        "Q4_K": (4, 32), "Q5_K": (5, 32),
    }  # fmt: skip
    assert set(TARGETS).isdisjoint(_ggml.UNSUPPORTED)


def test_q4_0_nibbles_repack_into_mlx_words_by_hand() -> None:
    # ggml Q4_0: f16 d, then 16 bytes; byte j holds element j (low nibble) and j+16 (high).
    lo = np.arange(16, dtype=np.uint8)
    hi = 15 - lo
    block = np.concatenate([f16_bytes(0.5), lo | (hi << 4)])
    weight, scales, biases = convert(tensor("Q4_0", 1, 32), block)
    # Elements 0..15 = 0..15, 16..31 = 15..0; MLX packs eight 4-bit elements a word, the
    # first in the lowest bits.
    assert np.array(weight).tolist() == [[0x76543210, 0xFEDCBA98, 0x89ABCDEF, 0x01234567]]
    assert npy(scales).tolist() == [[0.5]]
    assert npy(biases).tolist() == [[-4.0]]  # -8 d
    values = mx.dequantize(weight, scales, biases, group_size=32, bits=4)
    expected = gguf.quants.dequantize(block, gguf.GGMLQuantizationType.Q4_0)
    assert npy(values).reshape(-1).tolist() == np.asarray(expected).reshape(-1).tolist()
    assert npy(values).reshape(-1).tolist() == [
        0.5 * (q - 8) for q in [*range(16), *range(15, -1, -1)]
    ]


def test_q8_0_adds_128_to_each_signed_byte() -> None:
    qs = np.array([-128, -1, 0, 1, 127, *range(-13, 14)], np.int8)
    block = np.concatenate([f16_bytes(0.25), qs.view(np.uint8)])
    weight, scales, biases = convert(tensor("Q8_0", 1, 32), block)
    packed = np.array(weight).view(np.uint8).reshape(-1)
    assert packed.tolist() == (qs.astype(np.int16) + 128).tolist()
    assert (npy(scales).item(), npy(biases).item()) == (0.25, -32.0)


def mlx_bitstream(values: list[int], bits: int) -> bytes:
    """An independent packer: a Python int as a little-endian bitstream."""
    acc = 0
    for i, v in enumerate(values):
        acc |= v << (bits * i)
    return acc.to_bytes(len(values) * bits // 8, "little")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_little_endian_bitstream(bits: int) -> None:
    q = rng.integers(0, 1 << bits, (3, 64), dtype=np.uint8)
    packed = _ggml._pack(q, bits)
    assert packed.shape == (3, 64 * bits // 8)
    for row, out in zip(q, packed, strict=True):
        assert out.tobytes() == mlx_bitstream(row.tolist(), bits)


def test_scale_min_k4_reads_six_bit_fields_by_hand() -> None:
    # get_scale_min_k4: j < 4: q[j] & 63, q[j+4] & 63; j >= 4: low/high nibble of q[j+4]
    # with the top two bits of q[j-4] / q[j] as bits 4-5.
    s = np.array(
        [[0xC1, 0x42, 0x03, 0xFF, 0x85, 0x06, 0x47, 0x3F, 0x9A, 0x00, 0xF0, 0x21]], np.uint8
    )
    sc, m = _ggml._scale_min_k4(s)
    assert sc.tolist() == [[0x01, 0x02, 0x03, 0x3F, 0x3A, 0x10, 0x00, 0x31]]
    assert m.tolist() == [[0x05, 0x06, 0x07, 0x3F, 0x29, 0x00, 0x1F, 0x02]]


def random_block_bytes(ggml_type: str, n: int) -> NDArray:
    """`n` random blocks whose f16 super-block scales are small and finite."""
    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][1]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    f16_at = {
        "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
        "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    }  # fmt: skip
    for at in f16_at[ggml_type]:
        raw[:, at : at + 2] = (
            (rng.standard_normal(n) * 0.02).astype(np.float16).view(np.uint8).reshape(n, 2)
        )
    return raw.reshape(-1)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K",
                                       "Q2_K", "Q3_K", "Q6_K"])  # fmt: skip
def test_conversion_equals_gguf_dequantize_bit_for_bit(ggml_type: str) -> None:
    info = tensor(ggml_type, 2, 512)
    raw = random_block_bytes(
        ggml_type, info.count // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0]
    )
    arrays = convert(info, raw)
    expected = np.asarray(
        gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[ggml_type]), np.float32
    ).reshape(2, 512)
    assert not np.isnan(expected).any()
    if TARGETS[ggml_type].kind == "affine":
        weight, scales, biases = arrays
        got = mx.dequantize(
            weight, scales.astype(mx.float32), biases.astype(mx.float32),
            group_size=32, bits=TARGETS[ggml_type].bits,
        )  # fmt: skip
        # Equal as numbers; only a zero's sign may differ (d*(q-8) is -0.0 for d < 0).
        assert np.array_equal(np.array(got), expected)
    else:
        (got,) = arrays
        assert got.dtype == mx.float32
        assert np.array(got).view(np.uint32).tolist() == expected.view(np.uint32).tolist()


def test_chunked_reads_cover_every_byte_once_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    info = tensor("Q4_K", 4, 1024)  # 16 blocks of 144 bytes
    raw = random_block_bytes("Q4_K", 16)
    whole = [np.array(a) for a in convert(info, raw)]
    monkeypatch.setattr(_ggml, "_CHUNK", 144 * 5)  # 5 blocks a chunk: 5 + 5 + 5 + 1
    reads: list[tuple[int, int]] = []

    def read(buffer: NDArray, at: int) -> None:
        reads.append((at, len(buffer)))
        buffer[:] = raw[at : at + len(buffer)]

    chunked = [np.array(a) for a in convert_blocks(info, read)]
    assert reads == [(0, 720), (720, 720), (1440, 720), (2160, 144)]
    for a, b in zip(whole, chunked, strict=True):
        assert a.tobytes() == b.tobytes()


def test_zero_element_tensor_reads_nothing() -> None:
    info = GGUFTensorInfo("e.weight", "Q4_0", (32, 0), (0, 32), 0, 0)

    def read(buffer: NDArray, at: int) -> None:
        raise AssertionError("read called")

    shapes = [(tuple(a.shape), a.dtype) for a in convert_blocks(info, read)]
    assert shapes == [((0, 4), mx.uint32), ((0, 1), mx.float16), ((0, 1), mx.float16)]
