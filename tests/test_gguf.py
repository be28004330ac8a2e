"""GGUF models: strict headers, every GGML type against llama.cpp's reference, the pipeline.

GGUF files are written with llama.cpp's own ``gguf`` package (``GGUFWriter``; its
``quants.quantize`` makes Q4_0 … Q8_0 blocks); K-quant blocks are random bytes in the
documented layout with finite f16 super-block scales. The independent reference is
``gguf.quants.dequantize`` (Q8_K, which it lacks, is ``d * qs`` computed here in numpy).
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import asyncweights as aw
from asyncweights._gguf import parse_gguf, read_gguf_header
from asyncweights._manifest import Layer
from asyncweights.testing import StoreBuilder

from .conftest import wait_quiet

MODEL = "gguf-toy"
rng = np.random.default_rng(1234)

# Byte offsets of the f16 super-block scales in each block (ggml-common.h layouts).
_F16_AT = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip
BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
AFFINE = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}


def random_blocks(qtype: str, rows: int, cols: int) -> np.ndarray:
    """Random bytes for `rows` x `cols` elements of a block type, super-block scales finite
    (and small, as real weights are; either sign)."""
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    n = rows * cols // block
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in _F16_AT.get(qtype, []):
        scale = (rng.standard_normal(n) * 0.02).astype(np.float16)
        raw[:, at : at + 2] = scale.view(np.uint8).reshape(n, 2)
    if qtype == "Q8_K":
        raw[:, 0:4] = (
            (rng.standard_normal(n) * 0.02).astype(np.float32).view(np.uint8).reshape(n, 4)
        )
    return raw.reshape(rows, cols // block * size)


def reference(qtype: str, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """llama.cpp's dequantization of the blocks, float32 (rows, cols)."""
    if qtype == "Q8_K":
        b = raw.reshape(-1, 292)
        d = b[:, 0:4].copy().view(np.float32)
        return (d * b[:, 4:260].copy().view(np.int8).astype(np.float32)).reshape(rows, cols)
    out = gguf.quants.dequantize(raw, Q[qtype])
    return np.asarray(out, dtype=np.float32).reshape(rows, cols)


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[str, np.ndarray]],
    *,
    arch: str = "llama",
    extra: Any = None,
) -> Path:
    """Write a GGUF file with GGUFWriter: tensors by name -> (GGML type, data)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(2)
    writer.add_context_length(4096)
    writer.add_file_type(2)
    writer.add_token_list(["<s>", "</s>", "hé", "\u2581the"])
    writer.add_token_scores([0.0, -1.5, -2.25, -3.0])
    if extra is not None:
        extra(writer)
    for name, (qtype, data) in tensors.items():
        if qtype in ("F32", "F16", "F64", "I8", "I16", "I32", "I64"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=Q[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def npy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


# ------------------------------------------------------------------------------ conversions


@pytest.fixture(scope="module")
def all_types(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One GGUF file with a tensor of every supported type, quantized ones 3 x 512."""
    tmp = tmp_path_factory.mktemp("gguf")
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for qtype in BLOCK_TYPES:
        tensors[f"blk.0.{qtype.lower()}.weight"] = (qtype, random_blocks(qtype, 3, 512))
    floats = rng.standard_normal((5, 7)).astype(np.float32)
    tensors["f32.weight"] = ("F32", floats)
    tensors["f16.weight"] = ("F16", floats.astype(np.float16))
    tensors["f64.weight"] = ("F64", floats.astype(np.float64))
    tensors["bf16.weight"] = ("BF16", rng.integers(0, 1 << 15, (2, 9), dtype=np.uint16))
    for bits in (8, 16, 32, 64):
        info = np.iinfo(f"int{bits}")
        tensors[f"i{bits}"] = (
            "I" + str(bits),
            np.array([info.min, -1, 0, 1, info.max], f"<i{bits // 8}"),
        )
    tensors["vector"] = ("F32", np.arange(11, dtype=np.float32))
    path = write_gguf(tmp / "all.gguf", tensors)
    return path, tensors


@pytest.fixture
def all_types_store(store_root: Path, all_types: tuple[Path, Any]) -> Path:
    StoreBuilder(store_root).add_gguf_model(MODEL, weights=all_types[0])
    return store_root


