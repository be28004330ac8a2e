from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import ml_dtypes  # importing it registers bfloat16 with numpy, for safe_open
import mlx.core as mx
import msgspec
import numpy as np
import pytest
import safetensors
from safetensors import safe_open

from asyncweights._header import DTYPE_SIZES
from asyncweights._manifest import (
    CONFIG_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    TENSOR_MEDIA_TYPE,
    Layer,
    build_manifest,
    decode_manifest,
)
from asyncweights._writer import (
    Blob,
    RawTensor,
    Style,
    blob_path,
    build_config,
    encode_header,
    encode_json,
    encode_safetensors,
    manifest_path,
    tensor_from_array,
    write_blob,
    write_json_blob,
    write_manifest,
    write_tensor_blob,
)

NORM_DIGEST = "sha256:5566cce8d6205a2056a24af417d0f47a300685c2255c704ac8ec91bcb8e0e18f"
E1_DIGEST = "sha256:9bac9e0065ca6ae0ac6dccee54f8fe8756977918751ae3462ba4469818f1bff6"
NORM_DATA = bytes.fromhex("803f") * 4 + bytes.fromhex("003f") * 4
WORDS = bytes.fromhex("10325476") * 32
Q = "transformer/blocks.0.attn.to_q.weight"


def blob_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "blobs"))


