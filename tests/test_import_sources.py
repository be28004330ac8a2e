"""import_model on the layouts people download: every one recognized, imported exactly or refused.

Sources are written by the producers themselves: mlx's ``nn.quantize`` and
``mx.save_safetensors`` (the mlx-lm way), the ``safetensors`` package, and diffusers-style
pipeline folders with the file names diffusers and transformers save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

import asyncweights as aw
from asyncweights import SourceError

BF16 = ml_dtypes.bfloat16


def raw(array: mx.array) -> bytes:
    return bytes(memoryview(array))  # type: ignore[arg-type]


def _tensors(seed: int, names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((8, 32)).astype(BF16) for n in names}


def _shard(folder: Path, family: str, tensors: dict[str, np.ndarray], parts: int) -> None:
    """Save `tensors` as `parts` shards plus the index, as save_pretrained names them."""
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for i in range(parts):
        shard = f"{family}-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[i::parts]}
        save_file(chunk, str(folder / shard))
        weight_map |= dict.fromkeys(chunk, shard)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / f"{family}.safetensors.index.json").write_text(json.dumps(index))


def write_flux(root: Path) -> dict[str, np.ndarray]:
    """FLUX.1-style: two text encoders (the second sharded), a sharded transformer, a VAE."""
    parts = {
        "text_encoder": _tensors(1, ["text_model.final_layer_norm.weight"]),
        "text_encoder_2": _tensors(2, [f"encoder.block.{i}.layer.0.q.weight" for i in range(3)]),
        "transformer": _tensors(3, [f"transformer_blocks.{i}.attn.to_q.weight" for i in range(4)]),
        "vae": _tensors(4, ["decoder.conv_in.weight"]),
    }
    for comp in [*parts, "tokenizer", "tokenizer_2", "scheduler"]:
        (root / comp).mkdir(parents=True)
    save_file(parts["text_encoder"], str(root / "text_encoder/model.safetensors"))
    _shard(root / "text_encoder_2", "model", parts["text_encoder_2"], 2)
    # A stale shard from an older download: not in the index, so not loaded.
    save_file(_tensors(9, ["stale.weight"]), str(root / "text_encoder_2/model-extra.safetensors"))
    _shard(root / "transformer", "diffusion_pytorch_model", parts["transformer"], 2)
    save_file(parts["vae"], str(root / "vae/diffusion_pytorch_model.safetensors"))
    fp16 = {k: v.astype(np.float16) for k, v in parts["vae"].items()}
    save_file(fp16, str(root / "vae/diffusion_pytorch_model.fp16.safetensors"))
    for comp in parts:
        (root / comp / "config.json").write_text(json.dumps({"_class_name": comp}))
    (root / "text_encoder/config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    (root / "tokenizer/vocab.json").write_text("{}")
    (root / "tokenizer_2/tokenizer_config.json").write_text("{}")
    (root / "tokenizer_2/spiece.model").write_bytes(b"\x00sentencepiece")
    (root / "scheduler/scheduler_config.json").write_text("{}")
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return {f"{c}/{k}": v for c, t in parts.items() for k, v in t.items()}


def write_sdxl(root: Path) -> dict[str, np.ndarray]:
    """SDXL-style: unet, two text encoders, a VAE, and optional components left out."""
    parts = {
        "text_encoder": _tensors(5, ["text_model.embeddings.position_ids"]),
        "text_encoder_2": _tensors(6, ["text_projection.weight"]),
        "unet": _tensors(7, ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]),
        "vae": _tensors(8, ["encoder.conv_in.weight"]),
    }
    for comp, tensors in parts.items():
        (root / comp).mkdir(parents=True)
        family = "model" if comp.startswith("text") else "diffusion_pytorch_model"
        save_file(tensors, str(root / comp / f"{family}.safetensors"))
        (root / comp / "config.json").write_text("{}")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return {f"{c}/{k}": v for c, t in parts.items() for k, v in t.items()}


async def _check_exact(model: aw.Model, source: dict[str, np.ndarray]) -> aw.Weights:
    weights = await aw.load_weights(model)
    assert sorted(weights) == sorted(source)
    for name, expected in source.items():
        assert raw(weights[name]) == expected.tobytes(), name
    return weights


async def test_flux_pipeline_imports_every_component_from_its_own_index(tmp_path: Path) -> None:
    source = write_flux(tmp_path / "src")
    model = await aw.import_model(tmp_path / "src", "flux", store=tmp_path / "s")
    await _check_exact(model, source)
    assert model.components == ["text_encoder", "transformer", "vae", "text_encoder_2"]
    t5 = await aw.load_weights(model, "text_encoder_2")
    assert sorted(t5) == [f"encoder.block.{i}.layer.0.q.weight" for i in range(3)]
    index = await model.read_config("model_index.json")
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["architecture"] == "FluxPipeline"
    assert index["parameter_count"] == sum(a.size for a in source.values())
    assert model.config_names == [
        "model_index.json",
        "text_encoder/config.json",
        "transformer/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "text_encoder_2/config.json",
        "tokenizer_2/tokenizer_config.json",
    ]


async def test_pipeline_variant_is_loaded_only_when_asked_for(tmp_path: Path) -> None:
    source = write_flux(tmp_path / "src")
    # Without a variant the fp16 VAE file is ignored (diffusers loads the plain name) …
    model = await aw.import_model(tmp_path / "src", "flux", store=tmp_path / "s")
    vae = await aw.load_weights(model, "vae")
    assert vae.info["decoder.conv_in.weight"].source_dtype == "BF16"
    # … and with variant="fp16" every component must have its fp16 files, as in diffusers.
    with pytest.raises(SourceError) as info:
        await aw.import_model(tmp_path / "src", "f16", store=tmp_path / "s", variant="fp16")
    assert str(info.value).startswith(
        "component 'text_encoder' has no model.fp16.safetensors (nor its index); "
        "'model.safetensors' is not a file its library loads for variant 'fp16'"
    )
    for comp in ("text_encoder", "text_encoder_2", "transformer"):
        (tmp_path / "src" / comp / "config.json").unlink()
    index = json.loads((tmp_path / "src/model_index.json").read_text())
    for comp in ("text_encoder", "text_encoder_2", "transformer"):
        index[comp] = [None, None]
    (tmp_path / "src/model_index.json").write_text(json.dumps(index))
    model = await aw.import_model(tmp_path / "src", "f16", store=tmp_path / "s", variant="fp16")
    vae = await aw.load_weights(model, "vae")
    expected = source["vae/decoder.conv_in.weight"].astype(np.float16)
    assert raw(vae["decoder.conv_in.weight"]) == expected.tobytes()


async def test_sdxl_pipeline_imports_unet_and_both_text_encoders(tmp_path: Path) -> None:
    source = write_sdxl(tmp_path / "src")
    model = await aw.import_model(tmp_path / "src", "sdxl", store=tmp_path / "s")
    await _check_exact(model, source)
    assert model.components == ["text_encoder", "vae", "text_encoder_2", "unet"]
    unet = await aw.load_weights(model, "unet")
    assert sorted(unet) == ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no-folder", "component 'unet' declared in model_index.json has no folder"),
        ("bin-only", "'diffusion_pytorch_model.bin' is not safetensors"),
        (
            "variant-only",
            "'diffusion_pytorch_model.fp16.safetensors' is not a file its library loads "
            "without a variant",
        ),
        ("missing-shard", "shard 'model-00002-of-00002.safetensors' named by the index is"),
        ("not-a-pair", "component 'unet' is not [library, class]"),
        ("both-families", "component 'unet' has both transformers and diffusers weight"),
    ],
)
async def test_pipeline_component_that_cannot_be_imported_fails_and_is_named(
    tmp_path: Path, breakage: str, message: str
) -> None:
    src = tmp_path / "src"
    write_sdxl(src)
    unet = src / "unet" / "diffusion_pytorch_model.safetensors"
    if breakage == "no-folder":
        for p in (src / "unet").iterdir():
            p.unlink()
        (src / "unet").rmdir()
    elif breakage == "bin-only":
        unet.rename(unet.with_suffix(".bin"))
    elif breakage == "variant-only":
        unet.rename(src / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    elif breakage == "missing-shard":
        _shard(src / "text_encoder_2", "model", _tensors(1, ["a.weight", "b.weight"]), 2)
        (src / "text_encoder_2" / "model.safetensors").unlink()
        (src / "text_encoder_2" / "model-00002-of-00002.safetensors").unlink()
    elif breakage == "not-a-pair":
        index = json.loads((src / "model_index.json").read_text())
        index["unet"] = ["diffusers", 3]
        (src / "model_index.json").write_text(json.dumps(index))
    elif breakage == "both-families":
        index = json.loads((src / "model_index.json").read_text())
        index["unet"] = ["my_package", "MyUNet"]
        (src / "model_index.json").write_text(json.dumps(index))
        save_file(_tensors(1, ["x"]), str(src / "unet" / "model.safetensors"))
    store = tmp_path / "s"
    with pytest.raises(SourceError) as info:
        await aw.import_model(src, "sdxl", store=store)
    assert message in str(info.value)
    assert "model 'sdxl'" in str(info.value)
    assert f"store {str(store)!r}" in str(info.value)
    assert not store.exists()  # nothing was written, not even the folders


@pytest.mark.parametrize("layout", ["named", "data"])
async def test_tensor_names_round_trip_from_a_single_folder(tmp_path: Path, layout: Any) -> None:
    (tmp_path / "src").mkdir()
    names = ["a/a/x", "../../x", "transformer/x", "vae/../y", "/lead", "plain.weight"]
    rng = np.random.default_rng(0)
    source = {n: rng.standard_normal(4).astype(np.float32) for n in names}
    save_file(source, str(tmp_path / "src" / "model.safetensors"))
    model = await aw.import_model(tmp_path / "src", "n", store=tmp_path / "s", layout=layout)
    weights = await aw.load_weights(model)
    assert sorted(weights) == sorted(names)
    for name in names:
        assert raw(weights[name]) == source[name].tobytes()


async def test_pipeline_tensor_named_like_its_component_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_sdxl(src)
    tensors = {"unet/x": np.ones(4, np.float32), "y": np.zeros(4, np.float32)}
    save_file(tensors, str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    model = await aw.import_model(src, "p", store=tmp_path / "s")
    unet = await aw.load_weights(model, "unet")
    assert sorted(unet) == ["unet/x", "y"]
    assert raw(unet["unet/x"]) == tensors["unet/x"].tobytes()


async def test_hf_folder_loads_model_safetensors_like_transformers(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    hf = _tensors(1, ["model.layers.0.mlp.up_proj.weight"])
    save_file(hf, str(src / "model.safetensors"))
    # Mistral repos ship the same weights again under other names; transformers skips them.
    save_file(
        _tensors(1, ["layers.0.feed_forward.w3.weight"]), str(src / "consolidated.safetensors")
    )
    (src / "config.json").write_text("{}")
    model = await aw.import_model(src, "m", store=tmp_path / "s")
    weights = await _check_exact(model, hf)
    assert weights.quantization is None
    assert model.config_names == ["config.json"]


# ------------------------------------------------------------------------------ mlx-lm


class Block(nn.Module):  # type: ignore[misc]  # mlx.nn ships no type information: Module is Any
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(128, 64, bias=True)
        self.up_proj = nn.Linear(128, 96, bias=False)
        self.gate_proj = nn.Linear(64, 64, bias=False)
        self.norm = nn.RMSNorm(128)


class Toy(nn.Module):  # type: ignore[misc]  # mlx.nn ships no type information: Module is Any
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 128)
        self.layers = [Block(), Block()]
        self.lm_head = nn.Linear(128, 32, bias=False)


MLX_CASES: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    # name: (global block, per-module overrides given to nn.quantize and written to config)
    "int4-g64": ({"group_size": 64, "bits": 4}, {"layers.0.q_proj": {"group_size": 32, "bits": 8}}),
    "int8-g32": ({"group_size": 32, "bits": 8}, {"lm_head": {"group_size": 128, "bits": 4}}),
    "mxfp4": (
        {"group_size": 32, "bits": 4, "mode": "mxfp4"},
        {"layers.1.up_proj": {"group_size": 64, "bits": 8, "mode": "affine"}},
    ),
}
STORE_TYPES = {("affine", 4): "int4", ("affine", 8): "int8", ("mxfp4", 4): "mxfp4"}


def write_mlx_lm(root: Path, case: str, shards: int = 1) -> Toy:
    """Quantize a small model with nn.quantize and save it the way mlx-lm does."""
    mx.random.seed(7)
    model = Toy()
    block, overrides = MLX_CASES[case]
    mode = block.get("mode", "affine")

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in overrides:
            return dict(overrides[path])
        return hasattr(module, "to_quantized") and not path.endswith("gate_proj")

    nn.quantize(model, block["group_size"], block["bits"], mode=mode, class_predicate=predicate)
    root.mkdir(parents=True)
    weights = dict(tree_flatten(model.parameters()))
    if shards == 1:
        mx.save_safetensors(str(root / "model.safetensors"), weights, metadata={"format": "mlx"})
    else:  # mlx-lm's save_model: model-0000i-of-0000n.safetensors plus the index
        names = sorted(weights)
        weight_map: dict[str, str] = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[i::shards]}
            mx.save_safetensors(str(root / shard), part, metadata={"format": "mlx"})
            weight_map |= dict.fromkeys(part, shard)
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"model_type": "toy", "quantization": {**block, **overrides}}
    config["quantization_config"] = config["quantization"]  # mlx-lm writes both
    (root / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("case", sorted(MLX_CASES))
async def test_mlx_lm_quantized_model_round_trips(tmp_path: Path, case: str) -> None:
    toy = write_mlx_lm(tmp_path / "src", case, shards=2 if case == "int8-g32" else 1)
    source: dict[str, mx.array] = {}
    for path in sorted((tmp_path / "src").glob("*.safetensors")):
        loaded = mx.load(str(path))
        assert isinstance(loaded, dict)
        source |= loaded
    model = await aw.import_model(tmp_path / "src", "toy-q", store=tmp_path / "s")
    weights = await aw.load_weights(model)
    block = MLX_CASES[case][0]
    mode = block.get("mode", "affine")
    assert weights.quantization == aw.Quantization.of(
        STORE_TYPES[(mode, block["bits"])], block["group_size"]
    )
    config = await model.config()
    assert config.file_type == STORE_TYPES[(mode, block["bits"])]
    modules = [m for m in source if m.endswith(".scales")]
    assert len(modules) == 6  # embed, 2 x (q_proj, up_proj), lm_head; gate_proj stays float
    x = mx.random.normal((3, 128))
    expected_names = set()
    for scales_name in modules:
        module = scales_name[: -len(".scales")]
        layer: Any = toy
        for part in module.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        w = module + ".weight"
        expected_names |= {w, w + "_scale"} | ({w + "_qbias"} if layer.mode == "affine" else set())
        info = weights.info[w]
        assert info.quantization == aw.Quantization.of(
            STORE_TYPES[(layer.mode, layer.bits)], layer.group_size
        ), module
        # Blob-wide quant keys where the module is quantized as the model says, per-tensor
        # keys where it differs (an override).
        layer_of = {x.name: x for x in model.tensor_layers}
        blob = tmp_path / "s" / "blobs" / layer_of[w].digest.replace(":", "-")
        header_len = int.from_bytes(blob.read_bytes()[:8], "little")
        meta = json.loads(blob.read_bytes()[8 : 8 + header_len])["__metadata__"]
        prefix = f"{w}." if module in MLX_CASES[case][1] else ""
        assert meta == {
            prefix + "quant_type": info.quantization.type,
            prefix + "group_size": str(layer.group_size),
        }
        # Bit-exact: the packed weight, scales and biases are the source's bytes.
        assert raw(weights[w]) == raw(source[w])
        assert raw(weights[w + "_scale"]) == raw(source[module + ".scales"])
        if layer.mode == "affine":
            assert raw(weights[w + "_qbias"]) == raw(source[module + ".biases"])
        biases = weights[w + "_qbias"] if layer.mode == "affine" else None
        q = info.quantization
        if isinstance(layer, nn.QuantizedEmbedding):
            ids = mx.array([[1, 5, 31]])
            got = mx.dequantize(
                weights[w], weights[w + "_scale"], biases,
                group_size=q.group_size, bits=q.bits, mode=q.mode,
            )[ids]  # fmt: skip
            assert mx.array_equal(got, layer(ids)).item(), module
            continue
        inp = x if layer.weight.shape[-1] * 32 // layer.bits == 128 else x[:, :64]
        got = mx.quantized_matmul(
            inp, weights[w], weights[w + "_scale"], biases,
            transpose=True, group_size=q.group_size, bits=q.bits, mode=q.mode,
        )  # fmt: skip
        if "bias" in layer:
            got = got + weights[module + ".bias"]
        assert mx.array_equal(got, layer(inp)).item(), module
    plain = {k for k in source if not k.endswith((".scales", ".biases"))}
    plain -= {m[: -len(".scales")] + ".weight" for m in modules}
    assert sorted(weights) == sorted(expected_names | plain)
    for name in plain:
        assert raw(weights[name]) == raw(source[name])


async def test_mlx_lm_refusals(tmp_path: Path) -> None:
    write_mlx_lm(tmp_path / "src", "int4-g64")
    store = tmp_path / "s"
    with pytest.raises(SourceError, match="already quantized"):
        await aw.import_model(tmp_path / "src", "x", store=store, quantize="q8")
    with pytest.raises(SourceError, match="needs the 'named' layout"):
        await aw.import_model(tmp_path / "src", "x", store=store, layout="data")
    config_path = tmp_path / "src" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"]["layers.0.q_proj"] = {"group_size": 64, "bits": 3}
    config_path.write_text(json.dumps(config))
    with pytest.raises(SourceError) as info:
        await aw.import_model(tmp_path / "src", "x", store=store)
    assert "mlx-lm affine 3-bit quantization (module 'layers.0.q_proj') has no type" in str(
        info.value
    )
    config["quantization"]["layers.0.q_proj"] = {"group_size": 128, "bits": 4}  # not 32/8
    config_path.write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"do not fit int4 with group 128.*layers.0.q_proj"):
        await aw.import_model(tmp_path / "src", "x", store=store)
    del config["quantization"], config["quantization_config"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"MLX \(config.json has no 'quantization' block\)"):
        await aw.import_model(tmp_path / "src", "x", store=store)
    assert not store.exists()


# ------------------------------------------------------------------------------ refusals


def _fp8_block(src: Path) -> None:
    f8 = np.zeros((4, 4), dtype=ml_dtypes.float8_e4m3fn)
    save_file(
        {"w.weight": f8, "w.weight_scale_inv": np.ones((1, 1), np.float32)},
        str(src / "model.safetensors"),
    )


REFUSED = {
    "fp8-config": (
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
        "pre-quantized FP8 (block-scaled, weight_scale_inv) checkpoint",
    ),
    "nvfp4-compressed-tensors": (
        {
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "format": "nvfp4-pack-quantized",
                "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "float"}}},
            }
        },
        "pre-quantized NVFP4 (compressed-tensors, nvfp4-pack-quantized) checkpoint",
    ),
    "mxfp4-gpt-oss": (
        {"quantization_config": {"quant_method": "mxfp4"}},
        "pre-quantized MXFP4 (blocks and scales) checkpoint",
    ),
    "gptq": ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "pre-quantized GPTQ"),
    "modelopt": (None, "pre-quantized NVIDIA ModelOpt NVFP4 checkpoint"),
    "fp8-tensors-only": ({}, "tensor of a pre-quantized FP8 checkpoint"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_other_pre_quantized_formats_are_refused_by_name(tmp_path: Path, case: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    config, message = REFUSED[case]
    if case == "fp8-tensors-only":
        _fp8_block(src)
    else:
        save_file({"w.weight": np.zeros((4, 4), np.uint8)}, str(src / "model.safetensors"))
    if config is None:
        (src / "hf_quant_config.json").write_text(
            json.dumps({"quantization": {"quant_algo": "NVFP4", "group_size": 16}})
        )
        config = {}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError) as info:
        await aw.import_model(src, "q", store=tmp_path / "s")
    assert message in str(info.value)
    assert not (tmp_path / "s").exists()


async def test_single_diffusers_model_folder_loads_like_diffusers(tmp_path: Path) -> None:
    src = tmp_path / "transformer"  # one component downloaded on its own
    src.mkdir()
    _shard(src, "diffusion_pytorch_model", plain := _tensors(2, ["a.weight", "b.weight"]), 2)
    half = {k: v.astype(np.float16) for k, v in plain.items()}
    save_file(half, str(src / "diffusion_pytorch_model.fp16.safetensors"))
    (src / "config.json").write_text("{}")
    model = await aw.import_model(src, "t", store=tmp_path / "s")
    await _check_exact(model, plain)
    assert model.components == []
    assert model.config_names == ["config.json"]
    model = await aw.import_model(src, "t16", store=tmp_path / "s", variant="fp16")
    await _check_exact(model, half)