async def test_every_type_equals_llama_cpp_reference(
    all_types_store: Path, all_types: tuple[Path, dict[str, Any]]
) -> None:
    weights = await aw.load_weights(MODEL, store=all_types_store)
    for name, (qtype, data) in all_types[1].items():
        info = weights.info[name]
        assert info.source_dtype == qtype
        if qtype in AFFINE:
            q = info.quantization
            assert q == aw.Quantization(qtype, "affine", AFFINE[qtype], 32)
            base = name.removesuffix(".weight")
            w = weights[name]
            assert w.dtype == mx.uint32
            assert w.shape == (3, 512 * q.bits // 32)
            got = mx.dequantize(
                w,
                weights[base + ".scales"].astype(mx.float32),
                weights[base + ".biases"].astype(mx.float32),
                group_size=q.group_size,
                bits=q.bits,
                mode=q.mode,
            )
            ref = reference(qtype, data, 3, 512)
            # Equal as numbers; only a zero's sign may differ (d*(q-8) is -0.0 for d < 0).
            assert np.array_equal(np.array(got), ref), name
            assert not np.isnan(ref).any()
        elif qtype in BLOCK_TYPES:
            assert info.quantization is None
            assert weights[name].dtype == mx.float32
            assert bits_equal(np.array(weights[name]), reference(qtype, data, 3, 512)), name
        else:
            expected = data if qtype != "BF16" else data.view(np.uint16)
            assert bits_equal(npy(weights[name]), expected), name
            assert info.quantization is None
    assert weights["bf16.weight"].dtype == mx.bfloat16
    assert weights["f64.weight"].dtype == mx.float64
    assert weights["i8"].dtype == mx.int8
    assert weights["i64"].dtype == mx.int64
    assert weights["vector"].shape == (11,)
    # model level: the affine type with the most bytes in the file (48 Q8_0 blocks of 34)
    assert weights.quantization == aw.Quantization("Q8_0", "affine", 8, 32)


async def test_q4_0_q4_1_q8_0_bit_exact_to_mx_load(tmp_path: Path, store_root: Path) -> None:
    floats = rng.standard_normal((16, 256)).astype(np.float32)
    tensors = {
        f"blk.1.{t.lower()}.weight": (t, gguf.quants.quantize(floats, Q[t]))
        for t in ("Q4_0", "Q4_1", "Q8_0")
    }
    tensors["token_embd.weight"] = ("F16", floats.astype(np.float16))
    tensors["norm.weight"] = ("F32", floats[0])
    path = write_gguf(tmp_path / "m.gguf", tensors)
    StoreBuilder(store_root).add_gguf_model(MODEL, weights=path)
    weights = await aw.load_weights(MODEL, store=store_root)
    expected = mx.load(os.fspath(path))
    assert isinstance(expected, dict)
    assert sorted(weights) == sorted(expected)
    for name, array in expected.items():
        assert weights[name].dtype == array.dtype, name
        assert bits_equal(np.array(weights[name]), np.array(array)), name


async def test_float_dtype_converts_only_float_tensors(
    all_types_store: Path, all_types: tuple[Path, dict[str, Any]]
) -> None:
    weights = await aw.load_weights(MODEL, store=all_types_store, dtype=mx.float16)
    assert weights["blk.0.q6_k.weight"].dtype == mx.float16
    assert weights["f32.weight"].dtype == mx.float16
    assert weights["blk.0.q4_k.weight"].dtype == mx.uint32
    assert weights["blk.0.q4_k.scales"].dtype == mx.float32  # companions keep theirs
    assert weights["i32"].dtype == mx.int32


@pytest.mark.parametrize(
    "qtype",
    ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS",
     "TQ1_0", "TQ2_0", "MXFP4"],
)  # fmt: skip
async def test_unsupported_types_refused_by_name_before_any_read(
    tmp_path: Path, store_root: Path, qtype: str
) -> None:
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    tensors: dict[str, tuple[str, np.ndarray]] = {
        "a.weight": ("F32", np.ones((2, 4), np.float32)),
        "blk.3.ffn_up.weight": (qtype, np.zeros((2, 256 // block * size), np.uint8)),
    }
    path = write_gguf(tmp_path / "m.gguf", tensors)
    StoreBuilder(store_root).add_gguf_model(MODEL, weights=path)
    events: list[aw.Progress] = []
    with pytest.raises(aw.UnsupportedDTypeError) as info:
        await aw.load_weights(MODEL, store=store_root, on_progress=events.append)
    err = info.value
    assert err.reason.startswith(f"GGML type {qtype} is not supported: ")
    assert err.tensor == "blk.3.ffn_up.weight"
    assert err.model == MODEL
    assert err.path == store_root / "blobs" / err.digest.replace(":", "-")  # type: ignore[union-attr]
    assert events == []  # refused while planning: not one tensor read


# ---------------------------------------------------------------------- components, metadata


@pytest.fixture
def llava(tmp_path: Path, store_root: Path) -> Path:
    main = write_gguf(
        tmp_path / "main.gguf",
        {"blk.0.attn_q.weight": ("Q4_K", random_blocks("Q4_K", 2, 256)),
         "output_norm.weight": ("F32", np.arange(4, dtype=np.float32))},
    )  # fmt: skip
    proj = write_gguf(
        tmp_path / "proj.gguf",
        {"mm.0.weight": ("F16", np.ones((3, 4), np.float16))},
        arch="clip",
    )
    StoreBuilder(store_root).add_gguf_model("llava", weights=main, projector=proj)
    return store_root


async def test_projector_is_a_component(llava: Path) -> None:
    model = await aw.ModelStore(llava).open("llava")
    assert model.components == ["model", "projector"]
    projector = await aw.load_weights("llava", "projector", store=llava)
    assert list(projector) == ["mm.0.weight"]
    assert projector.component == "projector"
    assert projector.metadata is not None
    assert projector.metadata["general.architecture"] == "clip"
    main = await aw.load_weights("llava", "model", store=llava)
    assert list(main) == [
        "blk.0.attn_q.weight", "blk.0.attn_q.scales", "blk.0.attn_q.biases",
        "output_norm.weight",
    ]  # fmt: skip
    everything = await aw.load_weights("llava", store=llava)
    assert list(everything) == [*main, "projector/mm.0.weight"]
    with pytest.raises(aw.ComponentNotFoundError) as info:
        await aw.load_weights("llava", "vision", store=llava)
    assert str(info.value) == "no component 'vision'; the model has: 'model', 'projector' " \
        "(model 'llava')"  # fmt: skip


async def test_metadata_and_lazy_tokenizer(llava: Path) -> None:
    weights = await aw.load_weights("llava", "model", store=llava)
    meta = weights.metadata
    assert meta is not None
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2
    assert meta["llama.context_length"] == 4096
    tokens = meta["tokenizer.ggml.tokens"]
    assert isinstance(tokens, aw.GGUFArray)
    assert tokens.item_type == "STRING"
    assert len(tokens) == 4
    assert tokens.tolist() == ["<s>", "</s>", "hé", "\u2581the"]
    scores = meta["tokenizer.ggml.scores"]
    assert scores.item_type == "FLOAT32"
    assert scores.numpy().tolist() == [0.0, -1.5, -2.25, -3.0]
    model = await aw.ModelStore(llava).open("llava")
    assert (await model.gguf_metadata())["general.architecture"] == "llama"
    assert (await model.gguf_metadata("projector"))["general.architecture"] == "clip"


def test_metadata_value_types(tmp_path: Path) -> None:
    def extra(w: gguf.GGUFWriter) -> None:
        w.add_uint8("t.u8", 255)
        w.add_int8("t.i8", -128)
        w.add_uint16("t.u16", 65535)
        w.add_int16("t.i16", -32768)
        w.add_uint32("t.u32", 2**32 - 1)
        w.add_int32("t.i32", -(2**31))
        w.add_float32("t.f32", 0.25)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "ünï")
        w.add_uint64("t.u64", 2**64 - 1)
        w.add_int64("t.i64", -(2**63))
        w.add_float64("t.f64", 1e300)
        w.add_array("t.nested", [[1, 2], [3]])
        w.add_array("t.bools", [True, False])

    path = write_gguf(tmp_path / "m.gguf", {"x": ("F32", np.zeros(4, np.float32))}, extra=extra)
    header = read_gguf_header(path, expected_size=path.stat().st_size)
    m = header.metadata
    assert [m[k] for k in ("t.u8", "t.i8", "t.u16", "t.i16", "t.u32", "t.i32")] == [
        255, -128, 65535, -32768, 2**32 - 1, -(2**31),
    ]  # fmt: skip
    assert m["t.f32"] == 0.25
    assert m["t.bool"] is True
    assert m["t.str"] == "ünï"
    assert m["t.u64"] == 2**64 - 1
    assert m["t.i64"] == -(2**63)
    assert m["t.f64"] == 1e300
    nested = m["t.nested"]
    assert nested.item_type == "ARRAY"
    assert [inner.tolist() for inner in nested] == [[1, 2], [3]]
    assert m["t.bools"].tolist() == [True, False]
    assert header.version == 3
    assert header.alignment == 32
    assert header.tensors["x"].dims == (4,)
    assert header.tensors["x"].shape == (4,)


def test_dims_reversed_into_mlx_shape(tmp_path: Path) -> None:
    data = np.zeros((2, 3, 5), np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"t": ("F32", data)})
    info = read_gguf_header(path, expected_size=None).tensors["t"]
    assert info.dims == (5, 3, 2)
    assert info.shape == (2, 3, 5)
    assert info.nbytes == 120


# --------------------------------------------------------------------------- strict headers


def kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v


def kv_u32(key: str, value: int, vtype: int = 4) -> bytes:
    k = key.encode()
    fmt = {4: "<I", 5: "<i", 10: "<Q"}[vtype]
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + struct.pack(fmt, value)


def tensor_info(name: str, dims: Sequence[int], ggml_type: int, offset: int) -> bytes:
    n = name.encode()
    return (
        struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)
    )  # fmt: skip


