"""Stores laid out as each Ollama version writes them, and every kind of model they hold.

Layouts (docs/format.md#store-layouts): legacy only; Ollama 0.40's ``manifests-v2`` entry as
a symlink, hard link or copy of the manifest document blob with the legacy anchor; a dangling
``manifests-v2`` link; manifest lists; cloud, GGUF and adapter-only models; mixed-case and
``%3A`` hosts; pre-0.1.30 ``sha256:<hex>`` blob names.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlx.core as mx
import pytest

import asyncweights as aw
from asyncweights.testing import BuiltModel, LayoutName, StoreBuilder, random_weights

LAYOUTS: list[LayoutName] = ["legacy", "v2-symlink", "v2-hardlink", "v2-copy", "v2-dangling"]
EXPECTED_LAYOUT = {
    "legacy": "manifests",
    "v2-symlink": "manifests-v2 symlink",
    "v2-hardlink": "manifests-v2 hard link",
    "v2-copy": "manifests-v2 copy",
    "v2-dangling": "manifests",
}


def tensors(seed: int = 1) -> dict[str, mx.array]:
    return random_weights(
        {"model.layers.0.mlp.up_proj.weight": (64, 128), "model.norm.weight": (64,)}, seed=seed
    )


def add(
    builder: StoreBuilder, name: str, layout: LayoutName, seed: int = 1
) -> tuple[BuiltModel, bytes]:
    """Write a model laid out as `layout`; return it and its manifest document's bytes."""
    built = builder.add_model(name, tensors(seed), quantize="int4")
    document = built.path.read_bytes()
    builder.lay_out(name, layout)
    return built, document


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_exact(weights: aw.Weights, built: BuiltModel) -> None:
    assert sorted(weights) == sorted(built.expected)
    for name, array in built.expected.items():
        assert weights[name].dtype == array.dtype, name
        # MLX's 3.11 wheel's stubs do not declare mx.array's buffer protocol (its 3.12+ ones do).
        expected = bytes(memoryview(array))  # type: ignore[arg-type, unused-ignore]
        assert bytes(memoryview(weights[name])) == expected, name  # type: ignore[arg-type, unused-ignore]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_every_layout_loads_bit_exact_with_the_document_digest(
    builder: StoreBuilder, store_root: Path, layout: LayoutName
) -> None:
    built, manifest_bytes = add(builder, "m:latest", layout)
    store = aw.ModelStore(store_root)
    model = await store.open("m")
    assert model.layout == EXPECTED_LAYOUT[layout]
    assert (model.kind, model.format, model.runner) == ("tensor", "safetensors", "mlx")
    # The digest is the runnable manifest document's, never the legacy anchor file's.
    assert model.digest == sha256(manifest_bytes)
    assert not model.manifest.anchor_layers or layout != "legacy"
    weights = await aw.load_weights("m", store=store_root)
    assert_exact(weights, built)
    async with aw.WeightCache(store=store_root) as cache:
        async with cache.lease("m") as leased:
            assert sorted(leased) == sorted(weights)
        assert [e.key.digest for e in cache.entries()] == [model.digest]
    assert store.list_names() == [aw.ModelName.parse("m")]


async def test_anchor_layers_are_skipped_and_name_the_document(
    builder: StoreBuilder, store_root: Path
) -> None:
    built, _ = add(builder, "m:latest", "v2-symlink")
    legacy = store_root / "manifests/registry.ollama.ai/library/m/latest"
    doc = await aw.ModelStore(store_root).open(legacy)
    (layer,) = doc.manifest.anchor_layers
    assert layer.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert doc.digest == layer.digest != sha256(legacy.read_bytes())
    assert (store_root / "blobs" / layer.digest.replace(":", "-")).read_bytes() == (
        store_root / "manifests-v2/ollama.com/library/m/latest"
    ).read_bytes()
    weights = await aw.load_weights(legacy)
    assert_exact(weights, built)


async def test_dangling_link_falls_back_to_legacy_and_says_why(
    builder: StoreBuilder, store_root: Path
) -> None:
    add(builder, "m:latest", "v2-dangling")
    model = await aw.ModelStore(store_root).open("m")
    assert model.layout == "manifests"
    assert model.skipped == (
        "manifests-v2 link '../../../../blobs/sha256-" + "0" * 64 + "' dangles"
    )
    (store_root / "manifests/registry.ollama.ai/library/m/latest").unlink()
    with pytest.raises(aw.ModelNotFoundError) as caught:
        await aw.ModelStore(store_root).open("m")
    assert "dangles, and there is no legacy manifest" in str(caught.value)


