"""GGUF models: asyncweights against ``mx.load`` of the same file, warm, in one run.

Two generated models, wrapped in a store as Ollama stores GGUF models:

* ``q4_0``: about 1 GiB, a llama-shaped model whose matrices are Q4_0 and whose token
  embedding and output are F16 (what ``mx.load`` converts too: Q4_0 to MLX affine 4-bit);
* ``q4_k_m``: the same shapes as Ollama's most common quantization mixes them: Q4_K
  attention and FFN gate/up, Q6_K FFN down and output. ``mx.load`` cannot read it.

Each figure is the median of ``--runs`` fresh processes, interleaved, page cache warm (the
file is read once before). asyncweights runs ``load_weights`` with a task sleeping 1 ms
beside it (the event-loop lag); ``mx.load`` runs ``mx.load(path)`` and one ``mx.eval``.
Quantized blocks are random bytes in ggml's layout with finite f16 scales: conversion cost
does not depend on the values. Usage::

    .venv/bin/python bench/gguf_models.py [--runs 3] [--scratch DIR] [--layers 22]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN, FFN, VOCAB = 2048, 5632, 48000


def _blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> np.ndarray:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n = rows * cols // block
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    at = {"Q4_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[qtype]
    for offset in at:
        scale = (rng.standard_normal(n) * 0.01).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, cols // block * size)


def generate(path: Path, kind: str, layers: int) -> None:
    """Write the model's GGUF file with llama.cpp's GGUFWriter, one tensor at a time."""
    import gguf

    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_file_type(2 if kind == "q4_0" else 15)
    q = "Q4_0" if kind == "q4_0" else "Q4_K"
    down = "Q4_0" if kind == "q4_0" else "Q6_K"
    tensors: list[tuple[str, str, tuple[int, int]]] = []
    embed = "F16" if kind == "q4_0" else "Q4_K"
    tensors.append(("token_embd.weight", embed, (VOCAB, HIDDEN)))
    for i in range(layers):
        for name, shape in (
            ("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (HIDDEN, HIDDEN)),
            ("attn_v", (HIDDEN, HIDDEN)), ("attn_output", (HIDDEN, HIDDEN)),
            ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)),
        ):  # fmt: skip
            tensors.append((f"blk.{i}.{name}.weight", q, shape))
        tensors.append((f"blk.{i}.ffn_down.weight", down, (HIDDEN, FFN)))
        tensors.append((f"blk.{i}.attn_norm.weight", "F32", (HIDDEN,)))  # type: ignore[arg-type]
        tensors.append((f"blk.{i}.ffn_norm.weight", "F32", (HIDDEN,)))  # type: ignore[arg-type]
    tensors.append(("output_norm.weight", "F32", (HIDDEN,)))  # type: ignore[arg-type]
    tensors.append(("output.weight", "F16" if kind == "q4_0" else "Q6_K", (VOCAB, HIDDEN)))
    for name, qtype, shape in tensors:
        if qtype == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        elif qtype == "F16":
            writer.add_tensor_info(name, shape, np.dtype(np.float16), 2 * shape[0] * shape[1])
        else:
            t = gguf.GGMLQuantizationType[qtype]
            block, size = gguf.GGML_QUANT_SIZES[t]
            byte_shape = (shape[0], shape[1] // block * size)
            nbytes = byte_shape[0] * byte_shape[1]
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, qtype, shape in tensors:
        if qtype == "F32":
            data = rng.standard_normal(shape).astype(np.float32)
        elif qtype == "F16":
            data = (rng.standard_normal(shape) * 0.02).astype(np.float16)
        else:
            data = _blocks(rng, qtype, *shape)
        writer.write_tensor_data(data)
    writer.close()


def ensure(scratch: Path, layers: int) -> dict[str, dict[str, Any]]:
    """Both models as GGUF files in a store under `scratch` (reused when present)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from asyncweights._manifest import Layer
    from asyncweights.testing import StoreBuilder

    store = scratch / f"gguf-store-{layers}"
    out = {}
    for kind in ("q4_0", "q4_k_m"):
        path = scratch / f"{kind}-{layers}.gguf"
        info = scratch / f"{kind}-{layers}.json"
        if not (path.exists() and info.exists()):
            generate(path, kind, layers)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(16 << 20):
                    digest.update(chunk)
            blobs = store / "blobs"
            blobs.mkdir(parents=True, exist_ok=True)
            blob = blobs / ("sha256-" + digest.hexdigest())
            if not blob.exists():
                os.link(path, blob)
            # the file itself becomes the blob (a hard link): no 1 GiB copy
            builder = StoreBuilder(store)
            layer = Layer("application/vnd.ollama.image.model", "sha256:" + digest.hexdigest(),
                          path.stat().st_size, "")  # fmt: skip
            config = builder.add_raw_config({"model_format": "gguf", "file_type": kind})
            manifest = builder.write_manifest(f"bench-{kind}", [layer], config=config)
            facts = {"path": str(path), "store": str(store), "manifest": str(manifest),
                     "bytes": path.stat().st_size}  # fmt: skip
            info.write_text(json.dumps(facts))
        out[kind] = json.loads(info.read_text())
    return out