def read_back(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Decode a blob with the safetensors package: name -> (dtype, shape, raw bytes)."""
    entries: list[tuple[str, dict[str, Any]]] = safetensors.deserialize(path.read_bytes())  # type: ignore[no-untyped-call]
    return {name: (t["dtype"], t["shape"], bytes(t["data"])) for name, t in entries}


def load_mlx(path: Path) -> dict[str, mx.array]:
    """Load a blob with MLX's own reader."""
    return cast("dict[str, mx.array]", mx.load(str(path), format="safetensors"))


def test_go_bf16_blob_is_format_8_2_byte_for_byte(tmp_path: Path) -> None:
    blob = write_tensor_blob(tmp_path, [RawTensor("data", "BF16", (2, 4), NORM_DATA)], style="go")
    assert blob == Blob(NORM_DIGEST, 88)
    data = blob_path(tmp_path, NORM_DIGEST).read_bytes()
    header = b'{"data":{"dtype":"BF16","shape":[2,4],"data_offsets":[0,16]}}   '
    assert data == (64).to_bytes(8, "little") + header + NORM_DATA
    assert blob_files(tmp_path) == ["sha256-" + NORM_DIGEST[7:]]


def test_e0_quantized_set_is_format_8_3(tmp_path: Path) -> None:
    scale_header = (
        b'{"__metadata__":null,"data":{"data_offsets":[0,16],"dtype":"BF16","shape":[4,2]}}'
    )
    cases = [
        (
            RawTensor("data", "U32", (4, 8), WORDS),
            "f62633f1b3f7fadae519f4df0a8634d939767ffe0b6812915e6f796fb99beae9",
            b'{"__metadata__":null,"data":{"data_offsets":[0,128],"dtype":"U32","shape":[4,8]}}',
        ),
        (
            RawTensor("data", "BF16", (4, 2), b"\x00\x3e" * 8),
            "95634a4c0324644544377b6cb9de14c44ada0bcae4d793fdf86d6952c911ff56",
            scale_header,
        ),
        (
            RawTensor("data", "BF16", (4, 2), b"\x80\xbf" * 8),
            "41646e116a0bc4b87d2e7eb97f571fc4ef1653e3b3b81eb39648bc88dddfb4ca",
            scale_header,
        ),
    ]
    for tensor, digest, header in cases:
        blob = write_tensor_blob(tmp_path, [tensor], style="mlx")
        assert blob == Blob("sha256:" + digest, 89 + tensor.nbytes)
        data = blob_path(tmp_path, blob.digest).read_bytes()
        assert data == (81).to_bytes(8, "little") + header + bytes(cast("bytes", tensor.data))


def test_e1_combined_blob_is_format_8_4(tmp_path: Path) -> None:
    tensors = [
        RawTensor(Q, "U32", (4, 8), WORDS),
        RawTensor(Q + ".scale", "BF16", (4, 1), b"\x00\x3e" * 4),
        RawTensor(Q + ".bias", "BF16", (4, 1), b"\x80\xbf" * 4),
    ]
    meta = {"quant_type": "int4", "group_size": "64"}
    blob = write_tensor_blob(tmp_path, tensors, style="mlx", metadata=meta)
    assert blob == Blob(E1_DIGEST, 504)
    data = blob_path(tmp_path, E1_DIGEST).read_bytes()
    header = (
        '{"__metadata__":{"group_size":"64","quant_type":"int4"},'
        f'"{Q}":{{"data_offsets":[0,128],"dtype":"U32","shape":[4,8]}},'
        f'"{Q}.bias":{{"data_offsets":[136,144],"dtype":"BF16","shape":[4,1]}},'
        f'"{Q}.scale":{{"data_offsets":[128,136],"dtype":"BF16","shape":[4,1]}}}}'
    ).encode()
    assert data[:8] == (352).to_bytes(8, "little")
    assert data[8:360] == header
    assert data[360:] == WORDS + b"\x00\x3e" * 4 + b"\x80\xbf" * 4


def test_e1_norm_blob_is_104_bytes_with_6_spaces() -> None:
    data = encode_safetensors(
        [RawTensor("model.norm.weight", "BF16", (2, 4), NORM_DATA)], style="go"
    )
    assert len(data) == 104
    assert data[:8] == (80).to_bytes(8, "little")
    assert data[82:88] == b" " * 6
    assert data[81:82] == b"}"


def test_config_and_json_layers_are_format_8_1(tmp_path: Path) -> None:
    config = build_config(capabilities=["image"], requires="0.14.0")
    blob = write_json_blob(tmp_path, config)
    assert blob == Blob(
        "sha256:c86d08128417d55cf355f5a7a1d18945f3678f7a639302f5cb19d4c309de92ee", 209
    )
    index = {
        "architecture": "ZImagePipeline",
        "parameter_count": 264,
        "quantization": "Q4",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    blob = write_json_blob(tmp_path, encode_json(index, indent=4))
    assert blob == Blob(
        "sha256:31b7cc58110adea99f5ac1b7ef1a7abaeb719ea46109bd77361678b36d6fd8cd", 481
    )
    te = {"torch_dtype": "bfloat16", "hidden_size": 4, "architectures": ["Qwen3Model"]}
    blob = write_json_blob(tmp_path, encode_json(te, newline=True))
    assert blob == Blob(
        "sha256:66488e0d1f6f0f8eab4cda5d3a3bd0cb7468d2983479fe5c4d297f13a04a36aa", 74
    )


def test_config_with_draft_and_file_type() -> None:
    draft = {"model_format": "safetensors", "tensor_prefix": "draft."}
    decoded = json.loads(build_config(file_type="int4", draft=draft))
    assert decoded["file_type"] == "int4"
    assert decoded["capabilities"] == ["completion"]
    assert decoded["requires"] == "0.19.0"
    assert decoded["draft"] == draft


def test_manifest_is_one_compact_line(tmp_path: Path) -> None:
    config = Layer(CONFIG_MEDIA_TYPE, "sha256:" + "c" * 64, 209)
    layers = [
        Layer(TENSOR_MEDIA_TYPE, NORM_DIGEST, 88, "text_encoder/model.norm.weight"),
        Layer(JSON_MEDIA_TYPE, "sha256:" + "a" * 64, 74, "text_encoder/config.json"),
    ]
    manifest = build_manifest(config, layers)
    path = write_manifest(tmp_path, "toy:latest", manifest)
    assert path == tmp_path / "manifests/registry.ollama.ai/library/toy/latest"
    text = path.read_text()
    assert text.endswith("}\n")
    assert text.count("\n") == 1
    assert " " not in text
    assert text.startswith(
        '{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
        '"config":{"mediaType":"application/vnd.docker.container.image.v1+json",'
    )
    assert json.loads(text) == msgspec.to_builtins(manifest)
    # The reader decodes what the writer wrote into the same Struct.
    assert decode_manifest(text.encode()) == manifest
    assert json.loads(text)["config"] == {
        "mediaType": CONFIG_MEDIA_TYPE,
        "digest": "sha256:" + "c" * 64,
        "size": 209,
    }
    assert list(json.loads(text)["layers"][0]) == ["mediaType", "digest", "size", "name"]
    assert sorted(os.listdir(path.parent)) == ["latest"]


def test_manifest_is_replaced_atomically(tmp_path: Path) -> None:
    write_manifest(tmp_path, "ns/m:t", b"old\n")
    path = write_manifest(tmp_path, "ns/m:t", b"new\n")
    assert path.read_bytes() == b"new\n"
    assert os.listdir(path.parent) == ["t"]


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("m", "registry.ollama.ai/library/m/latest"),
        ("m:t", "registry.ollama.ai/library/m/t"),
        ("ns/m:t", "registry.ollama.ai/ns/m/t"),
        ("host/ns/m:t", "host/ns/m/t"),
        ("host:5000/ns/m", "host:5000/ns/m/latest"),
        ("https://host/ns/m:t", "host/ns/m/t"),
    ],
)
def test_manifest_path_follows_name_grammar(name: str, parts: str) -> None:
    assert manifest_path("/r", name) == Path("/r/manifests", parts)


