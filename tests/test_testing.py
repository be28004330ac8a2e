from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import pytest
import safetensors

from asyncweights import Quantization
from asyncweights._manifest import CONFIG_MEDIA_TYPE, JSON_MEDIA_TYPE, TENSOR_MEDIA_TYPE
from asyncweights._writer import RawTensor
from asyncweights.testing import (
    BuiltModel,
    Era,
    MetadataStyle,
    StoreBuilder,
    default_policy,
    quant_params,
    quantize_array,
    random_array,
    random_weights,
)

TE = "text_encoder/model.norm.weight"
Q = "transformer/blocks.0.attn.to_q.weight"
ERAS: list[Era] = ["E0", "E1", "E2", "E3"]
QUANT_TYPES = ["int4", "int8", "nvfp4", "mxfp4", "mxfp8"]
DIFFUSERS_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": "0.36.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def blob(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def header(root: Path, digest: str) -> dict[str, Any]:
    data = blob(root, digest).read_bytes()
    return cast("dict[str, Any]", json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]))


def load_mlx(path: Path) -> dict[str, mx.array]:
    return cast("dict[str, mx.array]", mx.load(str(path), format="safetensors"))


def reference_load(root: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """A tiny independent reader of docs/format.md#naming: logical name -> raw bytes."""
    out: dict[str, bytes] = {}
    for layer in manifest["layers"]:
        if layer["mediaType"] != TENSOR_MEDIA_TYPE:
            continue
        path = blob(root, layer["digest"])
        assert path.stat().st_size == layer["size"]
        raw = path.read_bytes()
        entries = dict(safetensors.deserialize(raw))  # type: ignore[no-untyped-call]
        if list(entries) == ["data"]:
            out[layer["name"]] = bytes(entries["data"]["data"])
            continue
        comp = layer["name"].partition("/")[0] if "/" in layer["name"] else ""
        for key, t in entries.items():
            name = key
            if key.endswith(".scale"):
                name = key.removesuffix(".scale") + "_scale"
            elif key.endswith(".bias") and key.removesuffix(".bias") + ".scale" in entries:
                name = key.removesuffix(".bias") + "_qbias"
            if comp and not name.startswith(comp + "/"):
                name = f"{comp}/{name}"
            assert name not in out or out[name] == bytes(t["data"]), name
            out[name] = bytes(t["data"])
    return out


def array_bytes(array: mx.array) -> bytes:
    return bytes(memoryview(mx.contiguous(array)))  # type: ignore[arg-type]


def assert_reads_back(root: Path, model: BuiltModel) -> None:
    """Every blob parses with both readers, and the logical tensors equal model.expected."""
    for layer in model.layers:
        if layer.media_type == TENSOR_MEDIA_TYPE:
            loaded = load_mlx(blob(root, layer.digest))
            assert loaded
    got = reference_load(root, model.manifest)
    assert sorted(got) == sorted(model.expected)
    for name, array in model.expected.items():
        assert got[name] == array_bytes(array), name


def mixed_llm() -> dict[str, mx.array]:
    return random_weights(
        {
            "model.embed_tokens.weight": (16, 64),
            "model.layers.0.self_attn.q_proj.weight": (8, 128),
            "model.layers.0.self_attn.q_proj.bias": (8,),
            "model.layers.0.mlp.down_proj.weight": (8, 128),
            "model.layers.1.mlp.experts.gate_proj.weight": (2, 8, 64),
            "model.layers.1.mlp.experts.down_proj.weight": (2, 8, 64),
            "model.layers.1.mlp.experts.down_proj.bias": (2, 8),
            "model.norm.weight": (64,),
        },
        seed="llm",
    )


PACK = {
    "model.layers.1.mlp.experts": [
        "model.layers.1.mlp.experts.gate_proj.weight",
        "model.layers.1.mlp.experts.down_proj.weight",
        "model.layers.1.mlp.experts.down_proj.bias",
    ]
}


def test_format_8_example_via_add_model(tmp_path: Path) -> None:
    norm = mx.array([[1.0] * 4, [0.5] * 4], dtype=mx.bfloat16)
    tensors = {TE: norm, Q: random_array((4, 64), seed=8)}
    te_config = {"architectures": ["Qwen3Model"], "hidden_size": 4, "torch_dtype": "bfloat16"}
    model = StoreBuilder(tmp_path).add_model(
        "toy:latest",
        tensors,
        era="E0",
        quantize={Q: "int4"},
        configs={"text_encoder/config.json": te_config, "model_index.json": DIFFUSERS_INDEX},
    )
    assert model.path == tmp_path / "manifests/registry.ollama.ai/library/toy/latest"
    layers = model.manifest["layers"]
    assert [layer["name"] for layer in layers] == [
        TE,
        Q,
        Q + "_scale",
        Q + "_qbias",
        "model_index.json",
        "text_encoder/config.json",
    ]
    assert layers[0]["digest"] == (
        "sha256:5566cce8d6205a2056a24af417d0f47a300685c2255c704ac8ec91bcb8e0e18f"
    )
    assert [layer["size"] for layer in layers[:4]] == [88, 217, 105, 105]
    assert layers[4]["digest"] == (
        "sha256:31b7cc58110adea99f5ac1b7ef1a7abaeb719ea46109bd77361678b36d6fd8cd"
    )
    assert layers[5]["digest"] == (
        "sha256:66488e0d1f6f0f8eab4cda5d3a3bd0cb7468d2983479fe5c4d297f13a04a36aa"
    )
    assert model.manifest["config"] == {
        "mediaType": CONFIG_MEDIA_TYPE,
        "digest": "sha256:c86d08128417d55cf355f5a7a1d18945f3678f7a639302f5cb19d4c309de92ee",
        "size": 209,
    }
    assert model.quantization == {Q: Quantization("int4", "affine", 4, 32)}
    assert sorted(model.component("transformer")) == [
        "blocks.0.attn.to_q.weight",
        "blocks.0.attn.to_q.weight_qbias",
        "blocks.0.attn.to_q.weight_scale",
    ]
    assert list(model.component("text_encoder")) == ["model.norm.weight"]
    assert_reads_back(tmp_path, model)


@pytest.mark.parametrize("era", ERAS)
def test_llm_reads_back_in_every_era(tmp_path: Path, era: Era) -> None:
    quantize = {
        "model.layers.0.self_attn.q_proj.weight": "int4",
        "model.layers.0.mlp.down_proj.weight": "int8",
        "model.layers.1.mlp.experts.gate_proj.weight": "mxfp4",
        "model.layers.1.mlp.experts.down_proj.weight": "mxfp8",
    }
    model = StoreBuilder(tmp_path).add_model(
        "m",
        mixed_llm(),
        era=era,
        quantize=quantize,
        pack=None if era == "E0" else PACK,
        configs={"config.json": {"architectures": ["Toy"]}},
    )
    assert_reads_back(tmp_path, model)
    names = [layer.name or "" for layer in model.layers]
    if era == "E0":
        assert "model.layers.0.self_attn.q_proj.weight_qbias" in names
        assert "model.layers.1.mlp.experts.down_proj.weight_qbias" not in names
        assert names[-2:] == ["config.json", "model_index.json"]
        index = json.loads(blob(tmp_path, model.layers[-1].digest).read_bytes())
        assert index == {"group_size": 32, "quantization": "Q4"}
    else:
        assert "model.layers.1.mlp.experts" in names
        assert names[-1] == "config.json"
        assert not any(n.endswith(("_scale", "_qbias")) for n in names)
    config = json.loads(blob(tmp_path, model.config.digest).read_bytes())
    assert config["model_format"] == "safetensors"
    assert config["capabilities"] == ["completion"]
    assert config["file_type"] == ("" if era in ("E0", "E1") else "int4")


@pytest.mark.parametrize("era", ERAS)
def test_imagegen_reads_back_in_every_era(tmp_path: Path, era: Era) -> None:
    tensors = random_weights(
        {
            "text_encoder/model.layers.0.mlp.up_proj.weight": (8, 64),
            "text_encoder/model.norm.weight": (64,),
            "transformer/blocks.0.attn.to_q.weight": (8, 64),
            "transformer/blocks.0.attn.to_q.bias": (8,),
            "vae/decoder.conv.weight": (8, 64),
        },
        seed=era,
    )
    model = StoreBuilder(tmp_path).add_model(
        "z-image", tensors, era=era, quantize="int8", configs={"model_index.json": DIFFUSERS_INDEX}
    )
    assert_reads_back(tmp_path, model)
    assert sorted(model.quantization) == [
        "text_encoder/model.layers.0.mlp.up_proj.weight",
        "transformer/blocks.0.attn.to_q.weight",
    ]
    index = json.loads(blob(tmp_path, model.layers[-1].digest).read_bytes())
    assert model.layers[-1].name == "model_index.json"
    assert index["quantization"] == ("Q8" if era == "E0" else "INT8")
    assert index["architecture"] == "ZImagePipeline"
    assert index["parameter_count"] == 8 * 64 * 3 + 64 + 8
    assert "group_size" not in index
    assert "_class_name" not in index
    config = json.loads(blob(tmp_path, model.config.digest).read_bytes())
    assert config["capabilities"] == ["image"]


def test_e1_component_keys_bare_unquantized_prefixed_quantized(tmp_path: Path) -> None:
    tensors = {TE: random_array((2, 4), seed=1), Q: random_array((4, 64), seed=2)}
    model = StoreBuilder(tmp_path).add_model("toy", tensors, era="E1", quantize={Q: "int4"})
    te_layer, q_layer = model.layers[:2]
    assert (te_layer.name, q_layer.name) == (TE, Q)
    assert list(header(tmp_path, te_layer.digest)) == ["model.norm.weight"]
    h = header(tmp_path, q_layer.digest)
    assert list(h) == ["__metadata__", Q, Q + ".bias", Q + ".scale"]
    assert h["__metadata__"] == {"group_size": "64", "quant_type": "int4"}
    assert h[Q]["data_offsets"] == [0, 128]  # weight first, then scale, then bias
    assert h[Q + ".scale"]["data_offsets"][0] == 128
    raw = blob(tmp_path, te_layer.digest).read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # Go-written, padded


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_e0_quantized_layers_per_type(tmp_path: Path, qtype: str) -> None:
    w = {"model.layers.0.mlp.up_proj.weight": random_array((8, 128), seed=qtype)}
    model = StoreBuilder(tmp_path).add_model("m", w, era="E0", quantize=qtype)
    names = [layer.name for layer in model.layers if layer.media_type == TENSOR_MEDIA_TYPE]
    x = "model.layers.0.mlp.up_proj.weight"
    affine = qtype.startswith("int")
    assert names == [x, x + "_scale"] + ([x + "_qbias"] if affine else [])
    for layer in model.layers[: len(names)]:
        assert blob(tmp_path, layer.digest).read_bytes()[8:29] == b'{"__metadata__":null,'
    assert_reads_back(tmp_path, model)
    p = model.quantization[x]
    scale = model.expected[x + "_scale"]
    assert scale.dtype == (mx.bfloat16 if affine else mx.uint8)
    assert model.expected[x].shape == (8, 128 * p.bits // 32)
    assert scale.shape == (8, 128 // p.group_size)


@pytest.mark.parametrize(
    ("style", "uniform", "expected"),
    [
        ("none", True, None),
        ("global", True, "G"),
        ("global", False, None),
        ("per_tensor", True, "P"),
        ("both", True, "PG"),
        ("both", False, "P"),
        ("auto", True, "G"),
        ("auto", False, "P"),
    ],
)
def test_packed_blob_metadata_styles(
    tmp_path: Path, style: MetadataStyle, uniform: bool, expected: str | None
) -> None:
    gate = "model.layers.1.mlp.experts.gate_proj.weight"
    down = "model.layers.1.mlp.experts.down_proj.weight"
    quantize = {gate: "int4", down: "int4" if uniform else "int8"}
    model = StoreBuilder(tmp_path).add_model(
        "m", mixed_llm(), era="E2", quantize=quantize, pack=PACK, metadata_style=style
    )
    layer = next(lay for lay in model.layers if lay.name == "model.layers.1.mlp.experts")
    h = header(tmp_path, layer.digest)
    assert "model.layers.1.mlp.experts" not in h
    assert "model.layers.1.mlp.experts.down_proj.bias" in h  # a real bias, not a companion
    want: dict[str, str] = {}
    if expected and "P" in expected:
        for name, p in [(gate, "int4"), (down, "int4" if uniform else "int8")]:
            want[name + ".quant_type"] = p
            want[name + ".group_size"] = "64"
    if expected and "G" in expected:
        want.update(quant_type="int4", group_size="64")
    assert h["__metadata__"] == (want or None)
    assert_reads_back(tmp_path, model)


def test_unquantized_pack_is_go_written_in_key_order(tmp_path: Path) -> None:
    model = StoreBuilder(tmp_path).add_model("m", mixed_llm(), era="E1", pack=PACK)
    layer = next(lay for lay in model.layers if lay.name == "model.layers.1.mlp.experts")
    h = header(tmp_path, layer.digest)
    assert "__metadata__" not in h
    offsets = [h[k]["data_offsets"][0] for k in h]
    assert offsets == sorted(offsets)
    assert_reads_back(tmp_path, model)


def test_e0_identical_tensors_share_one_blob(tmp_path: Path) -> None:
    ones = mx.ones((4, 4), dtype=mx.bfloat16)
    tensors = {"a.norm.weight": ones, "b.norm.weight": mx.ones((4, 4), dtype=mx.bfloat16)}
    model = StoreBuilder(tmp_path).add_model("m", tensors, era="E0")
    a, b = model.layers
    assert (a.name, b.name) == ("a.norm.weight", "b.norm.weight")
    assert a.digest == b.digest
    files = os.listdir(tmp_path / "blobs")
    assert len(files) == 2  # the tensor blob and the config blob
    assert_reads_back(tmp_path, model)


def test_low_level_builder_writes_hand_made_layouts(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path)
    tensor = b.add_blob(
        "x.weight",
        [RawTensor("x.weight", "U8", (3,), b"abc"), RawTensor("a", "F8_E4M3", (1,), b"\x38")],
        style="mlx",
        metadata={"note": "hand"},
    )
    arrays = b.add_blob("y", {"y": mx.arange(4, dtype=mx.float32)})
    junk = b.add_bytes("broken", b"\xff" * 3)
    cfg = b.add_json("config.json", {"b": 1, "a": 2})
    raw_cfg = b.add_json("tokenizer.json", b'{"z": 0}')
    path = b.write_manifest("host/ns/m:t", [tensor, arrays, junk, cfg, raw_cfg])
    assert path == tmp_path / "manifests/host/ns/m/t"
    manifest = json.loads(path.read_text())
    assert manifest["layers"][3] == {
        "mediaType": JSON_MEDIA_TYPE,
        "digest": cfg.digest,
        "size": cfg.size,
        "name": "config.json",
    }
    assert blob(tmp_path, cfg.digest).read_bytes() == b'{"a":2,"b":1}\n'
    assert blob(tmp_path, raw_cfg.digest).read_bytes() == b'{"z": 0}'
    assert blob(tmp_path, junk.digest).read_bytes() == b"\xff" * 3
    h = header(tmp_path, tensor.digest)
    assert h["__metadata__"] == {"note": "hand"}
    assert h["x.weight"]["data_offsets"] == [0, 3]
    assert h["a"]["dtype"] == "F8_E4M3"
    config = json.loads(blob(tmp_path, manifest["config"]["digest"]).read_bytes())
    assert config["model_format"] == "safetensors"
    loaded = load_mlx(blob(tmp_path, arrays.digest))
    assert mx.array_equal(loaded["y"], mx.arange(4, dtype=mx.float32)).item()


def test_random_weights_are_deterministic_and_independent_of_order() -> None:
    a = random_weights({"x": (4, 8), "y": (3,)}, seed=7)
    b = random_weights({"y": (3,), "x": (4, 8)}, seed=7)
    c = random_weights({"x": (4, 8)}, seed=8)
    assert array_bytes(a["x"]) == array_bytes(b["x"])
    assert array_bytes(a["y"]) == array_bytes(b["y"])
    assert array_bytes(a["x"]) != array_bytes(c["x"])
    assert a["x"].dtype == mx.bfloat16
    for dtype in (mx.float32, mx.int8, mx.uint64, mx.bool_):
        arr = random_array((5,), dtype, seed="d")
        assert arr.dtype == dtype
        assert array_bytes(arr) == array_bytes(random_array((5,), dtype, seed="d"))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantize_array_matches_format_5_1(qtype: str) -> None:
    p = quant_params(qtype)
    w = random_array((4, 128), seed=qtype)
    wq, scales, biases = quantize_array(w, p)
    assert wq.dtype == mx.uint32
    assert wq.shape == (4, 128 * p.bits // 32)
    assert scales.shape == (4, 128 // p.group_size)
    assert (biases is not None) == (p.mode == "affine")
    back = mx.dequantize(
        wq, scales, biases, group_size=p.group_size, bits=p.bits, mode=p.mode
    ).astype(mx.float32)
    assert (mx.mean(mx.abs(back - w.astype(mx.float32))) < 0.35).item()


def test_quant_params_defaults_and_errors() -> None:
    assert quant_params("int4") == Quantization("int4", "affine", 4, 64)
    assert quant_params("INT4", era="E0") == Quantization("int4", "affine", 4, 32)
    assert quant_params(("int8", 128)) == Quantization("int8", "affine", 8, 128)
    assert quant_params("nvfp4") == Quantization("nvfp4", "nvfp4", 4, 16)
    assert quant_params("mxfp8") == Quantization("mxfp8", "mxfp8", 8, 32)
    with pytest.raises(ValueError, match="unknown quant type"):
        quant_params("q3")


def test_default_policy_follows_format_4_1() -> None:
    policy = default_policy("int4")
    w2 = mx.zeros((4, 64))
    assert policy("transformer/blocks.0.attn.to_q.weight", w2) == "int4"
    assert policy("model.layers.0.mlp.up_proj.weight", w2) == "int4"
    assert policy("vae/decoder.conv.weight", w2) is None
    assert policy("model.embed_tokens.weight", w2) is None
    assert policy("model.layers.0.input_layernorm.weight", w2) is None
    assert policy("model.layers.0.self_attn.q_proj.bias", w2) is None
    assert policy("model.layers.0.mlp.up_proj.weight", mx.zeros((64,))) is None
    assert policy("model.layers.0.mlp.up_proj.weight", mx.zeros((4, 96))) is None


def test_add_model_rejects_bad_requests(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path)
    w = {"a.weight": random_array((4, 64))}
    with pytest.raises(KeyError, match="unknown tensors"):
        b.add_model("m", w, quantize={"nope.weight": "int4"})
    with pytest.raises(ValueError, match="E0 has no packed blobs"):
        b.add_model("m", w, era="E0", pack={"g": ["a.weight"]})
    with pytest.raises(ValueError, match="unknown or in two groups"):
        b.add_model("m", w, pack={"g": ["missing"]})
    with pytest.raises(ValueError, match="unknown quant type"):
        b.add_model("m", w, quantize={"a.weight": "q3"})


def test_callable_quantize_and_group_override(tmp_path: Path) -> None:
    w = random_weights({"a.weight": (4, 128), "b.weight": (4, 128)})
    model = StoreBuilder(tmp_path).add_model(
        "m", w, era="E3", quantize=lambda n, a: ("int4", 128) if n == "a.weight" else None
    )
    assert model.quantization == {"a.weight": Quantization("int4", "affine", 4, 128)}
    h = header(tmp_path, model.layers[0].digest)
    assert h["__metadata__"] == {"group_size": "128", "quant_type": "int4"}
    assert_reads_back(tmp_path, model)
