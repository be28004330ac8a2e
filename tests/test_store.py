"""The models root, Ollama's name grammar (docs/format.md#model-names) and manifest resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

import asyncweights as aw
from asyncweights._names import blob_file_name
from asyncweights._store import default_root
from asyncweights.testing import StoreBuilder, random_weights


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("model", ("registry.ollama.ai", "library", "model", "latest")),
        ("model:tag", ("registry.ollama.ai", "library", "model", "tag")),
        ("ns/model", ("registry.ollama.ai", "ns", "model", "latest")),
        ("ns/model:7b", ("registry.ollama.ai", "ns", "model", "7b")),
        ("example.com/ns/model:q4", ("example.com", "ns", "model", "q4")),
        # A ':' before the last '/' belongs to the host's port, never to a tag.
        ("localhost:5000/ns/m", ("localhost:5000", "ns", "m", "latest")),
        ("localhost:5000/ns/m:v1.2", ("localhost:5000", "ns", "m", "v1.2")),
        ("https://example.com:443/ns/m:t", ("example.com:443", "ns", "m", "t")),
        ("z-image:latest", ("registry.ollama.ai", "library", "z-image", "latest")),
        ("Qwen3.5_a:Q4_K", ("registry.ollama.ai", "library", "Qwen3.5_a", "Q4_K")),
        # No '/' at all: 'host:5000' is a model and a tag.
        ("host:5000", ("registry.ollama.ai", "library", "host", "5000")),
    ],
)
def test_parse_accepts_ollama_names(name: str, parts: tuple[str, str, str, str]) -> None:
    assert aw.ModelName.parse(name).parts == parts


PATH_HINT = "; a str is a model name, never a path (give a manifest file as a pathlib.Path)"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty model"),
        ("model:", "empty tag"),
        ("/model", "empty namespace" + PATH_HINT),
        ("ns/", "empty model"),
        ("a/b/c/d", "bad character in host 'a/b'"),  # 4 parts leave a '/' in the host
        ("../../etc/passwd", "bad character in host '../..'" + PATH_HINT),
        ("/etc/passwd", "empty host" + PATH_HINT),
        ("~root/.bashrc", "bad character in namespace '~root'" + PATH_HINT),
        ("./m", "bad character in namespace '.'" + PATH_HINT),
        ("..", "bad character in model '..'"),
        ("ns/..:x", "bad character in model '..'"),
        ("my.ns/model", "bad character in namespace 'my.ns'"),
        ("ns/mo:del/x", "bad character in namespace 'mo:del'"),
        ("-model", "bad character in model '-model'"),
        ("mödel", "bad character in model 'mödel'"),
        ("model@sha256:" + "a" * 64, "bad character in model 'model@sha256'"),
        ("m" * 81, "model longer than 80 characters"),
        ("m:" + "t" * 81, "tag longer than 80 characters"),
    ],
)
def test_parse_rejects_bad_names(name: str, reason: str) -> None:
    with pytest.raises(aw.InvalidNameError) as info:
        aw.ModelName.parse(name)
    assert str(info.value) == f"invalid model name: {reason} (model {name!r})"


def test_short_form_leaves_defaults_out() -> None:
    assert str(aw.ModelName.parse("registry.ollama.ai/library/m:latest")) == "m:latest"
    assert str(aw.ModelName.parse("ns/m")) == "ns/m:latest"
    assert str(aw.ModelName.parse("h:1/ns/m:t")) == "h:1/ns/m:t"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(" /srv/models ", "/srv/models"), ("'/srv/m'", "/srv/m"), ('"/srv/x" ', "/srv/x")],
)
def test_root_from_env_is_trimmed_like_ollama(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", value)
    assert default_root() == Path(expected)


def test_root_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", "  ")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_root() == tmp_path / ".ollama" / "models"
    assert aw.ModelStore().root == tmp_path / ".ollama" / "models"


def test_blob_names_are_validated_and_lowercased() -> None:
    hexd = "AB" * 32
    assert blob_file_name("sha256:" + hexd) == "sha256-" + hexd.lower()
    for bad in ("sha256:" + "a" * 63, "sha512:" + "a" * 64, "sha256-" + "a" * 64,
                "sha256:../" + "a" * 61, "sha256:" + "g" * 64):  # fmt: skip
        with pytest.raises(ValueError, match="invalid digest"):
            blob_file_name(bad)


def _tiny(builder: StoreBuilder, name: str) -> Path:
    return builder.add_model(name, random_weights({"w": (2, 2)})).path


def test_resolve_exact_then_case_insensitive(builder: StoreBuilder, store_root: Path) -> None:
    path = _tiny(builder, "Example.com/NS/Model:Tag")
    store = aw.ModelStore(store_root)
    assert store.resolve("Example.com/NS/Model:Tag") == path
    assert store.resolve("example.COM/ns/model:tag") == path


def test_resolve_rejects_ambiguous_case_matches(builder: StoreBuilder, store_root: Path) -> None:
    _tiny(builder, "model:a")
    _tiny(builder, "MODEL:a")
    with pytest.raises(aw.ModelNotFoundError, match="ambiguous ignoring case"):
        aw.ModelStore(store_root).resolve("Model:A")


def test_missing_model_names_model_and_store(store_root: Path) -> None:
    with pytest.raises(aw.ModelNotFoundError) as info:
        aw.ModelStore(store_root).resolve("nothing:here")
    expected = store_root / "manifests/registry.ollama.ai/library/nothing/here"
    assert str(info.value) == (
        f"model not found in store {str(store_root)!r} (model 'nothing:here', file '{expected}')"
    )


async def test_models_lists_names_and_skips_temp_files(
    builder: StoreBuilder, store_root: Path
) -> None:
    _tiny(builder, "b:latest")
    _tiny(builder, "ns/a:v1")
    _tiny(builder, "host:1/x/y:z")
    temp = store_root / "manifests/registry.ollama.ai/library/b/.latest-123.tmp"
    temp.write_text("{}")
    names = [str(n) async for n in aw.ModelStore(store_root).models()]
    assert names == ["b:latest", "host:1/x/y:z", "ns/a:v1"]


async def test_open_by_name_path_and_manifest(builder: StoreBuilder, store_root: Path) -> None:
    path = _tiny(builder, "ns/m:t")
    store = aw.ModelStore(store_root)
    by_name = await store.open("ns/m:t")
    by_path = await store.open(path)
    by_manifest = await store.open(by_name.manifest)
    assert by_name.manifest == by_path.manifest == by_manifest.manifest
    assert by_name.label == "ns/m:t"
    assert by_path.label == str(path)
    assert by_manifest.label == "<manifest>"
