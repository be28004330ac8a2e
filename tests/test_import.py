"""import_model: every source shape and layout reads back bit-exact; blobs are shared and atomic."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

import asyncweights as aw
from asyncweights import SourceError

BF16 = ml_dtypes.bfloat16


def _source_tensors(seed: int, prefix: str = "model.layers.0.") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        prefix + "mlp.up_proj.weight": rng.standard_normal((64, 128)).astype(BF16),
        prefix + "self_attn.q_proj.weight": rng.standard_normal((128, 128)).astype(np.float16),
        prefix + "self_attn.q_proj.bias": rng.standard_normal(128).astype(np.float32),
        prefix + "input_layernorm.weight": np.ones(128, dtype=BF16),
        prefix + "position_ids": np.arange(16, dtype=np.int64).reshape(1, 16),
    }


def write_single(root: Path) -> dict[str, np.ndarray]:
    root.mkdir(parents=True)
    tensors = _source_tensors(1)
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architectures": ["ToyForCausalLM"]}))
    (root / "tokenizer_config.json").write_text("{}")
    return tensors


def write_sharded(root: Path) -> dict[str, np.ndarray]:
    root.mkdir(parents=True)
    first, second = _source_tensors(2, "model.layers.0."), _source_tensors(3, "model.layers.1.")
    save_file(first, str(root / "model-00001-of-00002.safetensors"))
    save_file(second, str(root / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps({"architectures": ["ToyForCausalLM"]}))
    return first | second


def write_pipeline(root: Path) -> dict[str, np.ndarray]:
    """A diffusers-style pipeline with the file names diffusers and transformers save."""
    rng = np.random.default_rng(4)
    parts: dict[str, dict[str, np.ndarray]] = {
        "text_encoder": _source_tensors(5),
        "transformer": {
            "blocks.0.attn.to_q.weight": rng.standard_normal((64, 128)).astype(BF16),
            "blocks.0.norm1.weight": np.ones(128, dtype=BF16),
        },
        "vae": {
            "decoder.conv_in.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
            "decoder.conv_in.bias": np.zeros(8, dtype=np.float32),
        },
    }
    for comp, tensors in parts.items():
        (root / comp).mkdir(parents=True)
        save_file(tensors, str(root / comp / PIPELINE_FILES[comp]))
        (root / comp / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    index = {
        "_class_name": "ToyPipeline",
        "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "transformer": ["diffusers", "ToyTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return {f"{c}/{k}": v for c, tensors in parts.items() for k, v in tensors.items()}


PIPELINE_FILES = {
    "text_encoder": "model.safetensors",
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}
WRITERS = {"single": write_single, "sharded": write_sharded, "pipeline": write_pipeline}


def raw(array: mx.array) -> bytes:
    return bytes(memoryview(array))  # type: ignore[arg-type]


def blob_files(store: Path) -> set[str]:
    return {p.name for p in (store / "blobs").glob("sha256-*")}


@pytest.mark.parametrize("layout", ["named", "data"])
@pytest.mark.parametrize("kind", ["single", "sharded", "pipeline"])
async def test_import_reads_back_bit_exact(tmp_path: Path, kind: str, layout: Any) -> None:
    source = WRITERS[kind](tmp_path / "src")
    model = await aw.import_model(
        tmp_path / "src", "toy:1", store=tmp_path / "store", layout=layout
    )
    weights = await aw.load_weights(model)
    assert sorted(weights) == sorted(source)
    for name, expected in source.items():
        assert weights.info[name].shape == expected.shape
        assert raw(weights[name]) == expected.tobytes(), name
    assert weights.quantization is None
    config = await model.config()
    assert config.model_format == "safetensors"
    if kind == "pipeline":
        assert model.components == ["text_encoder", "transformer", "vae"]
        index = await model.read_config("model_index.json")
        assert index == {
            "architecture": "ToyPipeline",
            "parameter_count": sum(a.size for a in source.values()),
            "quantization": "bfloat16",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"],
            "transformer": ["diffusers", "ToyTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        assert "scheduler/scheduler_config.json" in model.config_names
        vae = await aw.load_weights(model, "vae")
        assert sorted(vae) == ["decoder.conv_in.bias", "decoder.conv_in.weight"]
    else:
        assert "config.json" in model.config_names
        assert "model.safetensors.index.json" not in model.config_names


QUANTIZED_CASES = [("named", "q4", 64), ("data", "q4", 32), ("named", "q8", 64), ("data", "q8", 64)]


@pytest.mark.parametrize(("layout", "qtype", "group"), QUANTIZED_CASES)
async def test_import_quantized_matches_mlx(
    tmp_path: Path, layout: Any, qtype: str, group: int
) -> None:
    source = write_pipeline(tmp_path / "src")
    model = await aw.import_model(
        tmp_path / "src", "toy:q", store=tmp_path / "store", layout=layout, quantize=qtype
    )
    weights = await aw.load_weights(model)
    bits = 4 if qtype == "q4" else 8
    assert weights.quantization == aw.Quantization(f"int{bits}", "affine", bits, group)
    quantized = {
        "text_encoder/model.layers.0.mlp.up_proj.weight",
        "transformer/blocks.0.attn.to_q.weight",
        "text_encoder/model.layers.0.self_attn.q_proj.weight",
    }
    for name, expected in source.items():
        if name not in quantized:
            assert raw(weights[name]) == expected.tobytes(), name
            continue
        comp, key = name.split("/", 1)
        loaded = mx.load(str(tmp_path / "src" / comp / PIPELINE_FILES[comp]))
        assert isinstance(loaded, dict)
        ref = loaded[key]
        w, s, b = mx.quantize(ref, group_size=group, bits=bits)
        assert weights.info[name].quantization == weights.quantization
        assert raw(weights[name]) == raw(w)
        assert raw(weights[name + "_scale"]) == raw(s)
        assert raw(weights[name + "_qbias"]) == raw(b)
    index = await model.read_config("model_index.json")
    label = {("data", "q4"): "Q4", ("data", "q8"): "Q8"}.get((layout, qtype), f"INT{bits}")
    assert index["quantization"] == label


async def test_import_twice_shares_blobs(tmp_path: Path) -> None:
    write_sharded(tmp_path / "src")
    store = tmp_path / "store"
    first = await aw.import_model(tmp_path / "src", "a", store=store)
    blobs = blob_files(store)
    second = await aw.import_model(tmp_path / "src", "ns/b:v2", store=store)
    assert blob_files(store) == blobs
    assert [x.digest for x in first.manifest.layers] == [x.digest for x in second.manifest.layers]
    assert not list((store / "blobs").glob("*.tmp"))
    names = sorted([str(n) async for n in aw.ModelStore(store).models()])
    assert names == ["a:latest", "ns/b:v2"]


async def test_import_data_layout_shares_identical_tensors(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    ones = np.ones((4, 64), dtype=np.float32)
    save_file({"a.weight": ones, "b.weight": ones.copy()}, str(tmp_path / "src" / "m.safetensors"))
    model = await aw.import_model(tmp_path / "src", "dup", store=tmp_path / "s", layout="data")
    digests = [layer.digest for layer in model.tensor_layers]
    assert len(digests) == 2
    assert digests[0] == digests[1]
    weights = await aw.load_weights(model)
    assert raw(weights["a.weight"]) == raw(weights["b.weight"]) == ones.tobytes()


async def test_import_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="source is not a directory"):
        await aw.import_model(tmp_path / "nope", "x", store=tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no \*\.safetensors files found"):
        await aw.import_model(tmp_path / "empty", "x", store=tmp_path / "s")
    with pytest.raises(aw.InvalidNameError):
        await aw.import_model(tmp_path / "empty", "bad name!", store=tmp_path / "s")
    (tmp_path / "dup").mkdir()
    t = {"w": np.zeros(4, dtype=np.float32)}
    save_file(t, str(tmp_path / "dup" / "a.safetensors"))
    save_file(t, str(tmp_path / "dup" / "b.safetensors"))
    with pytest.raises(aw.DuplicateTensorError, match="tensor defined twice"):
        await aw.import_model(tmp_path / "dup", "x", store=tmp_path / "s")
    assert not (tmp_path / "s" / "manifests").exists() or not any(
        (tmp_path / "s" / "manifests").rglob("*")
    )


_KILLED_IMPORT = textwrap.dedent(
    """
    import os, stat, sys, time, anyio, asyncweights as aw
    real, files = os.fsync, [0]
    def slow_fsync(fd):
        files[0] += stat.S_ISREG(os.fstat(fd).st_mode)
        if files[0] == 3:  # two blobs are done; the third is written but not yet renamed
            print("stalled", flush=True)
            time.sleep(60)
        real(fd)
    os.fsync = slow_fsync
    limits = aw.Limits(workers=1)
    anyio.run(lambda: aw.import_model(sys.argv[1], "killed", store=sys.argv[2], limits=limits))
    """
)


def test_sigkill_midway_leaves_no_partial_blob_or_manifest(tmp_path: Path) -> None:
    write_sharded(tmp_path / "src")
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_IMPORT, str(tmp_path / "src"), str(store)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "stalled"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    blobs = sorted((store / "blobs").glob("sha256-*"))
    assert len(blobs) == 2
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name[len("sha256-") :]
    assert len(list((store / "blobs").glob(".asyncweights-*.tmp"))) == 1  # loaders ignore it
    assert not [p for p in (store / "manifests").rglob("*") if p.is_file()]
    assert list(aw.ModelStore(store).list_names()) == []
    assert os.listdir(store / "blobs")  # the store itself is still usable