def run_one(strategy: str, model: dict[str, Any], kind: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import mlx.core as mx

    with open(model["path"], "rb") as f:  # warm: the file is in the page cache
        while f.read(64 << 20):
            pass
    if strategy == "mx.load":
        start = time.perf_counter()
        try:
            arrays = mx.load(model["path"])
            assert isinstance(arrays, dict)
            mx.eval(list(arrays.values()))
        except (RuntimeError, ValueError) as exc:
            return {"error": str(exc).splitlines()[0][:80]}
        return {"seconds": time.perf_counter() - start, "tensors": len(arrays)}
    import anyio

    import asyncweights as aw

    lags: list[float] = []

    async def main() -> dict[str, Any]:
        done = anyio.Event()

        async def ticker() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await anyio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            start = time.perf_counter()
            weights = await aw.load_weights(f"bench-{kind}", store=model["store"])
            seconds = time.perf_counter() - start
            done.set()
        return {"seconds": seconds, "tensors": len(weights)}

    result = anyio.run(main)
    lags.sort()
    result["lag_p99_ms"] = 1e3 * lags[min(len(lags) - 1, int(0.99 * len(lags)))]
    result["lag_max_ms"] = 1e3 * lags[-1]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/asyncweights-bench"))
    parser.add_argument("--one", nargs=3, metavar=("STRATEGY", "KIND", "JSON"))
    args = parser.parse_args()
    if args.one:
        strategy, kind, info = args.one
        print(json.dumps(run_one(strategy, json.loads(info), kind)))
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    models = ensure(args.scratch, args.layers)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    plan = [("q4_0", "mx.load"), ("q4_0", "asyncweights"), ("q4_k_m", "mx.load"),
            ("q4_k_m", "asyncweights")]  # fmt: skip
    for _ in range(args.runs):
        for kind, strategy in plan:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", strategy, kind, json.dumps(models[kind])],
                capture_output=True, text=True, env=env, timeout=600, check=True,
            )  # fmt: skip
            results.setdefault((kind, strategy), []).append(json.loads(proc.stdout))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)")
    print("| model | file | loader | median s | GB/s | vs mx.load | loop lag p99 / max ms |")
    print("|---|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    for kind, strategy in plan:
        runs = results[(kind, strategy)]
        size = models[kind]["bytes"]
        if "error" in runs[0]:
            print(f"| {kind} | {size / 2**30:.2f} GiB | {strategy} | fails: {runs[0]['error']} "
                  "| | | |")  # fmt: skip
            continue
        seconds = statistics.median(r["seconds"] for r in runs)
        if strategy == "mx.load":
            base[kind] = seconds
        ratio = f"{base[kind] / seconds:.2f}x" if kind in base and strategy != "mx.load" else ""
        lag = ""
        if "lag_p99_ms" in runs[0]:
            p99 = statistics.median(r["lag_p99_ms"] for r in runs)
            worst = max(r["lag_max_ms"] for r in runs)
            lag = f"{p99:.1f} / {worst:.1f}"
        print(f"| {kind} | {size / 2**30:.2f} GiB | {strategy} | {seconds:.2f} | "
              f"{size / seconds / 1e9:.2f} | {ratio} | {lag} |")  # fmt: skip


if __name__ == "__main__":
    main()
