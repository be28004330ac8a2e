"""Event-loop lag while asyncweights decodes untrusted metadata at the default caps.

A 1 ms ticker runs beside each decode; the figure is its worst lateness. The target is a
max lag of 10 ms or less even at the caps (`aw.Limits`: 64 MiB manifests with 262,144
layers, 64 MiB configs, 64 MiB headers with 262,144 tensors), so a server stays responsive
while a hostile or huge file is decoded and refused. Each case runs on asyncio and trio:

    manifest-layers   a manifest of max_layers layers (~45 MiB), decoded and accepted
    manifest-strings  a 64 MiB manifest whose unknown field holds 256 KiB strings
    header-tensors    a header of max_tensors entries (~30 MiB), refused after decoding
                      (one trailing byte), so only the decode and validation are timed
    header-metadata   a 60 MiB header whose __metadata__ is 256 KiB strings
    config-vocab      a 60 MiB tokenizer-like JSON config read with Model.read_config: six
                      objects of MAX_KEYS (349,525) keys each, the most one may have
    before            the same cases decoded by one msgspec call each, as before (the
                      decode alone, in a worker thread): what the steps avoid

What a case decodes is freed off the event loop, piecewise (`release`): freeing a tree of
millions of objects in one go holds the GIL for tens of milliseconds (262,143 `Layer`s:
17-20 ms), and that is the caller's to schedule, not decoding.

    python bench/hostile_lag.py [--scratch DIR] [--json out.json] [--smoke]

``--smoke`` builds every case far smaller (seconds in all; still past the sizes that are
decoded in one call, so the stepwise paths run): it checks that the script works, not lag.

Not a test (timing on a shared machine varies); the results are quoted in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import mlx.core as mx
import msgspec

import asyncweights as aw
from asyncweights._json import MAX_KEYS, MAX_TOKEN, release
from asyncweights.testing import StoreBuilder

MiB = 1 << 20
DIGEST = "sha256:" + "0" * 64
LIMITS = aw.Limits()


class Ticker:
    def __init__(self) -> None:
        self.max_lag = 0.0
        self.ticks = 0

    async def run(self) -> None:
        while True:
            start = time.perf_counter()
            await anyio.sleep(0.001)
            self.max_lag = max(self.max_lag, time.perf_counter() - start - 0.001)
            self.ticks += 1


async def measure(action: Callable[[], Awaitable[str]]) -> dict[str, Any]:
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.05)
        ticker.max_lag = 0.0
        started = time.perf_counter()
        outcome = await action()
        seconds = time.perf_counter() - started
        tg.cancel_scope.cancel()
    return {"max_lag_ms": round(ticker.max_lag * 1e3, 2), "seconds": round(seconds, 3),
            "ticks": ticker.ticks, "outcome": outcome}  # fmt: skip


def _layer(i: int) -> dict[str, Any]:
    return {
        "mediaType": "application/vnd.ollama.image.tensor",
        "digest": f"sha256:{i:064x}",
        "size": i,
        "name": f"model.layers.{i}.weight",
    }


def build(scratch: Path, smoke: bool = False) -> dict[str, Any]:
    """Write the store (once) and return what each case opens."""
    # The smoke sizes stay above the one-call sizes (4 MiB manifests, 64 KiB headers and
    # configs), so every stepwise path still runs.
    layer_count = 30_000 if smoke else LIMITS.max_layers - 1
    manifest_bytes = 8 * MiB if smoke else LIMITS.max_manifest_bytes
    tensors = 5_000 if smoke else LIMITS.max_tensors
    header_bytes = 8 * MiB if smoke else LIMITS.max_header_bytes
    objects, keys = (2, 10_000) if smoke else (6, MAX_KEYS)
    root = scratch / "store"
    b = StoreBuilder(root)
    config = b.add_config()
    from asyncweights._writer import write_manifest

    base = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": msgspec.to_builtins(config)}  # fmt: skip
    layers = [_layer(i) for i in range(layer_count)]
    write_manifest(root, "many-layers", json.dumps({**base, "layers": layers}).encode())
    strings = ["x" * (MAX_TOKEN - 16)] * (manifest_bytes // MAX_TOKEN - 4)
    write_manifest(root, "big-strings", json.dumps({**base, "layers": [], "x": strings}).encode())

    def header_blob(name: str, header: dict[str, Any], data: int) -> dict[str, Any]:
        text = json.dumps(header, separators=(",", ":")).encode()
        raw = len(text).to_bytes(8, "little") + text + bytes(data + 1)  # one trailing byte
        layer = b.add_bytes(name, raw)
        b.write_manifest(name, [layer], config=config)
        return {"bytes": len(text)}

    n = tensors
    entries = {f"model.layers.{i}.w": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
               for i in range(n)}  # fmt: skip
    sizes = {"header-tensors": header_blob("header-tensors", entries, n)}
    meta = {f"k{i}": "v" * (MAX_TOKEN - 16) for i in range(header_bytes // MAX_TOKEN - 16)}
    sizes["header-metadata"] = header_blob("header-metadata", {"__metadata__": meta}, 0)
    # A tokenizer.json's vocabulary and five more objects like it, each of `keys` keys.
    tables = [{f"tok{j}.{i}_abcdef": i for i in range(keys)} for j in range(objects)]
    document = {"model": {"vocab": tables[0]}} | {f"table{j}": t for j, t in enumerate(tables)}
    del document["table0"]
    vocab_layer = b.add_json("tokenizer.json", document)
    weights = b.add_blob("w", {"w": mx.zeros((2,))})
    b.write_manifest("config-vocab", [weights, vocab_layer], config=config)
    return {"root": root, "sizes": sizes}


async def cases(root: Path) -> dict[str, Callable[[], Awaitable[str]]]:
    store = aw.ModelStore(root)

    async def open_model(name: str) -> str:
        try:
            model = await store.open(name)
        except aw.AsyncWeightsError as exc:
            return f"{type(exc).__name__}: {exc.reason[:60]}"
        count = len(model.manifest.layers)
        # Freeing 262,143 Layers in one go takes 17-20 ms: the caller's, done off the loop.
        await anyio.to_thread.run_sync(release, model.manifest.layers)
        return f"ok, {count} layers"

    async def load(name: str) -> str:
        try:
            await aw.load_weights(name, store=store)
        except aw.AsyncWeightsError as exc:
            return f"{type(exc).__name__}: {exc.reason[:60]}"
        return "ok"

    async def config() -> str:
        model = await store.open("config-vocab")
        value = await model.read_config("tokenizer.json")
        count = len(value["model"]["vocab"]) + sum(len(v) for k, v in value.items() if k != "model")
        # Freeing the 2.1M-entry result is the caller's work: done piecewise, off the loop.
        await anyio.to_thread.run_sync(release, value)
        return f"ok, {count} keys"

    def one_call(path: Path, *, header: bool = False) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            data = await anyio.Path(path).read_bytes()
            if header:
                data = data[8 : 8 + int.from_bytes(data[:8], "little")]
            await anyio.to_thread.run_sync(msgspec.json.decode, data)
            return f"ok, {len(data) // MiB} MiB in one call"

        return run

    blobs = root / "blobs"
    manifests = root / "manifests/registry.ollama.ai/library"

    def blob_of(name: str) -> Path:
        digest = json.loads((manifests / name / "latest").read_bytes())["layers"][0]["digest"]
        return blobs / digest.replace(":", "-")

    index = json.loads((manifests / "config-vocab" / "latest").read_bytes())
    vocab = blobs / index["layers"][1]["digest"].replace(":", "-")
    return {
        "manifest-layers": lambda: open_model("many-layers"),
        "manifest-strings": lambda: open_model("big-strings"),
        "header-tensors": lambda: load("header-tensors"),
        "header-metadata": lambda: load("header-metadata"),
        "config-vocab": config,
        "before: manifest-layers": one_call(manifests / "many-layers" / "latest"),
        "before: header-tensors": one_call(blob_of("header-tensors"), header=True),
        "before: config-vocab": one_call(vocab),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny inputs: check the script runs")
    parser.add_argument("--only", action="append", default=None, help="run this case (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="run each case this many times")
    args = parser.parse_args()
    options = {"smoke": args.smoke, "only": args.only, "repeat": args.repeat}
    if args.scratch is not None:
        run(args.scratch, args.json, **options)
        return
    with tempfile.TemporaryDirectory(prefix="aw-hostile-") as scratch:
        run(Path(scratch), args.json, **options)


def run(
    scratch: Path, json_out: Path | None, *, smoke: bool, only: list[str] | None, repeat: int
) -> None:
    built = build(scratch, smoke=smoke)
    results: list[dict[str, Any]] = []

    async def run_all(backend: str) -> None:
        for name, action in (await cases(built["root"])).items():
            for _ in range(repeat if only is None or name in only else 0):
                await one(backend, name, action)

    async def one(backend: str, name: str, action: Callable[[], Awaitable[str]]) -> None:
        result = await measure(action)
        results.append({"case": name, "backend": backend, **result})
        print(
            f"{backend:8} {name:26} max lag {result['max_lag_ms']:8.2f} ms "
            f"in {result['seconds']:7.3f} s  {result['outcome']}",
            flush=True,
        )

    for backend in ("asyncio", "trio"):
        anyio.run(run_all, backend, backend=backend)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"switch interval {sys.getswitchinterval() * 1e3:g} ms")  # fmt: skip
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
