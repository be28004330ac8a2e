"""`_manifest` directly: the same Structs decode what Ollama wrote and encode it back alike."""

from __future__ import annotations

import json

import msgspec
import pytest

import asyncweights as aw
from asyncweights import _manifest
from asyncweights._manifest import (
    CONFIG_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    TENSOR_MEDIA_TYPE,
    ModelConfig,
    build_manifest,
    decode_config,
    decode_manifest,
    encode_config,
    encode_manifest,
)

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def test_manifest_encodes_in_ollamas_field_order() -> None:
    manifest = build_manifest(
        aw.Layer(CONFIG_MEDIA_TYPE, A, 10), [aw.Layer(TENSOR_MEDIA_TYPE, B, 20, "w")]
    )
    assert encode_manifest(manifest) == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
        b'"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"'
        + A.encode()
        + b'","size":10},"layers":[{"mediaType":"application/vnd.ollama.image.tensor",'
        b'"digest":"' + B.encode() + b'","size":20,"name":"w"}]}'
    )
    assert decode_manifest(encode_manifest(manifest)) == manifest


def test_an_empty_layer_name_is_no_name() -> None:
    assert aw.Layer(CONFIG_MEDIA_TYPE, A, 10, "").name is None
    assert b'"name"' not in msgspec.json.encode(aw.Layer(CONFIG_MEDIA_TYPE, A, 10, ""))


def test_uppercase_digests_are_lowered() -> None:
    assert aw.Layer(TENSOR_MEDIA_TYPE, A.upper().replace("SHA256", "sha256"), 1).digest == A


def test_a_manifest_without_media_type_is_dockers() -> None:
    doc = {"schemaVersion": 2, "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": A, "size": 1}}
    doc["layers"] = []
    manifest = decode_manifest(json.dumps(doc).encode())
    assert manifest.media_type == MANIFEST_MEDIA_TYPE
    assert json.loads(encode_manifest(manifest))["mediaType"] == MANIFEST_MEDIA_TYPE


def test_ollama_0_40_fields_are_written_only_when_set() -> None:
    config = aw.Layer(CONFIG_MEDIA_TYPE, A, 10)
    plain = aw.Manifest(schema_version=2, config=config, layers=[])
    assert b"runner" not in encode_manifest(plain)
    mlx = aw.Manifest(
        schema_version=2, config=config, layers=[], runner="mlx", format="safetensors"
    )
    decoded = json.loads(encode_manifest(mlx))
    assert (decoded["runner"], decoded["format"]) == ("mlx", "safetensors")


def test_config_encodes_as_ollama_writes_it() -> None:
    config = ModelConfig(
        model_format="safetensors", file_type="int4", requires="0.19.0", capabilities=["image"]
    )
    assert encode_config(config) == (
        b'{"model_format":"safetensors","model_family":"","model_families":null,'
        b'"model_type":"","file_type":"int4","requires":"0.19.0","capabilities":["image"],'
        b'"architecture":"","os":"","rootfs":{"type":"","diff_ids":null}}'
    )
    assert decode_config(encode_config(config)) == config


def test_config_keeps_what_a_cloud_model_says() -> None:
    data = json.dumps(
        {
            "model_format": "",
            "renderer": "harmony",
            "remote_host": "https://ollama.com:443",
            "remote_model": "gpt-oss:120b",
            "rootfs": None,
            "unknown_field": [1, 2],
        }
    ).encode()
    config = decode_config(data)
    assert (config.remote_host, config.remote_model) == ("https://ollama.com:443", "gpt-oss:120b")
    assert config.rootfs is None
    out = json.loads(encode_config(config))
    assert out["renderer"] == "harmony"
    assert "parser" not in out  # omitempty, as Go writes it
    assert out["rootfs"] is None


def test_a_config_of_the_wrong_shape_is_a_manifest_error() -> None:
    with pytest.raises(aw.ManifestError, match="invalid model config blob"):
        decode_config(b'{"capabilities": "completion"}', model="m")


def _manifest_of(layers: int) -> bytes:
    config = aw.Layer(CONFIG_MEDIA_TYPE, A, 10)
    tensors = [
        aw.Layer(TENSOR_MEDIA_TYPE, "sha256:" + f"{i:064x}", 1000 + i, f"blk.{i}.weight")
        for i in range(layers)
    ]
    return encode_manifest(build_manifest(config, tensors))


def _count_stepwise(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the documents `_manifest` hands to the stepwise parser, as they come."""
    from asyncweights import _json

    calls: list[int] = []
    real = _json.loads_stepwise

    def counting(text: bytes, *, unique_keys: bool = False) -> object:
        calls.append(len(text))
        return real(text, unique_keys=unique_keys)

    monkeypatch.setattr("asyncweights._manifest.loads_stepwise", counting)
    return calls


@pytest.mark.parametrize(("layers", "stepwise"), [(10, False), (5_120, False), (25_000, True)])
def test_manifests_decode_in_one_call_up_to_the_bound_and_in_steps_above(
    monkeypatch: pytest.MonkeyPatch, layers: int, stepwise: bool
) -> None:
    # 5,120 layers (0.95 MiB, a real big tensor model) take msgspec's one call: the stepwise
    # parser took ~190 ms for it; only documents over ONE_CALL_BYTES pay that.
    data = _manifest_of(layers)
    assert (len(data) > _manifest.ONE_CALL_BYTES) is stepwise
    calls = _count_stepwise(monkeypatch)
    decoded = _manifest.decode_document(data)
    assert isinstance(decoded, aw.Manifest)
    assert [layer.name for layer in decoded.layers] == [f"blk.{i}.weight" for i in range(layers)]
    assert decoded.layers[-1].size == 1000 + layers - 1
    assert calls == ([len(data)] if stepwise else [])


def test_a_bad_byte_in_a_one_call_manifest_is_named_by_offset() -> None:
    data = bytearray(_manifest_of(5_120))
    at = data.index(b"blk.4000.weight")
    data[at] = 0xFF
    with pytest.raises(aw.ManifestError, match=rf"invalid manifest: not UTF-8 \(byte {at}\)"):
        _manifest.decode_document(bytes(data), model="m")


@pytest.mark.parametrize("keys", [10, 40_000])
def test_a_big_config_blob_is_decoded_in_steps_and_keeps_its_draft_as_parsed(
    monkeypatch: pytest.MonkeyPatch, keys: int
) -> None:
    # Over 64 KiB a config blob goes through the stepwise parser (a hostile `draft` object
    # cannot make one long C call), and `draft` is the parsed object itself, not a copy.
    draft = {f"k{i}": {"n": i, "s": "x" * 8} for i in range(keys)}
    blob = {"model_format": "safetensors", "capabilities": ["completion"] * 5000}
    data = json.dumps({**blob, "draft": draft, "unknown": [1, 2]}).encode()
    assert len(data) > 64 * 1024
    calls = _count_stepwise(monkeypatch)
    config = decode_config(data)
    assert calls == [len(data)]
    assert config.draft == draft
    assert config.model_format == "safetensors"
    assert config.capabilities == ["completion"] * 5000
    assert decode_config(data) == msgspec.json.decode(data, type=ModelConfig)


def test_a_config_blob_with_a_draft_of_the_wrong_type_is_refused_either_way() -> None:
    for pad in (0, 70_000):
        data = json.dumps({"draft": "no", "os": "x" * pad}).encode()
        with pytest.raises(aw.ManifestError, match=r"invalid model config blob: Expected `object"):
            decode_config(data, model="m")
