"""ls, show, load, verify, rm and import --force on a store holding every kind of model, laid
out as each Ollama version writes it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

import asyncweights as aw
from asyncweights.testing import LayoutName, StoreBuilder, random_weights

from .cli_support import cli

SHAPES = {"model.layers.0.mlp.up_proj.weight": (64, 128), "model.norm.weight": (64,)}
TENSOR_LAYOUTS: dict[str, LayoutName] = {
    "legacy:latest": "legacy",
    "v2-symlink:latest": "v2-symlink",
    "v2-hardlink:latest": "v2-hardlink",
    "v2-copy:latest": "v2-copy",
    "dangling:latest": "v2-dangling",
}


def write_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_q.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_all_kinds(root: Path, scratch: Path) -> dict[str, Any]:
    """A store with one model of every kind and layout; returns what each should list as."""
    b = StoreBuilder(root)
    built = {}
    for seed, (name, layout) in enumerate(TENSOR_LAYOUTS.items()):
        built[name] = b.add_model(name, random_weights(SHAPES, seed=seed), quantize="int4")
        b.lay_out(name, layout)
    b.add_model("LocalHost:5000/NS/Mixed:Tag", random_weights(SHAPES, seed=9))
    b.lay_out("LocalHost:5000/NS/Mixed:Tag", "v2-symlink")
    gguf_file = write_gguf(scratch / "tiny.gguf")
    projector = write_gguf(scratch / "projector.gguf")
    mlx_child = b.add_model("list:latest-mlx", random_weights(SHAPES, seed=7), quantize="int4")
    gguf_child = b.add_gguf_model("list:latest-gguf", weights=gguf_file)
    b.add_manifest_list(
        "list:latest",
        [("mlx", "safetensors", mlx_child.path), ("llamacpp", "gguf", gguf_child)],
        anchor=1,
    )
    b.add_gguf_model("llama3.2:latest", weights=gguf_file, projector=projector)
    b.add_gguf_model("lora:latest", base=False, adapter=b"adapter bytes")
    b.add_cloud_model("gpt-oss:120b-cloud")
    broken = root / "manifests/registry.ollama.ai/library/broken/latest"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    (root / "metadata").mkdir()
    (root / "metadata" / ("sha256-" + "a" * 64 + ".json")).write_text("{}")
    return {"built": built, "mlx_child": mlx_child}


EXPECTED_KINDS = {
    "LocalHost:5000/NS/Mixed:Tag": ("tensor", "safetensors", "manifests-v2 symlink"),
    "broken:latest": ("unreadable", None, None),
    "dangling:latest": ("tensor", "safetensors", "manifests"),
    "gpt-oss:120b-cloud": ("cloud", "", "manifests"),
    "legacy:latest": ("tensor", "safetensors", "manifests"),
    "list:latest": ("tensor", "safetensors", "manifests-v2 symlink"),
    "list:latest-gguf": ("gguf", "gguf", "manifests"),
    "list:latest-mlx": ("tensor", "safetensors", "manifests"),
    "llama3.2:latest": ("gguf", "gguf", "manifests"),
    "lora:latest": ("adapter", "gguf", "manifests"),
    "v2-copy:latest": ("tensor", "safetensors", "manifests-v2 copy"),
    "v2-hardlink:latest": ("tensor", "safetensors", "manifests-v2 hard link"),
    "v2-symlink:latest": ("tensor", "safetensors", "manifests-v2 symlink"),
}


@pytest.fixture
def all_kinds(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "store"
    return root, build_all_kinds(root, tmp_path)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_ls_lists_every_kind_and_exits_0(
    all_kinds: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = all_kinds
    result = cli("ls", "--store", str(root), "--json", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = {r["name"]: r for r in json.loads(result.stdout)["models"]}
    assert {n: (r["kind"], r.get("format"), r.get("layout")) for n, r in rows.items()} == (
        EXPECTED_KINDS
    )
    assert rows["broken:latest"]["error"].startswith("invalid manifest: JSON is malformed")
    assert rows["legacy:latest"]["tensors"] == 4
    assert rows["legacy:latest"]["quantization"] == "int4"
    assert rows["list:latest"]["manifest_list"]["children"][1]["runner"] == "llamacpp"
    assert rows["gpt-oss:120b-cloud"]["config"]["remote_model"] == "gpt-oss:120b"
    assert rows["dangling:latest"]["skipped"].endswith("dangles")
    for row in rows.values():
        if row["kind"] != "unreadable":
            assert row["modified"].endswith("Z")
            assert row["size"] > 0
            assert row["id"] == row["digest"][7:19]
    text = cli("ls", "--store", str(root), tmp=tmp_path)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "ID",
        "SIZE",
        "MODIFIED",
        "KIND",
        "FORMAT",
        "STORED",
        "DETAILS",
    ]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert sorted(by_name) == sorted(EXPECTED_KINDS)
    assert "GGUF model" in by_name["llama3.2:latest"]
    assert "runs on https://ollama.com:443 as gpt-oss:120b" in by_name["gpt-oss:120b-cloud"]
    assert "list: mlx/safetensors, llamacpp/gguf" in by_name["list:latest"]
    assert "unreadable: invalid manifest" in by_name["broken:latest"]
    assert "adapter only" in by_name["lora:latest"]


@pytest.mark.parametrize(
    ("name", "kind", "lines"),
    [
        ("gpt-oss:120b-cloud", "cloud", ["remote_host   https://ollama.com:443",
                                         "remote_model  gpt-oss:120b"]),
        ("llama3.2:latest", "gguf", ["model_format  gguf", "file_type     Q4_K_M"]),
        ("lora:latest", "adapter", ["model_format  gguf"]),
        ("list:latest", "tensor", ["parameters    8,256"]),
        ("dangling:latest", "tensor", ["skipped       manifests-v2 entry: manifests-v2 link"]),
    ],
)  # fmt: skip
def test_show_describes_each_kind(
    all_kinds: tuple[Path, dict[str, Any]], tmp_path: Path, name: str, kind: str, lines: list[str]
) -> None:
    root, _ = all_kinds
    data = json.loads(cli("show", name, "--store", str(root), "--json", tmp=tmp_path).stdout)
    assert data["kind"] == kind
    text = cli("show", name, "--store", str(root), tmp=tmp_path)
    assert text.returncode == 0, text.stderr
    for line in lines:
        assert any(out.startswith(line) for out in text.stdout.splitlines()), (line, text.stdout)
    if kind in ("gguf", "adapter"):
        media = [x["media_type"].rsplit(".", 1)[-1] for x in data["layer_list"]]
        assert media[-3:] == ["template", "params", "license"]
    if name == "list:latest":
        assert [c["local"] for c in data["manifest_list"]["children"]] == [True, True]


def test_load_and_verify_every_kind(all_kinds: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = all_kinds
    for name, (kind, _, layout) in EXPECTED_KINDS.items():
        load = cli("load", name, "--store", str(root), "--json", tmp=tmp_path)
        verify = cli("verify", name, "--store", str(root), "--json", tmp=tmp_path)
        if kind in ("tensor", "gguf"):
            assert load.returncode == 0, (name, load.stderr)
            assert json.loads(load.stdout)["tensors"] > 0
            assert verify.returncode == 0, (name, verify.stderr)
            assert json.loads(verify.stdout)["ok"] is True
        elif kind == "unreadable":
            assert load.returncode == verify.returncode == 1
            assert load.stderr.startswith("error: invalid manifest: JSON is malformed")
        else:
            assert load.returncode == 1
            prefix = {"cloud": "cloud model: ", "adapter": "adapter-only model: "}[kind]
            assert load.stderr.startswith("error: " + prefix), load.stderr
            assert verify.returncode == 0, (name, verify.stderr)
        if layout and layout.startswith("manifests-v2"):
            blobs = json.loads(verify.stdout)["blobs"]
            plain = cli("verify", "legacy:latest", "--store", str(root), "--json", tmp=tmp_path)
            # the manifest document kept as a blob is checked too (and the list's)
            assert blobs > json.loads(plain.stdout)["blobs"]


def test_runner_option_picks_the_gguf_child(
    all_kinds: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = all_kinds
    args = ("load", "list:latest", "--store", str(root), "--json")
    assert json.loads(cli(*args, tmp=tmp_path).stdout)["tensors"] == 4
    data = json.loads(cli(*args, "--runner", "llamacpp", tmp=tmp_path).stdout)
    assert data["tensors"] == 1  # blk.0.attn_q.weight of the GGUF child


def blobs_of(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").iterdir()}


async def test_rm_removes_v2_entry_anchor_and_only_unshared_blobs(
    tmp_path: Path, store_root: Path
) -> None:
    b = StoreBuilder(store_root)
    shared = random_weights({"model.norm.weight": (64,)}, seed=1)
    own = random_weights({"model.layers.0.mlp.up_proj.weight": (64, 128)}, seed=2)
    keep = b.add_model("keep:latest", shared)
    gone = b.add_model("gone:latest", {**shared, **own}, quantize="int4")
    document = gone.path.read_bytes()
    b.lay_out("gone:latest", "v2-symlink")
    before = blobs_of(store_root)
    removal = await aw.remove_model("gone", store=store_root)
    assert removal.manifests == [
        store_root / "manifests-v2/ollama.com/library/gone/latest",
        store_root / "manifests/registry.ollama.ai/library/gone/latest",
    ]
    # Empty folders are pruned, as Ollama prunes them.
    assert list((store_root / "manifests-v2").iterdir()) == []
    keep_digests = {keep.config.digest, *(x.digest for x in keep.layers)}
    gone_digests = {gone.config.digest, *(x.digest for x in gone.layers), sha256(document)}
    assert set(removal.blobs) == gone_digests - keep_digests
    assert set(removal.kept) == gone_digests & keep_digests
    assert blobs_of(store_root) == before - {d.replace(":", "-") for d in removal.blobs}
    weights = await aw.load_weights("keep", store=store_root, verify=True)
    assert mx.array_equal(weights["model.norm.weight"], shared["model.norm.weight"]).item()
    with pytest.raises(aw.ModelNotFoundError):
        await aw.remove_model("gone", store=store_root)


async def test_rm_of_a_manifest_list_keeps_what_its_children_names_use(
    all_kinds: tuple[Path, dict[str, Any]],
) -> None:
    root, built = all_kinds
    (root / "manifests/registry.ollama.ai/library/broken/latest").unlink()
    v2 = root / "manifests-v2/ollama.com/library/list/latest"
    list_digest = sha256(v2.read_bytes())
    removal = await aw.remove_model("list:latest", store=root)
    assert list_digest in removal.blobs
    # The children are also named (list:latest-mlx, list:latest-gguf): their blobs stay.
    mlx_child = built["mlx_child"]
    assert mlx_child.config.digest in removal.kept
    assert removal.unreadable == []
    assert not v2.exists()
    assert aw.ModelName.parse("list:latest") not in aw.ModelStore(root).list_names()
    await aw.load_weights("list:latest-mlx", store=root, verify=True)


async def test_rm_keeps_every_blob_while_a_manifest_is_unreadable(
    tmp_path: Path, store_root: Path
) -> None:
    b = StoreBuilder(store_root)
    gone = b.add_model("gone:latest", random_weights(SHAPES, seed=3))
    b.write_manifest("broken:latest", [])
    broken = store_root / "manifests/registry.ollama.ai/library/broken/latest"
    broken.write_bytes(b"\xff not a manifest")
    removal = await aw.remove_model("gone", store=store_root)
    assert removal.blobs == []
    assert set(removal.kept) == {gone.config.digest, *(x.digest for x in gone.layers)}
    assert removal.unreadable == [broken]
    result = cli("rm", "broken", "--store", str(store_root), tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"deleted 'broken' from store {store_root}: ")


def test_rm_command(tmp_path: Path, store_root: Path) -> None:
    b = StoreBuilder(store_root)
    b.add_model("a:latest", random_weights(SHAPES, seed=4))
    b.add_model("b:latest", random_weights(SHAPES, seed=5))
    result = cli("rm", "a", "b", "--store", str(store_root), "--json", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["removed"]] == ["a", "b"]
    assert blobs_of(store_root) == set()
    missing = cli("rm", "a", "--store", str(store_root), tmp=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: model not found in store")


async def test_import_refuses_to_replace_any_layout_without_force(
    tmp_path: Path, store_root: Path
) -> None:
    b = StoreBuilder(store_root)
    b.add_model("m:latest", random_weights(SHAPES, seed=6))
    b.lay_out("m:latest", "v2-symlink")
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": np.ones((4, 4), np.float32)}, str(src / "model.safetensors"))

    def snapshot() -> dict[str, bytes]:
        return {
            str(p.relative_to(store_root)): p.read_bytes()
            for p in sorted(store_root.rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    for name in ("m", "M:LATEST", "ollama.com/library/m"):
        with pytest.raises(aw.ModelExistsError) as caught:
            await aw.import_model(src, name, store=store_root)
        assert caught.value.path == store_root / "manifests-v2/ollama.com/library/m/latest"
        assert snapshot() == before
    model = await aw.import_model(src, "m", store=store_root, force=True)
    assert model.layout == "manifests"
    weights = await aw.load_weights("m", store=store_root)
    assert sorted(weights) == ["w"]


async def drain(name: str, store: aw.ModelStore) -> None:
    async with aw.stream_weights(name, store=store) as tensors:
        async for _ in tensors:
            pass


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
async def test_load_stream_and_cache_agree_on_every_model(
    all_kinds: tuple[Path, dict[str, Any]], name: str
) -> None:
    root, built = all_kinds
    kind = EXPECTED_KINDS[name][0]
    store = aw.ModelStore(root)
    if kind in ("tensor", "gguf"):
        weights = await aw.load_weights(name, store=store)
        if name in built["built"]:
            expected = built["built"][name].expected
            assert sorted(weights) == sorted(expected)
            for key, array in expected.items():
                assert mx.array_equal(weights[key], array).item(), key
        async with aw.stream_weights(name, store=store) as tensors:
            streamed = {t.name: t.array async for t in tensors}
        async with aw.WeightCache(store=store) as cache, cache.lease(name) as leased:
            cached = dict(leased)
            keys = [e.key.digest for e in cache.entries()]
        # The cache keys on the runnable document's digest (a list's chosen child, an
        # anchor's document), never on an anchor file.
        assert keys == [(await store.open(name)).digest]
        for other in (streamed, cached):
            assert sorted(other) == sorted(weights)
            for key in weights:
                assert mx.array_equal(other[key], weights[key]).item(), key
        return
    error = aw.ManifestError if kind == "unreadable" else aw.UnsupportedModelError
    with pytest.raises(error) as first:
        await aw.load_weights(name, store=store)
    with pytest.raises(error) as second:
        await drain(name, store)
    async with aw.WeightCache(store=store) as cache:
        with pytest.raises(error) as third:
            async with cache.lease(name):
                pass
    assert str(first.value) == str(second.value) == str(third.value)


def test_cli_manifest_path_uses_its_own_store(
    all_kinds: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = all_kinds
    home = tmp_path / "home"
    home.mkdir()
    v2 = root / "manifests-v2/ollama.com/library/v2-symlink/latest"
    env_cli = [sys.executable, "-m", "asyncweights"]
    environ = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    environ.pop("OLLAMA_MODELS", None)
    for command in ("load", "verify", "show"):
        result = subprocess.run(
            [*env_cli, command, str(v2), "--json"], capture_output=True, text=True,
            env=environ, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stderr)
    outside = tmp_path / "manifest-copy"
    outside.write_bytes(v2.read_bytes())
    result = subprocess.run(
        [*env_cli, "load", str(outside)], capture_output=True, text=True, env=environ,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "pass store= (CLI: --store) to say where its blobs are" in result.stderr