async def test_link_whose_target_does_not_hash_to_its_name_is_not_trusted(
    builder: StoreBuilder, store_root: Path
) -> None:
    add(builder, "m:latest", "v2-symlink")
    add(builder, "other:latest", "legacy", seed=2)
    v2 = store_root / "manifests-v2/ollama.com/library/m/latest"
    target = (v2.parent / os.readlink(v2)).resolve()
    # A blob renamed over the document: its bytes hash to another name.
    other_doc = (store_root / "manifests/registry.ollama.ai/library/other/latest").read_bytes()
    target.chmod(0o644)
    target.write_bytes(other_doc)
    model = await aw.ModelStore(store_root).open("m")
    assert model.layout == "manifests"
    assert model.skipped == (
        f"manifests-v2 link target {target.name} holds bytes that hash to {sha256(other_doc)}"
    )
    (store_root / "manifests/registry.ollama.ai/library/m/latest").unlink()
    with pytest.raises(aw.ManifestError, match="no legacy manifest to fall back to"):
        await aw.ModelStore(store_root).open("m")


async def test_link_outside_the_blobs_folder_is_not_trusted(
    builder: StoreBuilder, store_root: Path, tmp_path: Path
) -> None:
    _, document = add(builder, "m:latest", "legacy")
    v2 = store_root / "manifests-v2/ollama.com/library/m/latest"
    v2.parent.mkdir(parents=True)
    elsewhere = tmp_path / ("sha256-" + sha256(document)[7:])
    elsewhere.write_bytes(document)
    v2.symlink_to(elsewhere)
    model = await aw.ModelStore(store_root).open("m")
    assert model.layout == "manifests"
    assert model.skipped == (
        f"manifests-v2 link {str(elsewhere)!r} does not point at a blob of the store"
    )


@pytest.mark.parametrize(
    "name", ["m", "registry.ollama.ai/library/m", "ollama.com/library/m", "OLLAMA.COM/Library/M"]
)
@pytest.mark.parametrize("on_disk", ["registry.ollama.ai", "ollama.com"])
async def test_both_public_host_spellings_name_one_model(
    builder: StoreBuilder, store_root: Path, name: str, on_disk: str
) -> None:
    built = builder.add_model(f"{on_disk}/library/m:latest", tensors(), quantize="int4")
    store = aw.ModelStore(store_root)
    assert [str(n) for n in store.list_names()] == ["m:latest"]
    assert_exact(await aw.load_weights(name, store=store), built)
    builder.lay_out(f"{on_disk}/library/m:latest", "v2-symlink")
    assert (store_root / "manifests-v2/ollama.com/library/m/latest").is_symlink()
    assert (await store.open(name)).layout == "manifests-v2 symlink"
    assert [str(n) for n in store.list_names()] == ["m:latest"]


@pytest.mark.parametrize("layout", ["legacy", "v2-symlink"])
async def test_hosts_with_a_port_and_mixed_case(
    builder: StoreBuilder, store_root: Path, layout: LayoutName
) -> None:
    built, _ = add(builder, "LocalHost:5000/NS/Mixed:Tag", layout)
    if layout == "v2-symlink":
        assert (store_root / "manifests-v2/LocalHost%3A5000/NS/Mixed/Tag").is_symlink()
    store = aw.ModelStore(store_root)
    assert [str(n) for n in store.list_names()] == ["LocalHost:5000/NS/Mixed:Tag"]
    for name in ("LocalHost:5000/NS/Mixed:Tag", "localhost:5000/ns/mixed:tag"):
        model = await store.open(name)
        assert model.layout == EXPECTED_LAYOUT[layout]
        assert_exact(await aw.load_weights(name, store=store), built)


