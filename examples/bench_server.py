"""Measure examples/server.py under load: single flight across clients, /health latency.

    python examples/bench_server.py                  # builds a ~1 GiB model in a temp dir
    python examples/bench_server.py --store ~/.ollama/models --model z-image --component vae

Each round evicts the model, then `--clients` clients POST /load at once while one more
client polls GET /health back to back; it reports how many loads the server ran and the
/health latencies seen while the load was in flight, against an idle baseline. Loads are
warm (the blobs stay in the page cache between rounds). Timing belongs here, not in the
unit tests: shared machines are too noisy for a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx

SERVER = Path(__file__).resolve().parent / "server.py"
MiB = 1 << 20


def build_model(root: Path, size_mib: int) -> str:
    """A synthetic model of `size_mib` MiB: bf16 tensors of 32 MiB under ``transformer/``."""
    from asyncweights.testing import StoreBuilder, random_weights

    count = max(1, size_mib // 32)
    shapes = {f"transformer/blocks.{i}.weight": (4096, 4096) for i in range(count)}
    StoreBuilder(root).add_model("bench:latest", random_weights(shapes, seed=0))
    return "bench"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(ms: Sequence[float]) -> str:
    return (
        f"n={len(ms)} p50={statistics.median(ms):.2f} ms p99={percentile(ms, 99):.2f} ms "
        f"max={max(ms):.2f} ms"
    )


async def health_ms(client: httpx.AsyncClient) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = await client.get("/health")
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return elapsed, response.json()["stats"]


async def load(client: httpx.AsyncClient, model: str, component: str | None) -> dict[str, Any]:
    last: dict[str, Any] = {}
    body = {"model": model, "component": component}
    async with client.stream("POST", "/load", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                last = json.loads(line.removeprefix("data: "))
    return last


async def one_round(
    loader: httpx.AsyncClient,
    prober: httpx.AsyncClient,
    model: str,
    component: str | None,
    clients: int,
) -> tuple[list[dict[str, Any]], list[float], float]:
    """All clients load at once while /health is polled; their final events, the /health
    latencies seen while a load was in flight or waited for, and the seconds it took."""
    finals: list[dict[str, Any]] = []
    samples: list[float] = []
    done = anyio.Event()

    async def client() -> None:
        finals.append(await load(loader, model, component))

    async def probe() -> None:
        while not done.is_set():
            ms, now = await health_ms(prober)
            if now["loading"] or now["waiters"]:
                samples.append(ms)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        async with anyio.create_task_group() as clients_tg:
            for _ in range(clients):
                clients_tg.start_soon(client)
        elapsed = time.perf_counter() - started
        done.set()
    return finals, samples, elapsed


async def run(base_url: str, model: str, component: str | None, clients: int, rounds: int) -> int:
    limits = httpx.Limits(max_connections=clients + 1)
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as loader,
        httpx.AsyncClient(base_url=base_url, timeout=60) as prober,
    ):
        idle = [(await health_ms(prober))[0] for _ in range(300)]
        print(f"/health idle:         {summary(idle)}")
        during: list[float] = []
        failures = 0
        for round_ in range(1, rounds + 1):
            await loader.delete(f"/models/{model}")  # 404 on the first round: fine
            _, before = await health_ms(prober)
            finals, samples, elapsed = await one_round(loader, prober, model, component, clients)
            _, after = await health_ms(prober)
            ok = sum(f.get("status") == "success" for f in finals)
            failures += clients - ok
            loads = after["loads"] - before["loads"]
            shared = (after["joins"] - before["joins"]) + (after["hits"] - before["hits"])
            size = after["bytes_held"]
            print(
                f"round {round_}: {clients} clients, {ok} success, {loads} load(s), "
                f"{shared} shared; {size / MiB:.0f} MiB in {elapsed:.2f} s "
                f"({size / MiB / 1024 / elapsed:.2f} GiB/s); /health during load: "
                + (summary(samples) if samples else "no samples")
            )
            during += samples
        if during:
            print(f"/health during loads: {summary(during)}")
        return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="an existing models root (default: build one)")
    parser.add_argument("--model", help="the model to load (with --store)")
    parser.add_argument("--component", default="transformer")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the built model")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, help="the server's Limits.workers")
    parser.add_argument("--group-bytes", type=int, help="the server's Limits.group_bytes")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="aw-bench-") as tmp:
        if args.store:
            root, model = Path(args.store), args.model
            if not model:
                parser.error("--model is needed with --store")
        else:
            root = Path(tmp) / "store"
            started = time.perf_counter()
            model = build_model(root, args.size_mib)
            print(f"built {model!r} ({args.size_mib} MiB) in {time.perf_counter() - started:.1f} s")
        command = [sys.executable, str(SERVER), "--store", str(root), "--port", "0"]
        if args.workers:
            command += ["--workers", str(args.workers)]
        if args.group_bytes:
            command += ["--group-bytes", str(args.group_bytes)]
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("listening on "):
                print(f"server did not start: {line!r}", file=sys.stderr)
                return 1
            base_url = line.split()[-1]
            component = args.component or None
            return anyio.run(run, base_url, model, component, args.clients, args.rounds)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