def gguf_bytes(
    tensors: Sequence[tuple[str, Sequence[int], int, int]] = (("a", (8,), 0, 0),),
    kvs: Sequence[bytes] = (),
    *,
    data: int | None = None,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
) -> bytes:
    """A GGUF file built by hand: header, padding to `alignment`, `data` zero bytes."""
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    head += b"".join(kvs) + b"".join(tensor_info(*t) for t in tensors)
    head += b"\0" * (-len(head) % alignment)
    if data is None:
        data = max((t[3] + 4 * int(np.prod(t[1])) for t in tensors if t[2] == 0), default=0)
    return head + b"\0" * data


def parse(data: bytes) -> Any:
    return parse_gguf(data, len(data))


def header_error(data: bytes) -> aw.HeaderError:
    with pytest.raises(aw.HeaderError) as info:
        parse(data)
    return info.value


def test_hand_built_file_parses() -> None:
    kvs = [kv_string("general.name", "tiny"), kv_u32("general.alignment", 64)]
    f = parse(gguf_bytes([("a", (8,), 0, 0), ("b", (2, 4), 1, 64)], kvs, data=80, alignment=64))
    assert f.metadata == {"general.name": "tiny", "general.alignment": 64}
    assert f.alignment == 64
    assert f.data_start % 64 == 0
    assert [(t.name, t.shape, t.offset, t.nbytes) for t in f.tensors.values()] == [
        ("a", (8,), 0, 32), ("b", (4, 2), 64, 16),
    ]  # fmt: skip


