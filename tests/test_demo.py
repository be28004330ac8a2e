"""The demo models (`asyncweights._demo`): built deterministically, read back bit-exact.

The store is read back with an independent reader (the `safetensors` package on each blob file)
and compared with what `load_weights` returns; the int4 variant is compared with MLX's own
`mx.quantize` of the plain tensors. The ``demo`` command runs end to end on a terminal.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ml_dtypes  # noqa: F401  # numpy's bfloat16, which safetensors.numpy reads BF16 as
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

import asyncweights as aw
from asyncweights._demo import (
    DEMO_MODEL,
    cache_dir,
    demo_names,
    demo_tensors,
    ensure_demo,
    is_complete,
    size_tag,
)
from asyncweights._manifest import decode_manifest

from .cli_support import run_on_pty

COMPONENTS = ["text_encoder", "transformer", "vae"]
SIZE = 2 << 20  # 2 MiB: the smallest sizes of every component (see test_tensors_of_2_mib)


class RecordingBar:
    """A `_demo.Bar` that keeps every call: ("start", description, total),
    ("update", "", completed), ("clear", "", 0.0)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def start(self, description: str, total: float) -> None:
        self.calls.append(("start", description, total))

    def update(self, completed: float) -> None:
        self.calls.append(("update", "", completed))

    def clear(self) -> None:
        self.calls.append(("clear", "", 0.0))


def test_size_tags_and_names() -> None:
    assert [size_tag(s) for s in (512 << 20, 1 << 30, 3072, 1536, 5)] == [
        "512mib", "1gib", "3kib", "1536b", "5b",
    ]  # fmt: skip
    assert demo_names(512 << 20) == ("asyncweights-demo:512mib", "asyncweights-demo:512mib-int4")
    assert DEMO_MODEL == "asyncweights-demo"


def test_cache_dir_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "asyncweights"
    monkeypatch.setenv("XDG_CACHE_HOME", "  ")  # blank: as if unset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "asyncweights"


def test_tensors_of_2_mib() -> None:
    """The sizing rules at 2 MiB, worked by hand: every width falls back to its smallest
    option (no option fits the budget), so text_encoder d=128 with a vocab of
    int(0.35 * 2 MiB * 0.15 / 256) // 64 * 64 = 384 and round((734003 - 98304) / 376832) = 2
    layers; transformer h=128 with round(1153434 / 720896) = 2 blocks; vae c=32 with
    round(209715 / 73728) = 3 resnets."""
    tensors, configs = demo_tensors(SIZE)
    by_name = {t.name: t for t in tensors}
    assert len(by_name) == len(tensors) == 73
    counts = {c: sum(t.name.startswith(c + "/") for t in tensors) for c in COMPONENTS}
    assert counts == {"text_encoder": 1 + 9 * 2 + 1, "transformer": 3 + 11 * 2 + 1, "vae": 27}
    # Sorted by component (text_encoder, transformer, vae), then name.
    keys = [(COMPONENTS.index(t.name.split("/")[0]), t.name) for t in tensors]
    assert keys == sorted(keys)
    te = "text_encoder/model."
    assert (by_name[te + "embed_tokens.weight"].dtype, by_name[te + "embed_tokens.weight"].shape) \
        == ("BF16", (384, 128))  # fmt: skip
    assert by_name[te + "layers.1.mlp.down_proj.weight"].shape == (128, 384)
    assert by_name[te + "layers.1.self_attn.k_proj.weight"].shape == (32, 128)
    assert by_name[te + "norm.weight"].fill == "ones"
    assert by_name["transformer/layers.1.adaLN_modulation.0.bias"].shape == (768,)
    assert by_name["transformer/layers.1.adaLN_modulation.0.bias"].fill == "zeros"
    assert by_name["transformer/final_layer.linear.weight"].shape == (64, 128)
    # vae: resnets 0 and 1 on the decoder side ((3 + 1) // 2 = 2), resnet 2 on the encoder's.
    assert by_name["vae/decoder.up_blocks.0.resnets.1.conv2.weight"].shape == (32, 32, 3, 3)
    assert "vae/encoder.down_blocks.1.resnets.0.conv1.weight" in by_name
    assert "vae/decoder.up_blocks.1.resnets.0.conv1.weight" not in by_name
    assert {t.dtype for t in tensors if t.name.startswith("vae/")} == {"F32"}
    assert {t.dtype for t in tensors if not t.name.startswith("vae/")} == {"BF16"}
    assert sum(t.nbytes for t in tensors) == 2_679_040
    for t in tensors:
        assert t.nbytes == math.prod(t.shape) * (2 if t.dtype == "BF16" else 4)
    assert configs["text_encoder/config.json"] == {
        "architectures": ["Qwen3Model"], "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 2, "vocab_size": 384, "torch_dtype": "bfloat16",
    }  # fmt: skip
    assert configs["transformer/config.json"]["n_layers"] == 2
    assert configs["vae/config.json"]["block_out_channels"] == [32]
    # The same size gives the same model: names, dtypes, shapes and fills.
    assert demo_tensors(SIZE) == (tensors, configs)


