"""The demo models of ``asyncweights demo``: a realistic image-generation model, generated once.

The model has the three components of Ollama's image-generation models (``text_encoder``
and ``transformer`` in bf16, ``vae`` in f32, named blobs as in docs/format.md#named-blobs)
plus an int4 variant that shares every unquantized blob with it. It is written deterministically
into a store under the user cache directory and reused while complete; the command that
loads it is `_cli.cmd_demo`.

Tensor bytes are cheap to make: a few megabytes of normal values are drawn once per dtype
and each tensor is that block, rotated by an offset derived from its name and repeated, so
generation is bound by writing and hashing, not by a random number generator.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
import mlx.core as mx

from ._errors import AsyncWeightsError
from ._import import write_quantized
from ._manifest import (
    CONFIG_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    TENSOR_MEDIA_TYPE,
    Layer,
    build_manifest,
    decode_manifest,
)
from ._quant import quant_params, should_quantize
from ._store import ModelStore
from ._writer import (
    RawTensor,
    build_config,
    encode_json,
    write_blob,
    write_manifest,
    write_tensor_blob,
)


class Bar(Protocol):
    """Where generation reports its progress (the CLI's progress bar)."""

    def start(self, description: str, total: float) -> None: ...

    def update(self, completed: float) -> None: ...

    def clear(self) -> None: ...


__all__ = [
    "DEMO_MODEL",
    "Bar",
    "cache_dir",
    "demo_names",
    "demo_tensors",
    "ensure_demo",
    "remove_other_sizes",
]

DEMO_MODEL = "asyncweights-demo"
MiB = 1 << 20
_BLOCK_BYTES = 4 * MiB
_SHARES = {"text_encoder": 0.35, "transformer": 0.55, "vae": 0.10}
_QUANT = quant_params("int4")


@dataclass(frozen=True, slots=True)
class DemoTensor:
    """One generated tensor: logical name, safetensors dtype, shape and how it is filled."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    fill: str = "random"  # "random", "ones" or "zeros"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (2 if self.dtype == "BF16" else 4)


def cache_dir() -> Path:
    """The user cache directory of asyncweights: ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return Path(base or Path.home() / ".cache") / "asyncweights"


def size_tag(size: int) -> str:
    """``536870912`` → ``512mib``: the tag that tells demo sizes apart."""
    for unit, scale in (("gib", 1 << 30), ("mib", MiB), ("kib", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}b"


def demo_names(size: int) -> tuple[str, str]:
    """The names of the bf16/f32 model and its int4 variant for one size."""
    tag = size_tag(size)
    return f"{DEMO_MODEL}:{tag}", f"{DEMO_MODEL}:{tag}-int4"


def _largest(options: tuple[int, ...], fits: Any) -> int:
    return max([o for o in options if fits(o)] or [options[0]])


def demo_tensors(size: int) -> tuple[list[DemoTensor], dict[str, dict[str, Any]]]:
    """The tensors of a demo model of about `size` bytes, and each component's config."""
    budget = {c: size * share for c, share in _SHARES.items()}
    out: list[DemoTensor] = []
    # text_encoder: a small decoder-only LM (GQA attention, SwiGLU MLP), bf16.
    d = _largest(
        (128, 256, 512, 1024, 1536, 2048), lambda x: 23 * x * x * 4 <= budget["text_encoder"]
    )
    vocab = max(256, int(budget["text_encoder"] * 0.15 / (2 * d)) // 64 * 64)
    layers = max(1, round((budget["text_encoder"] - vocab * d * 2) / (23 * d * d)))
    te = "text_encoder/model."
    out.append(DemoTensor(te + "embed_tokens.weight", "BF16", (vocab, d)))
    for i in range(layers):
        p = f"{te}layers.{i}."
        out += [
            DemoTensor(p + "input_layernorm.weight", "BF16", (d,), "ones"),
            DemoTensor(p + "mlp.down_proj.weight", "BF16", (d, 3 * d)),
            DemoTensor(p + "mlp.gate_proj.weight", "BF16", (3 * d, d)),
            DemoTensor(p + "mlp.up_proj.weight", "BF16", (3 * d, d)),
            DemoTensor(p + "post_attention_layernorm.weight", "BF16", (d,), "ones"),
            DemoTensor(p + "self_attn.k_proj.weight", "BF16", (d // 4, d)),
            DemoTensor(p + "self_attn.o_proj.weight", "BF16", (d, d)),
            DemoTensor(p + "self_attn.q_proj.weight", "BF16", (d, d)),
            DemoTensor(p + "self_attn.v_proj.weight", "BF16", (d // 4, d)),
        ]
    out.append(DemoTensor(te + "norm.weight", "BF16", (d,), "ones"))
    configs: dict[str, dict[str, Any]] = {
        "text_encoder/config.json": {
            "architectures": ["Qwen3Model"], "hidden_size": d, "intermediate_size": 3 * d,
            "num_hidden_layers": layers, "vocab_size": vocab, "torch_dtype": "bfloat16",
        },
    }  # fmt: skip
    # transformer: a DiT with adaLN modulation, bf16.
    h = _largest(
        (128, 256, 512, 1024, 1536, 2048, 3072), lambda x: 44 * x * x * 4 <= budget["transformer"]
    )
    blocks = max(1, round(budget["transformer"] / (44 * h * h)))
    tr = "transformer/"
    out += [
        DemoTensor(tr + "t_embedder.mlp.0.weight", "BF16", (h, 256)),
        DemoTensor(tr + "t_embedder.mlp.2.weight", "BF16", (h, h)),
        DemoTensor(tr + "x_embedder.weight", "BF16", (h, 64)),
    ]
    for i in range(blocks):
        p = f"{tr}layers.{i}."
        out += [
            DemoTensor(p + "adaLN_modulation.0.bias", "BF16", (6 * h,), "zeros"),
            DemoTensor(p + "adaLN_modulation.0.weight", "BF16", (6 * h, h)),
            DemoTensor(p + "attention.to_k.weight", "BF16", (h, h)),
            DemoTensor(p + "attention.to_out.0.weight", "BF16", (h, h)),
            DemoTensor(p + "attention.to_q.weight", "BF16", (h, h)),
            DemoTensor(p + "attention.to_v.weight", "BF16", (h, h)),
            DemoTensor(p + "attention_norm1.weight", "BF16", (h,), "ones"),
            DemoTensor(p + "feed_forward.w1.weight", "BF16", (4 * h, h)),
            DemoTensor(p + "feed_forward.w2.weight", "BF16", (h, 4 * h)),
            DemoTensor(p + "feed_forward.w3.weight", "BF16", (4 * h, h)),
            DemoTensor(p + "ffn_norm1.weight", "BF16", (h,), "ones"),
        ]
    out.append(DemoTensor(tr + "final_layer.linear.weight", "BF16", (64, h)))
    configs["transformer/config.json"] = {
        "_class_name": "DemoTransformer2DModel", "dim": h, "n_layers": blocks, "in_channels": 16,
    }  # fmt: skip
    # vae: a convolutional decoder/encoder, f32.
    c = _largest((32, 64, 128, 256, 512), lambda x: 72 * x * x * 4 <= budget["vae"])
    resnets = max(2, round(budget["vae"] / (72 * c * c)))
    out += [
        DemoTensor("vae/decoder.conv_in.weight", "F32", (c, 16, 3, 3)),
        DemoTensor("vae/decoder.conv_out.weight", "F32", (3, c, 3, 3)),
    ]
    for i in range(resnets):
        side = "decoder.up_blocks" if i < (resnets + 1) // 2 else "encoder.down_blocks"
        p = f"vae/{side}.{i // 2}.resnets.{i % 2}."
        out += [
            DemoTensor(p + "conv1.bias", "F32", (c,), "zeros"),
            DemoTensor(p + "conv1.weight", "F32", (c, c, 3, 3)),
            DemoTensor(p + "conv2.bias", "F32", (c,), "zeros"),
            DemoTensor(p + "conv2.weight", "F32", (c, c, 3, 3)),
            DemoTensor(p + "norm1.bias", "F32", (c,), "zeros"),
            DemoTensor(p + "norm1.weight", "F32", (c,), "ones"),
            DemoTensor(p + "norm2.bias", "F32", (c,), "zeros"),
            DemoTensor(p + "norm2.weight", "F32", (c,), "ones"),
        ]
    out.append(DemoTensor("vae/encoder.conv_in.weight", "F32", (c, 3, 3, 3)))
    configs["vae/config.json"] = {
        "_class_name": "AutoencoderKL", "block_out_channels": [c], "latent_channels": 16,
        "torch_dtype": "float32",
    }  # fmt: skip
    order = {comp: i for i, comp in enumerate(_SHARES)}
    out.sort(key=lambda t: (order[t.name.split("/", 1)[0]], t.name))
    return out, configs


class _Patterns:
    """The random blocks tensors are cut from, one per dtype, made once per process."""

    def __init__(self) -> None:
        self._blocks: dict[str, bytes] = {}

    def block(self, dtype: str) -> bytes:
        if dtype not in self._blocks:
            mlx_dtype = mx.bfloat16 if dtype == "BF16" else mx.float32
            count = _BLOCK_BYTES // (2 if dtype == "BF16" else 4)
            values = mx.random.normal([count], key=mx.random.key(0x5EED)) * 0.02
            array = values.astype(mlx_dtype)
            mx.eval(array)
            self._blocks[dtype] = bytes(memoryview(array))  # type: ignore[arg-type, unused-ignore]
        return self._blocks[dtype]

    def chunks(self, tensor: DemoTensor) -> Iterator[bytes]:
        """The tensor's bytes: its block rotated by a name-derived offset, repeated."""
        item = 2 if tensor.dtype == "BF16" else 4
        if tensor.fill != "random":
            one = {"BF16": b"\x80\x3f", "F32": b"\x00\x00\x80\x3f"}[tensor.dtype]
            yield (one if tensor.fill == "ones" else bytes(item)) * math.prod(tensor.shape)
            return
        block = self.block(tensor.dtype)
        seed = int.from_bytes(hashlib.sha256(tensor.name.encode()).digest()[:8], "little")
        offset = seed % (len(block) // item) * item
        remaining = tensor.nbytes
        start = offset
        while remaining > 0:
            piece = block[start : start + remaining]
            start = 0
            remaining -= len(piece)
            yield piece

    def array(self, tensor: DemoTensor) -> mx.array:
        data = b"".join(self.chunks(tensor))
        dtype = mx.bfloat16 if tensor.dtype == "BF16" else mx.float32
        # MLX reads any buffer; its stubs list only the array-like types.
        raw = mx.array(memoryview(data))  # type: ignore[arg-type]
        return mx.view(raw, dtype).reshape(tensor.shape)


def _write_plain(root: Path, patterns: _Patterns, tensor: DemoTensor) -> Layer:
    # Image-gen named blobs key an unquantized tensor by its bare name (docs/format.md#named-blobs).
    key = tensor.name.split("/", 1)[1]
    data = RawTensor(key, tensor.dtype, tensor.shape, patterns.chunks(tensor))
    blob = write_tensor_blob(root, [data], style="go")
    return Layer(TENSOR_MEDIA_TYPE, blob.digest, blob.size, tensor.name)


def _write_quantized(root: Path, patterns: _Patterns, tensor: DemoTensor) -> list[Layer]:
    return write_quantized(root, tensor.name, patterns.array(tensor), _QUANT, layout="named")


def _is_quantized(tensor: DemoTensor) -> bool:
    return should_quantize(tensor.name, tensor.dtype, tensor.shape, _QUANT.group_size)


def is_complete(store: ModelStore, name: str) -> bool:
    """Whether the model's manifest exists and every blob it names has the right size."""
    try:
        path = store.resolve(name)
    except AsyncWeightsError:
        return False
    try:
        manifest = decode_manifest(path.read_bytes())
    except (AsyncWeightsError, OSError):
        return False
    for layer in [manifest.config, *manifest.layers]:
        try:
            if store.blob_path(layer.digest).stat().st_size != layer.size:
                return False
        except OSError:
            return False
    return True


async def ensure_demo(store: ModelStore, size: int, out: Bar | None = None) -> float | None:
    """Write the demo models of `size` unless both are complete; return seconds spent or None."""
    names = demo_names(size)
    if all(is_complete(store, n) for n in names):
        return None
    started = time.perf_counter()
    tensors, configs = demo_tensors(size)
    patterns = _Patterns()
    root = store.root
    total = sum(t.nbytes for t in tensors) + sum(t.nbytes for t in tensors if _is_quantized(t))
    done = [0]
    if out is not None:
        out.start("generating demo", total)
    plain: list[Layer | None] = [None] * len(tensors)
    quant: list[list[Layer]] = [[] for _ in tensors]
    jobs = iter([(i, False) for i in range(len(tensors))] + [
        (i, True) for i, t in enumerate(tensors) if _is_quantized(t)
    ])  # fmt: skip

    async def worker() -> None:
        for i, quantized in jobs:
            t = tensors[i]
            if quantized:
                quant[i] = await anyio.to_thread.run_sync(_write_quantized, root, patterns, t)
            else:
                plain[i] = await anyio.to_thread.run_sync(_write_plain, root, patterns, t)
            done[0] += t.nbytes
            if out is not None:
                out.update(done[0])

    # Draw the blocks first, on this thread's stream, so workers only read bytes.
    patterns.block("BF16")
    patterns.block("F32")
    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(worker)
    base = [layer for layer in plain if layer is not None]
    variant = [q if q else [p] for p, q in zip(base, quant, strict=True)]
    count = sum(math.prod(t.shape) for t in tensors)
    for name, layers, label, file_type in (
        (names[0], base, "bfloat16", ""),
        (names[1], [x for group in variant for x in group], "INT4", "int4"),
    ):
        await anyio.to_thread.run_sync(
            _write_model, root, name, layers, configs, count, label, file_type
        )
    if out is not None:
        out.clear()
    return time.perf_counter() - started


def _write_model(
    root: Path,
    name: str,
    layers: list[Layer],
    configs: dict[str, dict[str, Any]],
    parameters: int,
    label: str,
    file_type: str,
) -> None:
    """Write the config layers, the config blob and, last, the manifest (blocking)."""
    index = {
        "architecture": "AsyncWeightsDemoPipeline",
        "parameter_count": parameters,
        "quantization": label,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "transformer": ["diffusers", "DemoTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    files = {"model_index.json": encode_json(index, indent=4)}
    files.update({path: encode_json(value, indent=2) for path, value in configs.items()})
    json_layers = []
    for path, data in files.items():
        blob = write_blob(root, [data])
        json_layers.append(Layer(JSON_MEDIA_TYPE, blob.digest, blob.size, path))
    config = build_config(file_type=file_type, capabilities=["image"], requires="0.14.0")
    blob = write_blob(root, [config])
    manifest = build_manifest(
        Layer(CONFIG_MEDIA_TYPE, blob.digest, blob.size), layers + json_layers
    )
    write_manifest(root, name, manifest)


def remove_other_sizes(store: ModelStore, size: int) -> list[str]:
    """Delete the demo models of other sizes and the blobs only they used (blocking)."""
    keep = set(demo_names(size))
    removed = []
    for name in store.list_names():
        if name.model == DEMO_MODEL and str(name) not in keep:
            store.manifest_path(name).unlink(missing_ok=True)
            removed.append(str(name))
    if not removed:
        return removed
    used: set[str] = set()
    for name in store.list_names():
        manifest = decode_manifest(store.manifest_path(name).read_bytes())
        used.update(layer.digest for layer in [manifest.config, *manifest.layers])
    for blob in store.blobs_dir.glob("sha256-*"):
        if "sha256:" + blob.name[7:] not in used:
            blob.unlink(missing_ok=True)
    return removed


def clear_cache() -> None:
    """Delete the demo store under the cache directory."""
    shutil.rmtree(cache_dir() / "demo", ignore_errors=True)