ALL_DTYPES = sorted(DTYPE_SIZES)


@pytest.mark.parametrize("style", ["go", "mlx"])
def test_every_dtype_reads_back_bit_exact(tmp_path: Path, style: Style) -> None:
    tensors = []
    for i, dtype in enumerate(ALL_DTYPES):
        n = DTYPE_SIZES[dtype] * 6
        data = (
            bytes([0, 1, 1, 0, 1, 0]) if dtype == "BOOL" else bytes((i + j) % 256 for j in range(n))
        )
        tensors.append(RawTensor(f"t.{dtype}", dtype, (2, 3), data))
    tensors.append(RawTensor("t.scalar", "F32", (), b"\x00\x00\x80\x3f"))
    tensors.append(RawTensor("t.empty", "F16", (0, 4), b""))
    blob = write_tensor_blob(tmp_path, tensors[::-1], style=style, metadata={"k": "v"})
    path = blob_path(tmp_path, blob.digest)
    assert path.stat().st_size == blob.size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == blob.digest[7:]
    assert read_back(path) == {t.name: (t.dtype, list(t.shape), t.data) for t in tensors}
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"k": "v"}
        bf16 = f.get_tensor("t.BF16")
    assert bf16.dtype == ml_dtypes.bfloat16
    assert bf16.tobytes() == tensors[ALL_DTYPES.index("BF16")].data
    loaded = load_mlx(path)
    assert sorted(loaded) == sorted(t.name for t in tensors)
    for t in tensors:
        assert bytes(memoryview(loaded[t.name])) == t.data, t.name  # type: ignore[arg-type]
        assert tuple(loaded[t.name].shape) == t.shape


def test_data_order_follows_the_given_order(tmp_path: Path) -> None:
    tensors = [RawTensor(k, "U8", (2,), k.encode()) for k in ("zz", "mm", "aa")]
    header = encode_header(tensors, style="mlx")
    decoded = json.loads(header[8:])
    assert list(decoded) == ["__metadata__", "aa", "mm", "zz"]
    assert decoded["zz"]["data_offsets"] == [0, 2]
    assert decoded["aa"]["data_offsets"] == [4, 6]
    assert encode_safetensors(tensors, style="mlx").endswith(b"zzmmaa")


def test_go_header_padding_and_metadata_placement() -> None:
    t = RawTensor("a", "U8", (1,), b"x")
    plain = encode_header([t], style="go")
    assert b"__metadata__" not in plain
    assert len(plain) % 8 == 0
    with_meta = encode_header(
        [RawTensor("A", "U8", (1,), b"x"), t], style="go", metadata={"q": "1"}
    )
    # Keys sort by byte: an upper-case name comes before "__metadata__", a lower-case one after.
    body = json.loads(with_meta[8:])
    assert list(body) == ["A", "__metadata__", "a"]
    assert len(with_meta) % 8 == 0
    assert encode_header([t], style="mlx")[8:] == (
        b'{"__metadata__":null,"a":{"data_offsets":[0,1],"dtype":"U8","shape":[1]}}'
    )