def test_version_2_is_read_like_version_3() -> None:
    f = parse(gguf_bytes(version=2))
    assert f.version == 2
    assert list(f.tensors) == ["a"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGML" + bytes(28), "not a GGUF file: magic b'GGML', expected b'GGUF'"),
        (b"GG", "GGUF header cut short: magic at byte 0 needs 4 bytes, the file has 2"),
        (gguf_bytes(version=1), "GGUF version 1 is not supported (only 2 and 3)"),
        (gguf_bytes(version=4), "GGUF version 4 is not supported (only 2 and 3)"),
        (
            gguf_bytes(version=3 << 24),
            "big-endian GGUF file (version reads 0x03000000, 3 byte-swapped): only "
            "little-endian files are supported",
        ),
        (gguf_bytes(n_tensors=2**40), "tensor count 1099511627776 is over the limit of 1048576"),
        (gguf_bytes(n_kv=2**33), "metadata count 8589934592 is over the limit of 1048576"),
        (
            b"GGUF" + struct.pack("<IQQ", 3, 0, 1),
            "GGUF header cut short: length of metadata key 0 at byte 24 needs 8 bytes, "
            "the file has 24",
        ),
        (
            gguf_bytes(kvs=[struct.pack("<Q", 1) + b"k" + struct.pack("<IQ", 8, 2**63 - 1)]),
            "metadata 'k' is 9223372036854775807 bytes long, over the limit of 67108864",
        ),
        (
            gguf_bytes(kvs=[struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**40)]),
            "metadata 'k': array of 1099511627776 UINT32 items does not fit in the file "
            "(limit 268435456 items)",
        ),
        (
            gguf_bytes(kvs=[struct.pack("<Q", 1) + b"k" + struct.pack("<I", 13)]),
            "metadata 'k' has unknown GGUF value type 13",
        ),
        (
            gguf_bytes(kvs=[struct.pack("<Q", 1) + b"k" + struct.pack("<IB", 7, 2)]),
            "metadata 'k': BOOL value 2 is neither 0 nor 1",
        ),
        (gguf_bytes(kvs=[kv_u32("k", 1), kv_u32("k", 2)]), "duplicate metadata key 'k'"),
        (gguf_bytes(kvs=[kv_u32("", 1)]), "metadata key 0 is empty"),
        (
            gguf_bytes(kvs=[kv_u32("general.alignment", 32, vtype=5)]),
            "general.alignment must be UINT32, not INT32",
        ),
        (
            gguf_bytes(kvs=[kv_u32("general.alignment", 48)]),
            "general.alignment 48 is not a power of 2",
        ),
        (
            gguf_bytes([("a", (8,), 0, 0)], data=32 + 32),
            "32 trailing bytes after the last tensor (at most 31 of padding allowed)",
        ),
    ],
)
def test_header_rules(data: bytes, message: str) -> None:
    assert header_error(data).reason == message