def _manifest_files(root: Path) -> dict[str, bytes]:
    manifests = root / "manifests"
    return {str(p.relative_to(manifests)): p.read_bytes() for p in manifests.rglob("*")
            if p.is_file()}  # fmt: skip


async def test_demo_store_is_deterministic_and_bit_exact(tmp_path: Path) -> None:
    store = aw.ModelStore(tmp_path / "a")
    bar = RecordingBar()
    seconds = await ensure_demo(store, SIZE, bar)
    assert seconds is not None
    assert seconds > 0
    plain_name, int4_name = demo_names(SIZE)
    assert is_complete(store, plain_name)
    assert is_complete(store, int4_name)
    # Progress: one start with the bytes to write, rising updates that end there, one clear.
    tensors, _ = demo_tensors(SIZE)
    (kind, description, total), *updates, last = bar.calls
    assert (kind, description, last) == ("start", "generating demo", ("clear", "", 0.0))
    done = [v for k, _, v in updates if k == "update"]
    assert len(done) == len(updates)
    assert done == sorted(done)
    assert done[-1] == total
    assert total > sum(t.nbytes for t in tensors)  # plain bytes plus the quantized ones

    # Complete models are reused, not rewritten.
    assert await ensure_demo(store, SIZE, RecordingBar()) is None
    # A second store built from nothing is byte-identical: manifests, hence every blob digest.
    other = aw.ModelStore(tmp_path / "b")
    await ensure_demo(other, SIZE)
    assert _manifest_files(store.root) == _manifest_files(other.root)
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == sorted(
        p.name for p in other.blobs_dir.iterdir()
    )

    # Every tensor blob read by the safetensors package: the demo tensor's exact name (bare,
    # without its component), dtype and shape; and load_weights returns the same bytes.
    manifest = decode_manifest(store.resolve(plain_name).read_bytes())
    tensor_layers = [la for la in manifest.layers if la.name and not la.name.endswith(".json")]
    assert [la.name for la in tensor_layers] == [t.name for t in tensors]
    weights = await aw.load_weights(plain_name, store=store.root)
    assert sorted(weights) == sorted(t.name for t in tensors)
    as_numpy = {"BF16": np.uint16, "F32": np.float32}  # the bits, compared exactly
    for t, layer in zip(tensors, tensor_layers, strict=True):
        (key, value), *more = load_file(str(store.blob_path(layer.digest))).items()
        assert (key, more) == (t.name.split("/", 1)[1], [])
        assert value.shape == t.shape, t.name
        got = weights[t.name]
        assert (got.dtype, tuple(got.shape)) == (
            {"BF16": mx.bfloat16, "F32": mx.float32}[t.dtype],
            t.shape,
        )
        got_bytes = np.array(mx.view(got, mx.uint16 if t.dtype == "BF16" else mx.float32))
        assert got_bytes.tobytes() == value.view(as_numpy[t.dtype]).tobytes(), t.name
        if t.fill == "ones":
            assert np.all(np.array(got.astype(mx.float32)) == 1.0), t.name
        elif t.fill == "zeros":
            assert not np.any(got_bytes), t.name
        else:
            values = np.array(got.astype(mx.float32))
            # Windows into a pool of N(0, 0.02) values: finite, spread as drawn.
            assert np.all(np.isfinite(values)), t.name
            assert 0.015 < values.std() < 0.025, t.name
    # Different names start at different offsets of the pool: no two random tensors alike.
    firsts = {
        bytes(np.array(mx.view(weights[t.name], mx.uint16)).ravel()[:16].tobytes())
        for t in tensors if t.fill == "random" and t.dtype == "BF16"
    }  # fmt: skip
    assert len(firsts) == sum(t.fill == "random" and t.dtype == "BF16" for t in tensors)

    # The int4 variant shares every unquantized blob and holds mx.quantize of the rest.
    variant = decode_manifest(store.resolve(int4_name).read_bytes())
    plain_digests = {la.name: la.digest for la in tensor_layers}
    quant = await aw.load_weights(int4_name, store=store.root)
    assert quant.quantization is not None
    quantized = sorted(n for n in quant if quant.info[n].quantization is not None)
    assert quantized  # the demo's 2-D projection weights
    for la in variant.layers:
        if la.name in plain_digests and la.name not in quantized:
            assert la.digest == plain_digests[la.name], la.name
    for name in quantized:
        q = quant.info[name].quantization
        assert q is not None
        assert (q.bits, q.mode) == (4, "affine")
        wq, scales, biases = mx.quantize(
            weights[name], group_size=q.group_size, bits=q.bits, mode=q.mode
        )
        roles = quant.info[name].companions
        assert mx.array_equal(quant[name], wq).item(), name
        assert mx.array_equal(quant[roles["scales"]], scales).item(), name
        assert mx.array_equal(quant[roles["biases"]], biases).item(), name