async def test_lowercase_percent_3a_is_read_too(builder: StoreBuilder, store_root: Path) -> None:
    add(builder, "localhost:5000/ns/m:t", "v2-symlink", seed=3)
    v2 = store_root / "manifests-v2"
    (v2 / "localhost%3A5000").rename(v2 / "localhost%3a5000")
    (store_root / "manifests/localhost:5000/ns/m/t").unlink()
    model = await aw.ModelStore(store_root).open("localhost:5000/ns/m:t")
    assert model.layout == "manifests-v2 symlink"
    assert [str(n) for n in aw.ModelStore(store_root).list_names()] == ["localhost:5000/ns/m:t"]


def list_store(builder: StoreBuilder, *, anchor: int | None = 1) -> tuple[BuiltModel, Path]:
    mlx_child = builder.add_model("m:latest-mlx", tensors(), quantize="int4")
    gguf_child = builder.add_gguf_model("m:latest-gguf")
    builder.add_manifest_list(
        "m:latest",
        [("mlx", "safetensors", mlx_child.path), ("llamacpp", "gguf", gguf_child)],
        anchor=anchor,
    )
    return mlx_child, gguf_child


@pytest.mark.parametrize("anchor", [1, None])
async def test_manifest_list_opens_its_mlx_child(
    builder: StoreBuilder, store_root: Path, anchor: int | None
) -> None:
    mlx_child, gguf_child = list_store(builder, anchor=anchor)
    store = aw.ModelStore(store_root)
    model = await store.open("m")
    assert (model.kind, model.runner, model.format) == ("tensor", "mlx", "safetensors")
    assert model.digest == sha256(mlx_child.path.read_bytes())
    v2 = store_root / "manifests-v2/ollama.com/library/m/latest"
    assert model.list_digest == sha256(v2.read_bytes())
    assert model.manifest_list is not None
    assert [c.runner for c in model.manifest_list.manifests] == ["mlx", "llamacpp"]
    assert_exact(await aw.load_weights("m", store=store), mlx_child)
    other = await store.open("m", runner="llamacpp")
    assert (other.kind, other.runner, other.digest) == (
        "gguf", "llamacpp", sha256(gguf_child.read_bytes()),
    )  # fmt: skip
    # the GGUF child loads as a GGUF model: this one's filler bytes are no GGUF header
    with pytest.raises(aw.HeaderError, match="GGUF header cut short") as caught:
        await aw.load_weights("m", store=aw.ModelStore(store_root, runner="llamacpp"))
    assert caught.value.digest is not None


async def test_manifest_list_without_a_local_child_names_the_runners(
    builder: StoreBuilder, store_root: Path
) -> None:
    mlx_child, _ = list_store(builder)
    (store_root / "blobs" / sha256(mlx_child.path.read_bytes()).replace(":", "-")).unlink()
    store = aw.ModelStore(store_root, runner="mlx")
    with pytest.raises(aw.UnsupportedModelError) as caught:
        await aw.load_weights("m", store=store)
    error = caught.value
    assert error.kind == "manifest list"
    assert error.runners == ["mlx", "llamacpp"]
    digest = sha256(mlx_child.path.read_bytes())
    assert error.reason == (
        "manifest list has no local child for runner mlx (children: mlx/safetensors, "
        f"llamacpp/gguf); mlx child {digest} is not in the store"
    )
    with pytest.raises(aw.UnsupportedModelError, match="runner ggml"):
        await aw.ModelStore(store_root).open("m", runner="ggml")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("adapter", "adapter-only model: it holds only a GGUF adapter layer and no base"),
        ("cloud", "cloud model: it runs on https://ollama.com:443 as 'gpt-oss:120b'; there are"),
        ("empty", "model has no weights: no tensor or GGUF layers, and no remote host"),
    ],
)
@pytest.mark.parametrize("layout", ["legacy", "v2-symlink"])
async def test_models_that_cannot_load_say_what_they_are(
    builder: StoreBuilder, store_root: Path, kind: str, message: str, layout: LayoutName
) -> None:
    if kind == "adapter":
        builder.add_gguf_model("x:latest", base=False, adapter=b"a", layout=layout)
    elif kind == "cloud":
        builder.add_cloud_model("x:latest", layout=layout)
    else:
        builder.write_manifest("x:latest", [])
        builder.lay_out("x:latest", layout)
    model = await aw.ModelStore(store_root).open("x")
    assert model.kind == kind
    for component in (None, "transformer"):
        with pytest.raises(aw.UnsupportedModelError) as caught:
            await aw.load_weights("x", component, store=store_root)
        assert caught.value.kind == kind
        assert str(caught.value).startswith(message), str(caught.value)
        assert "no component" not in str(caught.value)
    async with aw.WeightCache(store=store_root) as cache:
        with pytest.raises(aw.UnsupportedModelError, match=message.split(":")[0]):
            async with cache.lease("x"):
                pass