@pytest.mark.parametrize(
    ("tensors", "data", "message", "tensor"),
    [
        ([("a", (8,), 0, 16)], 64, "offset 16 is not a multiple of 32", "a"),
        (
            [("a", (16,), 0, 0), ("b", (8,), 0, 32)], 64,
            "data [32, 64) overlaps tensor 'a'", "b",
        ),
        ([("a", (8,), 0, 32)], 32, "data [32, 64) runs past the end of the 32-byte data section",
         "a"),
        ([("a", (8,), 99, 0)], 32, "unknown GGML type 99", "a"),
        ([("a", (48, 2), 2, 0)], 64,
         "row of 48 elements is not a multiple of the Q4_0 block size 32", "a"),
        ([("a", (1, 1, 1, 1, 1), 0, 0)], 32, "5 dimensions, GGML allows at most 4", "a"),
        ([("a", (2**31, 1), 0, 0)], 32, "dimensions [2147483648, 1] are not all below 2^31",
         "a"),
        ([("a", (8,), 0, 0), ("a", (8,), 0, 32)], 64, "duplicate tensor name", "a"),
        ([("n" * 64, (8,), 0, 0)], 32, "tensor name is 64 bytes, GGML allows fewer than 64",
         "n" * 64),
    ],
)  # fmt: skip
def test_tensor_rules(
    tensors: list[tuple[str, tuple[int, ...], int, int]], data: int, message: str, tensor: str
) -> None:
    err = header_error(gguf_bytes(tensors, data=data))
    assert (err.reason, err.tensor) == (message, tensor)


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf", {"blk.0.w.weight": ("Q4_K", random_blocks("Q4_K", 1, 256))}
    )
    data = path.read_bytes()
    header = parse(data)
    (info,) = header.tensors.values()
    end = header.data_start + info.offset + info.nbytes
    assert 0 < len(data) - end < 32  # GGUFWriter pads the last tensor: cutting padding is fine
    for cut in range(end):
        with pytest.raises(aw.HeaderError):
            parse(data[:cut])
    for cut in range(end, len(data)):
        assert parse(data[:cut]).tensors == header.tensors


async def test_errors_name_model_digest_and_file(store_root: Path) -> None:
    builder = StoreBuilder(store_root)
    builder.add_gguf_model(MODEL, weights=gguf_bytes([("a", (8,), 0, 16)], data=64))
    with pytest.raises(aw.HeaderError) as info:
        await aw.load_weights(MODEL, store=store_root)
    err = info.value
    assert err.digest is not None
    path = store_root / "blobs" / err.digest.replace(":", "-")
    assert str(err) == (
        f"offset 16 is not a multiple of 32 (model {MODEL!r}, tensor 'a', blob {err.digest}, "
        f"file {str(path)!r})"
    )


async def test_size_must_equal_the_manifests(store_root: Path) -> None:
    data = gguf_bytes()
    manifest = StoreBuilder(store_root).add_gguf_model(MODEL, weights=data)
    text = manifest.read_text().replace(f'"size":{len(data)}', f'"size":{len(data) + 1}')
    manifest.write_text(text)
    with pytest.raises(aw.SizeMismatchError) as info:
        await aw.load_weights(MODEL, store=store_root)
    assert info.value.reason == f"blob is {len(data)} bytes but the manifest says {len(data) + 1}"