async def test_a_missing_blob_makes_the_demo_incomplete_and_regenerated(tmp_path: Path) -> None:
    store = aw.ModelStore(tmp_path / "store")
    await ensure_demo(store, SIZE)
    plain_name, int4_name = demo_names(SIZE)
    manifest = decode_manifest(store.resolve(plain_name).read_bytes())
    victim = store.blob_path(manifest.layers[0].digest)
    data = victim.read_bytes()
    victim.write_bytes(data[:-1])  # wrong size
    assert not is_complete(store, plain_name)
    victim.unlink()
    assert not is_complete(store, plain_name)
    assert not is_complete(store, "asyncweights-demo:1mib")  # never written
    assert await ensure_demo(store, SIZE) is not None
    assert victim.read_bytes() == data
    assert is_complete(store, plain_name)
    assert is_complete(store, int4_name)


def test_demo_command_on_a_terminal(tmp_path: Path) -> None:
    """``asyncweights demo`` end to end: generation and both loads show tqdm bars on a
    terminal; the summary names both models; a second run reuses the store."""
    store = tmp_path / "store"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("OLLAMA_MODELS", None)
    args = ["demo", "--size", "2MiB", "--store", str(store)]
    status, output = run_on_pty(args, env)
    text = output.decode()
    assert status == 0, text
    plain_name, int4_name = demo_names(SIZE)
    assert "generating demo" in text
    assert f"loading {plain_name}" in text
    assert f"loading {int4_name}" in text
    assert "%|" in text  # tqdm's bar
    assert f"demo store {store} (generated in " in text
    assert f"loaded {plain_name}: 73 tensors" in text
    assert "peak MLX memory during this load:" in text
    status, output = run_on_pty(args, env)
    text = output.decode()
    assert status == 0, text
    assert f"demo store {store} (reused)" in text
    assert "generating demo" not in text
    # The JSON form (piped) has both loads, and the store is listed by ls.
    status, output = run_on_pty([*args, "--json"], env)
    assert status == 0, output
    data = json.loads(output.decode()[output.decode().index("{") :])
    assert [s["model"] for s in data["loads"]] == [plain_name, int4_name]
    assert data["loads"][0]["tensors"] == 73