async def test_a_manifest_path_fixes_its_store(
    builder: StoreBuilder, store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "elsewhere"))
    built, document = add(builder, "m:latest", "v2-symlink")
    for path in (
        store_root / "manifests-v2/ollama.com/library/m/latest",
        store_root / "manifests/registry.ollama.ai/library/m/latest",
        store_root / "blobs" / sha256(document).replace(":", "-"),
    ):
        model = await aw.ModelStore().open(path)
        assert model.store.root == store_root
        assert_exact(await aw.load_weights(path), built)
    outside = tmp_path / "copied-manifest"
    outside.write_bytes(document)
    with pytest.raises(aw.ManifestError) as caught:
        await aw.load_weights(outside)
    assert caught.value.reason == (
        "this manifest file is not inside a store (<root>/manifests/<host>/<namespace>/"
        "<model>/<tag>); pass store= (CLI: --store) to say where its blobs are"
    )
    assert_exact(await aw.load_weights(outside, store=store_root), built)


async def test_blobs_named_the_pre_0_1_30_way_load_in_place(
    builder: StoreBuilder, store_root: Path
) -> None:
    built, _ = add(builder, "m:latest", "legacy")
    blobs = store_root / "blobs"
    for blob in list(blobs.iterdir()):
        blob.rename(blobs / blob.name.replace("sha256-", "sha256:"))
    before = sorted(p.name for p in blobs.iterdir())
    assert_exact(await aw.load_weights("m", store=store_root, verify=True), built)
    model = await aw.ModelStore(store_root).open("m")
    assert (await model.config()).model_format == "safetensors"
    assert sorted(p.name for p in blobs.iterdir()) == before  # nothing renamed


async def test_listing_merges_both_trees_and_ignores_metadata(
    builder: StoreBuilder, store_root: Path
) -> None:
    add(builder, "a:latest", "v2-symlink")
    add(builder, "b:latest", "legacy")
    add(builder, "c:latest", "v2-copy")
    builder.lay_out("c:latest", "v2-copy", anchor=False)
    (store_root / "metadata").mkdir()
    (store_root / "metadata" / ("sha256-" + "1" * 64 + ".json")).write_text("{}")
    names = [str(n) for n in aw.ModelStore(store_root).list_names()]
    assert names == ["a:latest", "b:latest", "c:latest"]
    assert not (store_root / "manifests/registry.ollama.ai/library/c/latest").exists()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["m:latest", "LocalHost:5000/NS/Mixed:Tag"])
async def test_rm_leaves_nothing_of_a_model_in_any_layout(
    builder: StoreBuilder, store_root: Path, layout: LayoutName, name: str
) -> None:
    add(builder, name, layout)
    removal = await aw.remove_model(name.lower(), store=store_root)  # matched ignoring case
    assert removal.manifests  # every entry of the name, in both trees
    assert removal.kept == []
    assert removal.unreadable == []
    assert sorted(p.name for p in (store_root / "blobs").iterdir()) == []
    for tree in ("manifests", "manifests-v2"):
        folder = store_root / tree
        assert not folder.exists() or list(folder.iterdir()) == []
    assert aw.ModelStore(store_root).list_names() == []


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_opening_decodes_the_manifest_document_once(
    builder: StoreBuilder, store_root: Path, layout: LayoutName, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A legacy file is decoded to tell an anchor; opening it must not decode it a second time
    # (a 5,120-layer manifest: ~6 ms a decode).
    from asyncweights import _manifest

    add(builder, "m:latest", layout)
    decoded: list[int] = []
    real = _manifest.decode_document

    def counting(data: bytes, **labels: object) -> object:
        decoded.append(len(data))
        return real(data, **labels)  # type: ignore[arg-type]

    monkeypatch.setattr("asyncweights._layout.decode_document", counting)
    monkeypatch.setattr("asyncweights._store.decode_document", counting)
    model = await aw.ModelStore(store_root).open("m")
    assert model.layout == EXPECTED_LAYOUT[layout]
    assert len(decoded) == 1