def test_tensor_from_array_handles_views_and_dtypes(tmp_path: Path) -> None:
    base = mx.arange(12, dtype=mx.bfloat16).reshape(3, 4)
    t = tensor_from_array("w", base.T)
    assert (t.dtype, t.shape, t.nbytes) == ("BF16", (4, 3), 24)
    blob = write_tensor_blob(tmp_path, [t], style="go")
    loaded = load_mlx(blob_path(tmp_path, blob.digest))["w"]
    assert loaded.dtype == mx.bfloat16
    assert mx.array_equal(loaded, base.T).item()
    assert (
        tensor_from_array("s", mx.zeros((2,), dtype=mx.uint8), dtype="F8_E4M3").dtype == "F8_E4M3"
    )
    with pytest.raises(ValueError, match="float64"):
        tensor_from_array("d", mx.zeros((2,), dtype=mx.float64))
    with pytest.raises(ValueError, match="does not fit"):
        tensor_from_array("d", mx.zeros((2,), dtype=mx.uint8), dtype="F32")


def test_invalid_tensors_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        RawTensor("x", "F64", (1,), b"\x00" * 8)
    with pytest.raises(ValueError, match="negative"):
        RawTensor("x", "U8", (-1,), b"")
    t = RawTensor("x", "U8", (1,), b"x")
    with pytest.raises(ValueError, match="duplicate or reserved"):
        encode_header([t, t], style="go")
    with pytest.raises(ValueError, match="duplicate or reserved"):
        encode_header([RawTensor("__metadata__", "U8", (1,), b"x")], style="mlx")
    with pytest.raises(ValueError, match="does not match 2 bytes"):
        encode_safetensors([RawTensor("x", "U8", (2,), b"abc")], style="go")
    with pytest.raises(ValueError, match="invalid digest"):
        blob_path("/r", "sha256:../../etc")


def test_chunked_data_streams_like_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 16

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    streamed = write_tensor_blob(tmp_path, [RawTensor("x", "U32", (1024,), chunks())], style="go")
    whole = write_tensor_blob(tmp_path, [RawTensor("x", "U32", (1024,), data)], style="go")
    assert streamed == whole
    assert blob_files(tmp_path) == ["sha256-" + whole.digest[7:]]


def test_dedup_keeps_one_blob_and_no_temp(tmp_path: Path) -> None:
    first = write_blob(tmp_path, [b"same bytes"])
    path = blob_path(tmp_path, first.digest)
    inode = path.stat().st_ino
    second = write_blob(tmp_path, [b"same ", b"bytes"])
    assert first == second == Blob("sha256:" + hashlib.sha256(b"same bytes").hexdigest(), 10)
    assert path.stat().st_ino == inode
    assert blob_files(tmp_path) == [path.name]
    assert path.stat().st_mode & 0o777 == 0o644


def test_error_mid_write_leaves_no_blob_and_no_temp(tmp_path: Path) -> None:
    def failing() -> Iterator[bytes]:
        yield b"\x00" * 4096
        raise OSError("disk on fire")

    tensors = [RawTensor("a", "U8", (8,), b"\x01" * 8), RawTensor("b", "U8", (8192,), failing())]
    with pytest.raises(OSError, match="disk on fire"):
        write_tensor_blob(tmp_path, tensors, style="mlx")
    assert blob_files(tmp_path) == []


def test_short_data_leaves_no_blob(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not match 16 bytes"):
        write_tensor_blob(tmp_path, [RawTensor("x", "F32", (4,), [b"\x00" * 8])], style="go")
    assert blob_files(tmp_path) == []


def test_temp_files_use_names_the_loader_ignores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_blob(tmp_path, [b"abc"])
    write_manifest(tmp_path, "m", b"{}\n")
    assert len(seen) == 2
    assert all(name.startswith(".") and name.endswith(".tmp") for name in seen)


def test_mlx_written_blob_loads_with_mlx_and_numpy(tmp_path: Path) -> None:
    w = mx.random.normal((8, 64), key=mx.random.key(3)).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    tensors = [
        tensor_from_array("w", wq),
        tensor_from_array("w.scale", scales),
        tensor_from_array("w.bias", biases),
    ]
    blob = write_tensor_blob(tmp_path, tensors, style="mlx", metadata={"quant_type": "int4"})
    path = blob_path(tmp_path, blob.digest)
    loaded = load_mlx(path)
    for name, array in [("w", wq), ("w.scale", scales), ("w.bias", biases)]:
        assert loaded[name].dtype == array.dtype
        assert mx.array_equal(loaded[name], array).item()
    with safe_open(path, framework="numpy") as f:
        assert np.array_equal(f.get_tensor("w"), np.array(wq))
        assert f.metadata() == {"quant_type": "int4"}