# ----------------------------------------------------------------------- pipeline behaviour


async def test_verify_hashes_the_whole_blob(store_root: Path, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"a": ("F32", np.ones((4, 8), np.float32))})
    StoreBuilder(store_root).add_gguf_model(MODEL, weights=path)
    weights = await aw.load_weights(MODEL, store=store_root, verify=True)
    assert np.array_equal(np.array(weights["a"]), np.ones((4, 8), np.float32))
    (blob,) = [
        p for p in (store_root / "blobs").iterdir() if p.stat().st_size == path.stat().st_size
    ]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # a tensor byte: the header still validates
    blob.write_bytes(bytes(data))
    await aw.load_weights(MODEL, store=store_root)  # not verifying: loads the changed byte
    with pytest.raises(aw.DigestMismatchError):
        await aw.load_weights(MODEL, store=store_root, verify=True)


async def test_stream_progress_and_groups(
    all_types_store: Path, all_types: tuple[Path, dict[str, Any]]
) -> None:
    events: list[aw.Progress] = []
    limits = aw.Limits(group_bytes=4096, progress_interval=0)
    names = []
    async with aw.stream_weights(
        MODEL, store=all_types_store, on_progress=events.append, limits=limits
    ) as tensors:
        async for tensor in tensors:
            names.append(tensor.name)
            assert tensor.info.name == tensor.name
    full = await aw.load_weights(MODEL, store=all_types_store)
    assert sorted(names) == sorted(full)
    assert events[-1].phase == "done"
    assert events[-1].completed_bytes == events[-1].total_bytes == full.nbytes
    assert events[-1].completed_tensors == len(full)


async def test_weight_cache_loads_gguf(all_types_store: Path) -> None:
    async with aw.WeightCache(store=all_types_store) as cache, cache.lease(MODEL) as weights:
        assert weights["blk.0.q4_0.weight"].dtype == mx.uint32


