"""Generate the benchmark models: "big" and "small" in a scratch store, plus one-file copies.

    python bench/generate.py [--scratch DIR] [--size full|smoke] [--scale F]

Both models use image-gen names (``text_encoder/…``, ``transformer/…``, ``vae/…``), one
tensor per blob, written by `asyncweights.testing.StoreBuilder`. The same tensors are also
written as one safetensors file each (keys = layer names), the layout mlx-lm loads.

Bytes are cheap and deterministic: every tensor is a window of a fixed pool of N(0, 0.02)
values, made once from a seeded numpy generator, starting at an offset derived from the
tensor's index; its first four bytes carry the index, so no two blobs share a digest. A store
already generated with the same spec is checked (every blob present, sizes right) and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from asyncweights._manifest import JSON_MEDIA_TYPE
from asyncweights._writer import RawTensor, iter_safetensors
from asyncweights.testing import StoreBuilder

GENERATOR_VERSION = 1
DEFAULT_SCRATCH = Path(os.environ.get("TMPDIR", "/tmp")) / "asyncweights-bench"
COMPONENTS = ("text_encoder", "transformer", "vae")
_POOL_BYTES = 8 << 20
_SIZES = {"BF16": 2, "F32": 4}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a generated model: full layer name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _SIZES[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True)
class ModelPaths:
    """Where one generated model lives, and what it holds."""

    kind: str
    name: str
    store: str
    manifest: str
    single: str
    tensors: int
    blob_bytes: int
    tensor_bytes: int
    blobs: list[str]

    @classmethod
    def load(cls, path: Path) -> ModelPaths:
        return cls(**json.loads(path.read_text()))


def _width(base: int, factor: float) -> int:
    return max(16, round(base * factor / 16) * 16)


def big_spec(scale: float) -> list[TensorSpec]:
    """~2 GiB at scale 1, ~600 tensors: a CLIP-like encoder, a DiT, an f32 conv VAE."""
    f = math.sqrt(scale)
    out: list[TensorSpec] = []

    def add(name: str, dtype: str, *shape: int) -> None:
        out.append(TensorSpec(name, dtype, shape))

    d = _width(1280, f)
    te = "text_encoder/text_model."
    add(te + "embeddings.token_embedding.weight", "BF16", 49408, d)
    add(te + "embeddings.position_embedding.weight", "BF16", 77, d)
    for i in range(12):
        p = f"{te}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(p + f"self_attn.{proj}.weight", "BF16", d, d)
            add(p + f"self_attn.{proj}.bias", "BF16", d)
        add(p + "mlp.fc1.weight", "BF16", 4 * d, d)
        add(p + "mlp.fc1.bias", "BF16", 4 * d)
        add(p + "mlp.fc2.weight", "BF16", d, 4 * d)
        add(p + "mlp.fc2.bias", "BF16", d)
        for norm in ("layer_norm1", "layer_norm2"):
            add(p + f"{norm}.weight", "F32", d)
            add(p + f"{norm}.bias", "F32", d)
    add(te + "final_layer_norm.weight", "F32", d)
    add(te + "final_layer_norm.bias", "F32", d)

    d = _width(1536, f)
    tr = "transformer/"
    add(tr + "x_embedder.proj.weight", "BF16", d, 16, 2, 2)
    add(tr + "x_embedder.proj.bias", "BF16", d)
    add(tr + "t_embedder.mlp.0.weight", "BF16", d, 256)
    add(tr + "t_embedder.mlp.0.bias", "BF16", d)
    add(tr + "t_embedder.mlp.2.weight", "BF16", d, d)
    add(tr + "t_embedder.mlp.2.bias", "BF16", d)
    for i in range(15):
        p = f"{tr}blocks.{i}."
        add(p + "attn.qkv.weight", "BF16", 3 * d, d)
        add(p + "attn.qkv.bias", "BF16", 3 * d)
        add(p + "attn.proj.weight", "BF16", d, d)
        add(p + "attn.proj.bias", "BF16", d)
        add(p + "attn.q_norm.weight", "F32", 64)
        add(p + "attn.k_norm.weight", "F32", 64)
        add(p + "mlp.fc1.weight", "BF16", 4 * d, d)
        add(p + "mlp.fc1.bias", "BF16", 4 * d)
        add(p + "mlp.fc2.weight", "BF16", d, 4 * d)
        add(p + "mlp.fc2.bias", "BF16", d)
        add(p + "adaLN_modulation.1.weight", "BF16", 6 * d, d)
        add(p + "adaLN_modulation.1.bias", "BF16", 6 * d)
    add(tr + "final_layer.adaLN_modulation.1.weight", "BF16", 2 * d, d)
    add(tr + "final_layer.adaLN_modulation.1.bias", "BF16", 2 * d)
    add(tr + "final_layer.linear.weight", "BF16", 64, d)
    add(tr + "final_layer.linear.bias", "BF16", 64)

    channels = [_width(c, f) for c in (128, 256, 512, 512)]

    def resnet(p: str, cin: int, cout: int) -> None:
        add(p + "norm1.weight", "F32", cin)
        add(p + "norm1.bias", "F32", cin)
        add(p + "conv1.weight", "F32", cout, cin, 3, 3)
        add(p + "conv1.bias", "F32", cout)
        add(p + "norm2.weight", "F32", cout)
        add(p + "norm2.bias", "F32", cout)
        add(p + "conv2.weight", "F32", cout, cout, 3, 3)
        add(p + "conv2.bias", "F32", cout)

    add("vae/encoder.conv_in.weight", "F32", channels[0], 3, 3, 3)
    add("vae/encoder.conv_in.bias", "F32", channels[0])
    cin = channels[0]
    for level, c in enumerate(channels):
        for j in range(2):
            resnet(f"vae/encoder.down_blocks.{level}.resnets.{j}.", cin, c)
            cin = c
    for part in ("encoder", "decoder"):
        for j in range(2):
            resnet(f"vae/{part}.mid_block.resnets.{j}.", channels[-1], channels[-1])
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            add(f"vae/{part}.mid_block.attentions.0.{proj}.weight", "F32", *[channels[-1]] * 2)
            add(f"vae/{part}.mid_block.attentions.0.{proj}.bias", "F32", channels[-1])
    cin = channels[-1]
    for level, c in enumerate(reversed(channels)):
        for j in range(3):
            resnet(f"vae/decoder.up_blocks.{level}.resnets.{j}.", cin, c)
            cin = c
    add("vae/decoder.conv_out.weight", "F32", 3, channels[0], 3, 3)
    add("vae/decoder.conv_out.bias", "F32", 3)
    return out


def small_spec(scale: float, blocks: int) -> list[TensorSpec]:
    """~0.5 GiB at scale 1 with 512 blocks of 10 tensors: per-blob overhead dominates."""
    d = _width(512, math.sqrt(scale))
    out: list[TensorSpec] = []
    split = (blocks // 4, blocks - blocks // 8)  # text_encoder | transformer | vae
    for i in range(blocks):
        comp = COMPONENTS[0] if i < split[0] else COMPONENTS[1] if i < split[1] else COMPONENTS[2]
        p = f"{comp}/blocks.{i}."
        out += [
            TensorSpec(p + "attn.weight", "BF16", (d, d)),
            TensorSpec(p + "attn.bias", "BF16", (d,)),
            TensorSpec(p + "mlp.weight", "BF16", (3 * d // 4, d)),
            TensorSpec(p + "mlp.bias", "BF16", (3 * d // 4,)),
            TensorSpec(p + "gate.weight", "F32", (d // 8, d)),
            TensorSpec(p + "gate.bias", "F32", (d // 8,)),
            TensorSpec(p + "norm1.weight", "F32", (d,)),
            TensorSpec(p + "norm1.bias", "F32", (d,)),
            TensorSpec(p + "norm2.weight", "BF16", (d,)),
            TensorSpec(p + "norm2.bias", "BF16", (d,)),
        ]
    return out


class _Pools:
    """Fixed pools of N(0, 0.02) values, bf16 and f32, doubled so any window is contiguous."""

    def __init__(self, seed: int = 20240611) -> None:
        values = np.random.default_rng(seed).standard_normal(_POOL_BYTES // 4, dtype=np.float32)
        values *= 0.02
        f32 = values.tobytes()
        # bf16 is the high half of an f32: truncation keeps every value finite.
        bf16 = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        bf16 = (bf16 * 2)[:_POOL_BYTES]
        self.pools = {"F32": memoryview(f32 * 2), "BF16": memoryview(bf16 * 2)}

    def chunks(self, spec: TensorSpec, index: int) -> Iterator[memoryview | bytes]:
        pool = self.pools[spec.dtype]
        size = _SIZES[spec.dtype]
        stamp = _stamp(index, spec.dtype)
        remaining = spec.nbytes - len(stamp)
        if remaining < 0:
            raise ValueError(f"{spec.name}: too small for the index stamp")
        yield stamp
        offset = (index * 7919 * size + len(stamp)) % (_POOL_BYTES // 2)
        offset -= offset % size
        while remaining:
            n = min(remaining, _POOL_BYTES // 2)
            yield pool[offset : offset + n]
            remaining -= n
            offset = (offset + n) % (_POOL_BYTES // 2)


def _stamp(index: int, dtype: str) -> bytes:
    """Four bytes that make a tensor unique: small integers, exact (and finite) in bf16."""
    hi, lo = divmod(index, 256)
    if dtype == "F32":
        return np.array([index], dtype=np.float32).tobytes()
    return (np.array([hi, lo], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def _model_index(kind: str) -> dict[str, object]:
    return {
        "_class_name": f"Bench{kind.title()}Pipeline",
        **{c: ["diffusers", "Synthetic"] for c in COMPONENTS},
    }


def generate(kind: str, specs: list[TensorSpec], scratch: Path, tag: str) -> ModelPaths:
    """Write one model (store blobs, configs, manifest) and its one-file copy."""
    store = scratch / "store"
    builder = StoreBuilder(store)
    pools = _Pools()
    layers = []
    for index, spec in enumerate(specs):
        comp, _, key = spec.name.partition("/")
        tensor = RawTensor(key, spec.dtype, spec.shape, pools.chunks(spec, index))
        layers.append(builder.add_blob(spec.name, [tensor]))
    layers.append(builder.add_json("model_index.json", _model_index(kind)))
    for comp in COMPONENTS:
        layers.append(builder.add_json(f"{comp}/config.json", {"_class_name": comp}))
    name = f"bench/{kind}:{tag}"
    config = builder.add_config(capabilities=["image"])
    manifest = builder.write_manifest(name, layers, config=config)

    single = scratch / "single" / f"{kind}-{tag}.safetensors"
    single.parent.mkdir(parents=True, exist_ok=True)
    tmp = single.with_suffix(".tmp")
    tensors = [RawTensor(s.name, s.dtype, s.shape, pools.chunks(s, i)) for i, s in enumerate(specs)]
    with open(tmp, "wb") as f:
        for chunk in iter_safetensors(tensors, style="go"):
            f.write(chunk)
    os.replace(tmp, single)

    tensor_layers = [la for la in layers if la.media_type != JSON_MEDIA_TYPE]
    return ModelPaths(
        kind=kind,
        name=name,
        store=str(store),
        manifest=str(manifest),
        single=str(single),
        tensors=len(specs),
        blob_bytes=sum(la.size for la in tensor_layers),
        tensor_bytes=sum(s.nbytes for s in specs),
        blobs=[str(store / "blobs" / la.digest.replace(":", "-")) for la in tensor_layers],
    )


@dataclass(frozen=True)
class Size:
    """A size preset: byte scale of "big", and the small model's block count and byte scale."""

    scale: float
    small_blocks: int
    small_scale: float = 1.0

    @property
    def tag(self) -> str:
        if self == SIZES["full"]:
            return "full"
        if self == SIZES["smoke"]:
            return "smoke"
        return f"s{self.scale:g}-b{self.small_blocks}-{self.small_scale:g}".replace(".", "p")


