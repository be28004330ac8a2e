"""Sharded loads in real multi-process groups: MLX's ``ring`` backend over 127.0.0.1.

Each test starts its ranks itself (free loopback ports, a JSON host file, ``MLX_RANK`` and
``MLX_HOSTFILE`` per process; or ``mlx.launch`` for the CLI), bounds them in time and always
kills and reaps them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest

from asyncweights._cli import format_bytes
from asyncweights.testing import BuiltModel, StoreBuilder, random_array

from .shard_support import (
    MODEL,
    QUANTIZE,
    SHAPES,
    blob_paths,
    build,
    expected,
    header_bytes,
    split_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "shard_worker.py"
TIMEOUT = 150.0
DIMS, HIDDEN = 96, 192


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env.pop("MLX_RANK", None)
    env.pop("MLX_HOSTFILE", None)
    env.update(extra)
    return env


def _run_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[str]:
    """Wait for every process (bounded); on any failure or timeout kill them all. Reaped."""
    outputs: list[str] = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=10)
    for p, text in zip(procs, outputs, strict=False):
        assert p.returncode == 0, f"rank exited {p.returncode}:\n{text[-4000:]}"
    return outputs


def _build_all(builder: StoreBuilder, refs: Path, worlds: list[int]) -> BuiltModel:
    built = build(builder)
    tensors = {n: random_array(s, d, seed=n) for n, (s, d) in SHAPES.items()}
    changed = "model.layers.1.self_attn.o_proj.weight"
    tensors[changed] = random_array(SHAPES[changed][0], SHAPES[changed][1], seed="v2")
    builder.add_model(MODEL.replace("latest", "v2"), tensors, quantize=QUANTIZE)
    mlp = {
        "mlp.up_proj.weight": random_array((HIDDEN, DIMS), mx.float32, seed="up"),
        "mlp.up_proj.bias": random_array((HIDDEN,), mx.float32, seed="upb"),
        "mlp.down_proj.weight": random_array((DIMS, HIDDEN), mx.float32, seed="down"),
        "mlp.down_proj.bias": random_array((DIMS,), mx.float32, seed="downb"),
    }
    builder.add_model("mlp:latest", mlp)
    up, down = nn.Linear(DIMS, HIDDEN), nn.Linear(HIDDEN, DIMS)
    up.load_weights([("weight", mlp["mlp.up_proj.weight"]), ("bias", mlp["mlp.up_proj.bias"])])
    down.load_weights(
        [("weight", mlp["mlp.down_proj.weight"]), ("bias", mlp["mlp.down_proj.bias"])]
    )
    x = random_array((4, DIMS), mx.float32, seed="x")
    y = down(nn.gelu(up(x)))
    refs.mkdir()
    mx.save_safetensors(str(refs / "mlp_io.safetensors"), {"x": x, "y": y})
    for world in worlds:
        for rank in range(world):
            mx.save_safetensors(
                str(refs / f"world{world}_rank{rank}.safetensors"), expected(built, rank, world)
            )
    return built


@pytest.mark.parametrize("world", [2, 3])
def test_ring_group_ranks_read_only_their_bytes(
    builder: StoreBuilder, store_root: Path, tmp_path: Path, world: int
) -> None:
    refs, out = tmp_path / "refs", tmp_path / "out"
    out.mkdir()
    built = _build_all(builder, refs, [world])
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(world)]))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(store_root), str(refs), str(out)],
            env=_env(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    _run_all(procs, TIMEOUT)
    results: list[dict[str, Any]] = [
        json.loads((out / f"rank{r}.json").read_text()) for r in range(world)
    ]

    split, whole = split_bytes(built)
    paths = blob_paths(store_root, built)
    headers = header_bytes(paths.values())
    rows = sum(
        a.nbytes // a.shape[0]
        for n, a in built.expected.items()
        if expected(built, 0, 2)[n].shape != a.shape
    )
    small = built.config.size + sum(
        p.stat().st_size for p in (store_root / "manifests").rglob("*") if p.is_file()
    )
    for r in results:
        rank = r["rank"]
        assert r["world"] == world
        assert r["names_match"], r
        assert r["mismatched"] == [], r
        # Bytes: this rank's share of every split tensor, ± one row per tensor.
        assert abs(r["held_split"] - split / world) <= rows
        assert split // world + whole - rows <= r["read"], r
        assert r["read"] <= split // world + whole + headers + small + rows, r
        assert r["check_good"] is None
        # check_shards names the tensor and the ranks, on every rank.
        # The last rank loaded rank 0's part; every rank blames it, at the first split tensor.
        last = world - 1
        width = 48 // world  # int4 down_proj: [96, 48 packed words], columns split
        assert r["check_wrong_part"] == (
            f"rank {last} holds the wrong part: it starts at 0 on axis 1, rank {last}'s part "
            f"starts at {last * width} (model 'toy-tp:latest', "
            "tensor 'model.layers.0.mlp.down_proj.weight')"
        )
        version = r["check_other_version"]
        assert version is not None
        assert version == (
            f"rank {rank} and rank {last if rank != last else 0} read it from different blobs "
            f"(model versions) (model 'toy-tp:{'v2' if rank == last else 'latest'}', "
            "tensor 'model.layers.1.self_attn.o_proj.weight')"
        ), version
        # The tensor-parallel MLP (all_sum) equals the unsharded one within float32 rounding
        # (the sum of the partial products runs in another order, so not bit-exact).
        bound = 1e-5 * r["mlp_scale"]
        assert r["mlp_max_diff"] <= bound, r
        assert r["mlp_hand_max_diff"] <= bound, r
        # A pipeline stage opened only its layers' blobs (and the config blob).
        lo, hi = r["stage_layers"]
        config = str(store_root / "blobs" / built.config.digest.replace(":", "-"))
        mine = {
            p
            for n, p in paths.items()
            if not (m := re.search(r"\.layers\.(\d+)\.", n)) or lo <= int(m.group(1)) < hi
        }
        assert set(r["stage_opened"]) - {config} == mine, (rank, r["stage_opened"])
        kept = [
            n
            for n in built.expected
            if not (m := re.search(r"\.layers\.(\d+)\.", n)) or lo <= int(m.group(1)) < hi
        ]
        assert r["stage_tensors"] == sorted(kept)
    assert [r["stage_layers"] for r in results] == (
        [[0, 1], [1, 2]] if world == 2 else [[0, 1], [1, 2], [2, 2]]
    )
    print(
        f"world {world}: split {split} B, whole {whole} B; read per rank "
        f"{[r['read'] for r in results]}; MLP max diff {[r['mlp_max_diff'] for r in results]}, "
        f"bit-exact {[r['mlp_bit_exact'] for r in results]}"
    )


def test_cli_under_mlx_launch(builder: StoreBuilder, store_root: Path) -> None:
    built = build(builder)
    launch = Path(sys.executable).parent / "mlx.launch"
    if not launch.exists():
        pytest.skip(f"mlx.launch is not installed beside {sys.executable}")
    port = _free_ports(1)[0]
    cmd = [
        str(launch), "-n", "2", "--backend", "ring", "-p", str(port), "--",
        sys.executable, "-m", "asyncweights", "load", MODEL, "--store", str(store_root),
        "--check",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT
    )
    (output,) = _run_all([proc], TIMEOUT)
    split, _ = split_bytes(built)
    count = len(built.expected)
    n_split = sum(expected(built, 0, 2)[n].shape != a.shape for n, a in built.expected.items())
    line = (
        rf"rank (\d)/2: {n_split} split tensors \({re.escape(format_bytes(split // 2))} of "
        rf"{re.escape(format_bytes(split))}\), {count - n_split} whole; "
        r"read [\d.]+ \w+, shards checked across ranks"
    )
    ranks = sorted(int(m.group(1)) for m in re.finditer(line, output))
    assert ranks == [0, 1], output
    assert output.count(f"loaded {MODEL}: {count} tensors") == 2, output