def sparse_gguf(path: Path, tensors: int, each: int) -> Path:
    """A GGUF file of `tensors` F16 tensors of `each` bytes whose data is a hole."""
    elems = each // 2
    infos = [(f"blk.{i}.ffn_up.weight", (elems // 1024, 1024), 1, i * each) for i in range(tensors)]
    head = gguf_bytes([(n, d, t, o) for n, d, t, o in infos], data=0)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + tensors * each)
    return path


def sparse_model(store_root: Path, name: str, tensors: int, each: int) -> Path:
    """A GGUF model of `tensors` F16 tensors of `each` bytes that takes no disk space. Its
    blob's file name is not the sha256 of its bytes (hashing gigabytes would dominate the
    test): loading without `verify` never hashes."""
    builder = StoreBuilder(store_root)
    fake = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
    path = sparse_gguf(store_root / "blobs" / fake.replace(":", "-"), tensors, each)
    config = builder.add_raw_config({"model_format": "gguf", "file_type": "F16"})
    layer = Layer("application/vnd.ollama.image.model", fake, path.stat().st_size, "")
    builder.write_manifest(name, [layer], config=config)
    return store_root


@pytest.fixture
def sparse_store(store_root: Path) -> Path:
    return sparse_model(store_root, "big", 48, 64 << 20)  # 3 GiB


async def test_header_only_on_a_multi_gigabyte_blob(sparse_store: Path) -> None:
    model = await aw.ModelStore(sparse_store).open("big")
    assert await model.gguf_metadata() == {}
    assert model.components == ["model"]
    with pytest.raises(aw.BudgetError) as info:
        await aw.load_weights("big", store=sparse_store, limits=aw.Limits(max_bytes=1 << 30))
    assert info.value.reason == f"load needs {48 * 64 << 20} bytes, over the budget of {1 << 30}"


async def test_cancel_mid_blob_frees_everything(sparse_store: Path) -> None:
    mx.clear_cache()
    before = mx.get_active_memory()
    seen = 0
    with anyio.CancelScope() as scope:
        async with aw.stream_weights("big", store=sparse_store) as tensors:
            async for tensor in tensors:
                seen += 1
                assert tensor.array.shape == (1024, 32768)
                del tensor
                if seen == 2:
                    scope.cancel()
    assert scope.cancelled_caught
    assert seen == 2
    wait_quiet(sparse_store)
    mx.clear_cache()
    assert mx.get_active_memory() <= before


# ------------------------------------------------------------------------------------- CLI


def test_cli_show_ls_load(llava: Path, tmp_path: Path) -> None:
    from .cli_support import cli, ok_json

    facts = ok_json(cli("show", "--store", str(llava), "llava", "--json", tmp=tmp_path))
    assert facts["kind"] == "gguf"
    assert facts["gguf"] == {
        "model": {
            "architecture": "llama",
            "parameters": 256 * 2 + 4,
            "file_type": "Q4_0",
            "version": 3,
            "tensors": 2,
            "tensor_types": {"F32": 1, "Q4_K": 1},
        },
        "projector": {
            "architecture": "clip",
            "parameters": 12,
            "file_type": "Q4_0",
            "version": 3,
            "tensors": 1,
            "tensor_types": {"F16": 1},
        },
    }
    text = cli("show", "--store", str(llava), "llava", tmp=tmp_path).stdout.splitlines()
    assert (
        "gguf          model: architecture llama, 516 parameters, file type Q4_0, GGUF v3, "
        "2 tensors"
    ) in text
    assert ["model", "Q4_K", "1", "288", "B"] in [line.split() for line in text]
    rows = ok_json(cli("ls", "--store", str(llava), "--json", tmp=tmp_path))["models"]
    assert [(r["name"], r["kind"]) for r in rows] == [("llava:latest", "gguf")]
    loaded = ok_json(
        cli("load", "--store", str(llava), "llava", "-c", "model", "--verify", "--json",
            tmp=tmp_path)
    )  # fmt: skip
    assert loaded["tensors"] == 4


def test_cli_show_lists_types_it_cannot_load(tmp_path: Path, store_root: Path) -> None:
    from .cli_support import cli, ok_json

    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    path = write_gguf(
        tmp_path / "m.gguf",
        {"blk.0.ffn_up.weight": ("IQ2_XXS", np.zeros((2, 256 // block * size), np.uint8))},
    )
    StoreBuilder(store_root).add_gguf_model(MODEL, weights=path)
    facts = ok_json(cli("show", "--store", str(store_root), MODEL, "--json", tmp=tmp_path))
    assert facts["gguf"]["model"]["tensor_types"] == {"IQ2_XXS": 1}


async def test_streaming_a_big_blob_keeps_memory_bounded(store_root: Path) -> None:
    """768 MiB streamed tensor by tensor: MLX memory never holds more than the groups in
    flight (2 workers, 1 buffered, the consumer's tensor) of 32 MiB each, plus slack."""
    sparse_model(store_root, "big", 24, 32 << 20)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    count = 0
    async with aw.stream_weights("big", store=store_root) as tensors:
        async for tensor in tensors:
            count += 1
            assert tensor.info.source_dtype == "F16"
            del tensor
    assert count == 24
    assert mx.get_peak_memory() - before <= 6 * (32 << 20)


async def test_degenerate_scales_match_mx_load(tmp_path: Path, store_root: Path) -> None:
    """Infinite and NaN f16 scales, and scales whose f16 bias overflows (|d| = 1000: -128d and
    -8d are beyond f16 for Q8_0), convert as mx.load converts them, without warnings."""
    tensors = {}
    for qtype, size in (("Q4_0", 18), ("Q8_0", 34)):
        raw = random_blocks(qtype, 4, 64).reshape(-1, size)
        special = np.array([np.inf, -np.inf, np.nan, 1000.0, -0.0, 6e-8, 1.0, 2.0], np.float16)
        raw[:, 0:2] = special.view(np.uint8).reshape(8, 2)
        tensors[f"blk.0.{qtype.lower()}.weight"] = (qtype, raw.reshape(4, -1))
    path = write_gguf(tmp_path / "m.gguf", tensors)
    StoreBuilder(store_root).add_gguf_model(MODEL, weights=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = await aw.load_weights(MODEL, store=store_root)
    expected = mx.load(os.fspath(path))
    assert isinstance(expected, dict)
    for name, array in expected.items():
        ours, theirs = np.array(weights[name]), np.array(array)
        if ours.dtype == np.float16:
            # NaN payloads differ (MLX's f16 arithmetic makes 0x7D00 of 0x7E00): NaN where
            # mx.load has NaN, every other value bit for bit
            nan = np.isnan(theirs)
            assert np.array_equal(np.isnan(ours), nan), name
            ours, theirs = ours[~nan], theirs[~nan]
        assert bits_equal(ours, theirs), name