# smoke: ~60 MiB "big" (598 tensors) and 16 MiB "small" (640 tensors)
SIZES = {"full": Size(1.0, 512), "smoke": Size(1 / 48, 64, 0.25)}


def _spec_digest(kind: str, specs: list[TensorSpec]) -> str:
    text = json.dumps([GENERATOR_VERSION, kind, [asdict(s) for s in specs]])
    return hashlib.sha256(text.encode()).hexdigest()


def _reusable(info_path: Path, digest: str) -> ModelPaths | None:
    try:
        info = json.loads(info_path.read_text())
        paths = ModelPaths(**info["paths"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("spec") != digest or not Path(paths.manifest).is_file():
        return None
    sizes = [os.stat(b).st_size for b in paths.blobs if os.path.isfile(b)]
    if len(sizes) != paths.tensors or sum(sizes) != paths.blob_bytes:
        return None
    if not os.path.isfile(paths.single) or os.stat(paths.single).st_size < paths.tensor_bytes:
        return None
    return paths


def ensure_models(scratch: Path, size: Size, *, log: bool = True) -> dict[str, ModelPaths]:
    """Generate "big" and "small" under ``scratch`` unless a matching copy is there already."""
    out = {}
    scratch.mkdir(parents=True, exist_ok=True)
    for kind in ("big", "small"):
        if kind == "big":
            specs = big_spec(size.scale)
        else:
            specs = small_spec(size.small_scale, size.small_blocks)
        digest = _spec_digest(kind, specs)
        info_path = scratch / f"{kind}-{size.tag}.json"
        paths = _reusable(info_path, digest)
        if paths is None:
            started = time.monotonic()
            paths = generate(kind, specs, scratch, size.tag)
            info_path.write_text(json.dumps({"spec": digest, "paths": asdict(paths)}))
            if log:
                print(
                    f"generated {paths.name}: {paths.tensors} tensors, "
                    f"{paths.blob_bytes / 2**30:.3f} GiB in {time.monotonic() - started:.1f} s",
                    file=sys.stderr,
                )
        elif log:
            print(f"reusing {paths.name} in {scratch}", file=sys.stderr)
        out[kind] = paths
    return out


def size_from_args(args: argparse.Namespace) -> Size:
    size = SIZES[args.size]
    if args.scale is not None:
        blocks = max(8, round(size.small_blocks * min(1.0, args.scale * 4)))
        size = Size(args.scale, blocks, args.scale)
    return size


def add_size_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH, help="scratch folder")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="size preset")
    parser.add_argument("--scale", type=float, help="byte scale of both models (1 = full)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    add_size_args(parser)
    args = parser.parse_args()
    for paths in ensure_models(args.scratch, size_from_args(args)).values():
        print(json.dumps(asdict(paths) | {"blobs": len(paths.blobs)}))


if __name__ == "__main__":
    main()
