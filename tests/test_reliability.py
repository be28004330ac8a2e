"""Bad input and faults: every row of issue 7 gives one typed error, and nothing leaks.

Each case loads through the public API, so the whole path is covered: the error is the exact
`AsyncWeightsError` subclass the row calls for, its message names the model, blob, tensor and
file where they apply, and afterwards no blob file is open and no thread is loading
(the autouse `_quiet` fixture).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import mlx.core as mx
import msgspec
import pytest

import asyncweights as aw
from asyncweights import _load, _read
from asyncweights._errors import InvalidDigestError
from asyncweights._manifest import CONFIG_MEDIA_TYPE, TENSOR_MEDIA_TYPE, Layer
from asyncweights._manifest import Layer as ManifestLayer
from asyncweights.testing import StoreBuilder, random_weights

from .conftest import blob_fds, wait_quiet

MODEL = "bad"
U8 = "U8"


# ---------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _quiet(store_root: Path) -> Iterator[None]:
    """After every test: no blob file open, no thread still in loader code."""
    yield
    if store_root.exists():
        wait_quiet(store_root)


def raw_blob(
    header: bytes | dict[str, Any], data: bytes = b"", *, length: int | None = None
) -> bytes:
    """A safetensors file from a header (dict or raw JSON bytes), data, and an optional lie."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    return n.to_bytes(8, "little") + text + data


def entry(dtype: object = U8, shape: object = (4,), offsets: object = (0, 4)) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def one_blob_model(builder: StoreBuilder, raw: bytes, name: str = "w") -> Layer:
    layer = builder.add_bytes(name, raw)
    builder.write_manifest(MODEL, [layer])
    return layer


async def fails(
    exc_type: type[aw.AsyncWeightsError],
    root: Path,
    *fragments: str,
    model: Any = MODEL,
    component: str | None = None,
    **kwargs: Any,
) -> aw.AsyncWeightsError:
    """Load `model` and check the exact error type and that its message has `fragments`."""
    with pytest.raises(aw.AsyncWeightsError) as info:
        await aw.load_weights(model, component, store=root, **kwargs)
    exc = info.value
    assert type(exc) is exc_type, repr(exc)
    message = str(exc)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return exc


def names_blob(root: Path, layer: Layer, tensor: str | None = None) -> tuple[str, ...]:
    """The fragments that say which model, blob, file and tensor an error is about."""
    out = (f"model {MODEL!r}", layer.digest, str(blob_path(root, layer.digest)))
    return out if tensor is None else (*out, f"tensor {tensor!r}")


def same_bits(a: mx.array, b: mx.array) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(memoryview(mx.contiguous(a))) == bytes(memoryview(mx.contiguous(b)))  # type: ignore[arg-type]


def assert_bit_exact(weights: aw.Weights, expected: dict[str, mx.array]) -> None:
    assert sorted(weights) == sorted(expected)
    for name, array in expected.items():
        assert same_bits(weights[name], array), name


def valid_manifest(builder: StoreBuilder) -> dict[str, Any]:
    """A valid manifest dict (one F32 tensor) whose blobs exist, for mutation."""
    layer = builder.add_blob("w", {"w": mx.arange(4, dtype=mx.float32)})
    config = builder.add_config()
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": msgspec.to_builtins(config),
        "layers": [msgspec.to_builtins(layer)],
    }


def write_raw_manifest(root: Path, data: bytes) -> Path:
    from asyncweights._writer import write_manifest

    return write_manifest(root, MODEL, data)


# ------------------------------------------------------------------ manifest: JSON and schema


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


MALFORMED_MANIFESTS: dict[str, Callable[[bytes], bytes]] = {
    "not-json": lambda m: b"this is not json",
    "empty": lambda m: b"",
    "truncated": lambda m: m[: len(m) // 2],
    "trailing-garbage": lambda m: m.rstrip() + b" {}",
    "bom": lambda m: b"\xef\xbb\xbf" + m,
    "utf16": lambda m: m.decode().encode("utf-16"),
    "nan-size": lambda m: m.replace(b'"size":', b'"size":NaN,"x":', 1),
    "not-utf8-in-unknown-field": lambda m: m.replace(b"{", b'{"x":"\xff\xfe",', 1),
    "deep-nesting-in-unknown-field": lambda m: m.replace(b"{", b'{"x":' + _deep(100_000) + b",", 1),
    "null": lambda m: b"null",
    "array": lambda m: b"[]",
}


@pytest.mark.parametrize("mutate", MALFORMED_MANIFESTS.values(), ids=MALFORMED_MANIFESTS.keys())
async def test_malformed_manifest_json(
    builder: StoreBuilder, store_root: Path, mutate: Callable[[bytes], bytes]
) -> None:
    good = json.dumps(valid_manifest(builder), separators=(",", ":")).encode()
    path = write_raw_manifest(store_root, mutate(good))
    exc = await fails(
        aw.ManifestError, store_root, "invalid manifest", f"model {MODEL!r}", str(path)
    )
    assert exc.path == path


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Mutation setting a dotted path (``layers.0.size``) to `value` (`_DEL` deletes it)."""

    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if value is _DEL:
            del node[key]
        else:
            node[key] = value

    return apply


_DEL = object()

SCHEMA_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "schemaVersion-string": (_set("schemaVersion", "2"), "$.schemaVersion"),
    "schemaVersion-bool": (_set("schemaVersion", True), "$.schemaVersion"),
    "schemaVersion-float": (_set("schemaVersion", 2.0), "$.schemaVersion"),
    "schemaVersion-missing": (_set("schemaVersion", _DEL), "schemaVersion"),
    "config-missing": (_set("config", _DEL), "config"),
    "layers-not-list": (_set("layers", {"a": 1}), "$.layers"),
    "layers-missing": (_set("layers", _DEL), "layers"),
    "layer-not-object": (_set("layers.0", "sha256:00"), "$.layers[0]"),
    "digest-not-string": (_set("layers.0.digest", 12), "$.layers[0].digest"),
    "digest-missing": (_set("layers.0.digest", _DEL), "digest"),
    "mediaType-missing": (_set("layers.0.mediaType", _DEL), "mediaType"),
    "size-negative": (_set("layers.0.size", -1), "$.layers[0].size"),
    "size-bool": (_set("layers.0.size", True), "$.layers[0].size"),
    "size-float": (_set("layers.0.size", 40.0), "$.layers[0].size"),
    "size-huge": (_set("layers.0.size", 2**63), "$.layers[0].size"),
    "size-string": (_set("layers.0.size", "40"), "$.layers[0].size"),
    "name-not-string": (_set("layers.0.name", 7), "$.layers[0].name"),
    "config-size-negative": (_set("config.size", -5), "$.config.size"),
    "schemaVersion-1": (_set("schemaVersion", 1), "unsupported manifest schemaVersion 1"),
    "schemaVersion-3": (_set("schemaVersion", 3), "unsupported manifest schemaVersion 3"),
    "mediaType-index": (
        _set("mediaType", "application/vnd.oci.image.index.v1+json"),
        "unsupported manifest mediaType 'application/vnd.oci.image.index.v1+json'",
    ),
    "mediaType-not-string": (_set("mediaType", 5), "$.mediaType"),
}


@pytest.mark.parametrize(("mutate", "where"), SCHEMA_CASES.values(), ids=SCHEMA_CASES.keys())
async def test_manifest_wrong_types_missing_fields_unknown_versions(
    builder: StoreBuilder,
    store_root: Path,
    mutate: Callable[[dict[str, Any]], None],
    where: str,
) -> None:
    doc = valid_manifest(builder)
    mutate(doc)
    path = write_raw_manifest(store_root, json.dumps(doc).encode())
    await fails(aw.ManifestError, store_root, where, f"model {MODEL!r}", str(path))


async def test_oci_manifest_media_type_is_accepted(builder: StoreBuilder, store_root: Path) -> None:
    doc = valid_manifest(builder)
    doc["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    write_raw_manifest(store_root, json.dumps(doc).encode())
    weights = await aw.load_weights(MODEL, store=store_root)
    assert same_bits(weights["w"], mx.arange(4, dtype=mx.float32))


async def test_unknown_layer_media_types_are_skipped(
    builder: StoreBuilder, store_root: Path
) -> None:
    w = random_weights({"a": (3, 5), "b": (7,)}, seed=3)
    model = builder.add_model(MODEL, w)
    # Layers of types a tensor loader never opens: their blobs may be absent or garbage.
    garbage = builder.add_bytes("future", b"\x00garbage", media_type="application/x-future+v9")
    absent = ManifestLayer("application/vnd.ollama.image.template", "sha256:" + "ab" * 32, 10)
    gguf = builder.add_bytes("", b"GGUF....", media_type="application/vnd.ollama.image.model")
    doc = dict(model.manifest)
    doc["layers"] = [
        msgspec.to_builtins(garbage),
        {"mediaType": absent.media_type, "digest": absent.digest, "size": absent.size},
        *model.manifest["layers"],
        msgspec.to_builtins(gguf),
        {
            "mediaType": "application/vnd.ollama.image.params",
            "digest": "sha256:" + "cd" * 32,
            "size": 3,
        },
    ]
    write_raw_manifest(store_root, json.dumps(doc).encode())
    weights = await aw.load_weights(MODEL, store=store_root)
    assert_bit_exact(weights, model.expected)


# ------------------------------------------------------------------------------ digests, names

BAD_DIGESTS = {
    "sha512": "sha512:" + "a" * 128,
    "dash": "sha256-" + "a" * 64,
    "hex63": "sha256:" + "a" * 63,
    "hex65": "sha256:" + "a" * 65,
    "traversal": "sha256:../../../../etc/passwd",
    "traversal-padded": "sha256:" + "../" * 21 + "a",
    "slash": "sha256:" + "a" * 32 + "/" + "a" * 31,
    "nul": "sha256:" + "a" * 63 + "\x00",
    "newline": "sha256:" + "a" * 64 + "\n",
    "not-hex": "sha256:" + "g" * 64,
    "empty": "",
}


@pytest.mark.parametrize("where", ["layers.0.digest", "config.digest"])
@pytest.mark.parametrize("digest", BAD_DIGESTS.values(), ids=BAD_DIGESTS.keys())
async def test_bad_digest_rejected_before_any_path_is_built(
    builder: StoreBuilder, store_root: Path, digest: str, where: str
) -> None:
    doc = valid_manifest(builder)
    _set(where, digest)(doc)
    path = write_raw_manifest(store_root, json.dumps(doc).encode())
    field = "$.layers[0]" if where.startswith("layers") else "$.config"
    await fails(aw.ManifestError, store_root, field, f"model {MODEL!r}", str(path))


@pytest.mark.parametrize("digest", BAD_DIGESTS.values(), ids=BAD_DIGESTS.keys())
def test_bad_digest_in_python_built_layer_or_path(store_root: Path, digest: str) -> None:
    with pytest.raises(InvalidDigestError, match="expected 'sha256:' and 64 hex digits"):
        ManifestLayer(TENSOR_MEDIA_TYPE, digest, 10, "w")
    with pytest.raises(InvalidDigestError):
        aw.ModelStore(store_root).blob_path(digest)


async def test_uppercase_digest_accepted_and_normalized(
    builder: StoreBuilder, store_root: Path
) -> None:
    doc = valid_manifest(builder)
    lower = doc["layers"][0]["digest"]
    doc["layers"][0]["digest"] = "sha256:" + lower[7:].upper()
    doc["config"]["digest"] = "sha256:" + doc["config"]["digest"][7:].upper()
    write_raw_manifest(store_root, json.dumps(doc).encode())
    weights = await aw.load_weights(MODEL, store=store_root)
    assert weights.info["w"].digest == lower
    assert same_bits(weights["w"], mx.arange(4, dtype=mx.float32))


BAD_NAMES = [
    "a/../../b:t",
    "h/../m",
    "ns/..",
    "m:../../t",
    "host/ns/m/extra:t",
    "a/b/c/d/e",
    "a\\..\\b",
    "m\x00",
    "m/\x00/x",
    "",
    ":t",
    "m:",
    "h//m",
    "ns/m.bad/x",
    "x" * 81,
    "h/ns/m:" + "t" * 81,
    "é",
    "m@sha256:" + "a" * 64,
]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_model_name_cannot_escape_the_store(
    builder: StoreBuilder, store_root: Path, name: str
) -> None:
    # A decoy manifest where a traversal would land, to show it is never reached.
    builder.add_model("decoy", random_weights({"w": (2,)}))
    exc = await fails(aw.InvalidNameError, store_root, "invalid model name", model=name)
    assert exc.model == name


@pytest.mark.parametrize("name", ["/etc/passwd", "/"])
def test_absolute_paths_are_not_model_names(name: str) -> None:
    with pytest.raises(aw.InvalidNameError):
        aw.ModelName.parse(name)


# -------------------------------------------------------------------------------- blob files


async def test_missing_blob(builder: StoreBuilder, store_root: Path) -> None:
    w = random_weights({"a": (2, 3), "b": (4,)})
    model = builder.add_model(MODEL, w)
    layer = model.layers[1]
    blob_path(store_root, layer.digest).unlink()
    exc = await fails(
        aw.BlobMissingError, store_root, "missing", *names_blob(store_root, layer, "b")
    )
    assert exc.errno == errno.ENOENT


async def test_missing_config_blob(builder: StoreBuilder, store_root: Path) -> None:
    model = builder.add_model(MODEL, random_weights({"a": (2,)}))
    blob_path(store_root, model.config.digest).unlink()
    await fails(aw.BlobMissingError, store_root, "missing", f"model {MODEL!r}", model.config.digest)


@pytest.mark.parametrize("change", ["shorter", "longer", "empty"])
async def test_blob_size_differs_from_manifest(
    builder: StoreBuilder, store_root: Path, change: str
) -> None:
    model = builder.add_model(MODEL, random_weights({"a": (2, 3)}))
    layer = model.layers[0]
    path = blob_path(store_root, layer.digest)
    data = path.read_bytes()
    path.write_bytes({"shorter": data[:-1], "longer": data + b"\0", "empty": b""}[change])
    actual = {"shorter": layer.size - 1, "longer": layer.size + 1, "empty": 0}[change]
    await fails(
        aw.SizeMismatchError,
        store_root,
        f"blob is {actual} bytes but the manifest says {layer.size}",
        *names_blob(store_root, layer),
    )


@pytest.mark.parametrize("kind", ["directory", "fifo"])
async def test_blob_that_is_not_a_regular_file(
    builder: StoreBuilder, store_root: Path, kind: str
) -> None:
    model = builder.add_model(MODEL, random_weights({"a": (2, 3)}))
    layer = model.layers[0]
    path = blob_path(store_root, layer.digest)
    path.unlink()
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    with anyio.fail_after(10):  # a FIFO must never block the open
        await fails(aw.BlobError, store_root, "not a regular file", *names_blob(store_root, layer))


# ------------------------------------------------------------------------------------ headers

HEADER_CASES: dict[str, tuple[bytes, type[aw.AsyncWeightsError], str, str | None]] = {
    # name: (whole blob, error, message fragment, tensor named)
    "length-0": (raw_blob(b"{}", length=0), aw.HeaderError, "header length is 0", None),
    "length-100MB": (
        raw_blob(b"{}", length=100_000_000),
        aw.HeaderError,
        "header length 100000000 is not below the limit of 100000000 bytes",
        None,
    ),
    "length-2^63": (raw_blob(b"{}", length=2**63), aw.HeaderError, "not below the limit", None),
    "length-2^64-1": (
        raw_blob(b"{}", length=2**64 - 1),
        aw.HeaderError,
        "not below the limit",
        None,
    ),
    "length-past-file": (
        raw_blob(b"{}" + b" " * 60, length=10_000),
        aw.HeaderError,
        "header length 10000 runs past the end of the 70-byte file",
        None,
    ),
    "file-too-short": (b"\x02\0\0\0", aw.HeaderError, "file too short", None),
    "not-utf8": (
        raw_blob(b'{"\xff\xfe":' + json.dumps(entry(offsets=(0, 0), shape=(0,))).encode() + b"}"),
        aw.HeaderError,
        "not UTF-8",
        None,
    ),
    "not-json": (raw_blob(b"{"), aw.HeaderError, "header is not valid JSON", None),
    "not-object": (
        raw_blob(b"[1,2]"),
        aw.HeaderError,
        "header is a JSON list, not an object",
        None,
    ),
    "string": (raw_blob(b'"x"'), aw.HeaderError, "not an object", None),
    "bom": (raw_blob(b"\xef\xbb\xbf{}"), aw.HeaderError, "header is not valid JSON", None),
    "nul-padded": (raw_blob(b"{}\0\0"), aw.HeaderError, "header is not valid JSON", None),
    "nan": (
        raw_blob(b'{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,4]}}', b"1234"),
        aw.HeaderError,
        "header is not valid JSON",
        None,
    ),
    "infinity": (
        raw_blob(b'{"a":{"dtype":"U8","shape":[1e999],"data_offsets":[0,4]}}', b"1234"),
        aw.HeaderError,
        "header is not valid JSON",
        None,
    ),
    "duplicate-tensor": (
        raw_blob(
            b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
            b'"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
            b"1234",
        ),
        aw.HeaderError,
        "duplicate key 'a' in header",
        "a",
    ),
    "duplicate-field": (
        raw_blob(b'{"a":{"dtype":"I16","dtype":"U16","shape":[2],"data_offsets":[0,4]}}', b"1234"),
        aw.HeaderError,
        "duplicate key 'dtype' in header",
        None,
    ),
    "duplicate-escaped-field": (
        raw_blob(
            b'{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4],"\\u0064type":"BF16"}}', b"1234"
        ),
        aw.HeaderError,
        "duplicate key 'dtype' in header",
        None,
    ),
    "duplicate-escaped-tensor": (
        raw_blob(
            b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
            b'"\\u0061":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
            b"1234",
        ),
        aw.HeaderError,
        "duplicate key 'a' in header",
        "a",
    ),
    "duplicate-metadata": (
        raw_blob(b'{"__metadata__":{"k":"1"},"__metadata__":{"k":"2"}}'),
        aw.HeaderError,
        "duplicate key '__metadata__'",
        None,
    ),
    "deep-nesting": (
        raw_blob(b'{"__metadata__":' + _deep(100_000) + b"}"),
        aw.HeaderError,
        "header JSON is nested too deeply",
        None,
    ),
    "deep-nesting-in-entry": (
        raw_blob(
            b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"x":' + _deep(100_000) + b"}}",
            b"1234",
        ),
        aw.HeaderError,
        "nested too deeply",
        None,
    ),
}

_META = "__metadata__ must be an object of strings"
for _name, _meta in {
    "metadata-list": [],
    "metadata-string": "x",
    "metadata-int-value": {"a": 1},
    "metadata-null-value": {"a": None},
    "metadata-nested": {"a": {"b": "c"}},
    "metadata-list-value": {"a": ["b"]},
}.items():
    HEADER_CASES[_name] = (raw_blob({"__metadata__": _meta}), aw.HeaderError, _META, None)

_SUPPORTED = (
    "supported: BF16, BOOL, C64, F16, F32, F8_E4M3, F8_E8M0, I16, I32, I64, I8, U16, U32, U64, U8"
)
for _dtype in ["F64", "F8_E5M2", "F8_E4M3FNUZ", "Q4", "f32", "", 5, None, ["F32"]]:
    _e = entry(dtype=_dtype, shape=(1,), offsets=(0, 8))
    _data = b"\0" * 8
    if _dtype is None:
        HEADER_CASES["dtype-null"] = (
            raw_blob({"t": _e}, _data),
            aw.HeaderError,
            "tensor entry needs dtype, shape and data_offsets",
            "t",
        )
        continue
    HEADER_CASES[f"dtype-{_dtype!r}"] = (
        raw_blob({"t": _e}, _data),
        aw.UnsupportedDTypeError,
        f"unsupported dtype {_dtype!r}; {_SUPPORTED}",
        "t",
    )

_SHAPE = "is not a list of integers in [0, 2^31)"
for _name, (_shape, _size) in {
    "shape-negative": ([-1], 4),
    "shape-negative-pair": ([-2, -2], 4),
    "shape-float": ([2.0], 2),
    "shape-bool": ([True], 1),
    "shape-2^32": ([2**32], 0),
    "shape-2^32+1": ([2**32 + 1], 1),
    "shape-2^31": ([2**31], 0),
    "shape-2^64": ([2**64], 0),
    "shape-wraps-to-0": ([2**32, 2**32], 0),
    "shape-not-list": (4, 4),
    "shape-nested": ([[4]], 4),
    "shape-string": (["4"], 4),
}.items():
    HEADER_CASES[_name] = (
        raw_blob({"t": entry(shape=_shape, offsets=(0, _size))}, b"\0" * _size),
        aw.HeaderError,
        _SHAPE,
        "t",
    )
HEADER_CASES["shape-byte-count-overflows"] = (
    raw_blob({"t": entry(dtype="F32", shape=[2**31 - 1] * 4, offsets=(0, 4))}, b"\0" * 4),
    aw.HeaderError,
    "data_offsets span 4 bytes but F32",
    "t",
)
HEADER_CASES["shape-bytes-mismatch"] = (
    raw_blob({"t": entry(dtype="F32", shape=(3,), offsets=(0, 8))}, b"\0" * 8),
    aw.HeaderError,
    "data_offsets span 8 bytes but F32 [3] needs 12",
    "t",
)


def _two(a: tuple[int, int], b: tuple[int, int], data: int) -> bytes:
    return raw_blob(
        {"a": entry(shape=(a[1] - a[0],), offsets=a), "b": entry(shape=(b[1] - b[0],), offsets=b)},
        b"\0" * data,
    )


HEADER_CASES |= {
    "offsets-overlap": (_two((0, 4), (2, 6), 6), aw.HeaderError, "overlaps another tensor", "b"),
    "offsets-alias": (_two((0, 4), (0, 4), 4), aw.HeaderError, "overlaps another tensor", None),
    "offsets-gap": (_two((0, 4), (5, 9), 9), aw.HeaderError, "leaves a gap before it", "b"),
    "offsets-not-from-0": (
        raw_blob({"a": entry(offsets=(2, 6))}, b"\0" * 6),
        aw.HeaderError,
        "leaves a gap before it",
        "a",
    ),
    "offsets-reversed": (
        raw_blob({"a": entry(shape=(4,), offsets=(4, 0))}, b"\0" * 4),
        aw.HeaderError,
        "data_offsets [4, 0] are reversed",
        "a",
    ),
    "offsets-out-of-range": (
        raw_blob({"a": entry(shape=(8,), offsets=(0, 8))}, b"\0" * 4),
        aw.HeaderError,
        "data_offsets end at 8, past the 4-byte data section",
        None,
    ),
    "offsets-huge": (
        raw_blob({"a": entry(shape=(4,), offsets=(2**64, 2**64 + 4))}, b"\0" * 4),
        aw.HeaderError,
        "leaves a gap",
        "a",
    ),
    "trailing-bytes": (
        raw_blob({"a": entry()}, b"\0" * 6),
        aw.HeaderError,
        "2 trailing bytes after the last tensor",
        None,
    ),
    "trailing-bytes-empty-header": (
        raw_blob(b"{}", b"\0"),
        aw.HeaderError,
        "1 trailing bytes",
        None,
    ),
    "offsets-one-entry": (
        raw_blob({"a": entry(offsets=[4])}, b"\0" * 4),
        aw.HeaderError,
        "is not two non-negative integers",
        "a",
    ),
    "offsets-three-entries": (
        raw_blob({"a": entry(offsets=[0, 4, 4])}, b"\0" * 4),
        aw.HeaderError,
        "is not two non-negative integers",
        "a",
    ),
    "offsets-float": (
        raw_blob({"a": entry(offsets=[0.0, 4.0])}, b"\0" * 4),
        aw.HeaderError,
        "is not two non-negative integers",
        "a",
    ),
    "offsets-negative": (
        raw_blob({"a": entry(offsets=[-4, 0])}, b"\0" * 4),
        aw.HeaderError,
        "is not two non-negative integers",
        "a",
    ),
    "offsets-bool": (
        raw_blob({"a": entry(shape=(1,), offsets=[False, True])}, b"\0"),
        aw.HeaderError,
        "is not two non-negative integers",
        "a",
    ),
    "entry-not-object": (
        raw_blob({"a": [0, 4]}, b"\0" * 4),
        aw.HeaderError,
        "tensor entry is not an object",
        "a",
    ),
    "entry-missing-offsets": (
        raw_blob({"a": {"dtype": "U8", "shape": [4]}}, b"\0" * 4),
        aw.HeaderError,
        "tensor entry needs dtype, shape and data_offsets",
        "a",
    ),
}


@pytest.mark.parametrize(
    ("raw", "error", "fragment", "tensor"), HEADER_CASES.values(), ids=HEADER_CASES.keys()
)
async def test_bad_header(
    builder: StoreBuilder,
    store_root: Path,
    raw: bytes,
    error: type[aw.AsyncWeightsError],
    fragment: str,
    tensor: str | None,
) -> None:
    layer = one_blob_model(builder, raw)
    await fails(error, store_root, fragment, *names_blob(store_root, layer, tensor))


@pytest.mark.parametrize(
    "header",
    [
        b'  {"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}    ',
        b'{"__metadata__":null,"a":{"data_offsets":[0,4],"shape":[2,2],"dtype":"U8","x":1}}',
        b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"z":{"dtype":"F32","shape":[2,0],'
        b'"data_offsets":[4,4]},"s":{"dtype":"U8","shape":[],"data_offsets":[4,5]}}',
    ],
    ids=["go-padding", "mlx-style-extra-field", "zero-size-and-scalar"],
)
async def test_valid_unusual_headers_load(
    builder: StoreBuilder, store_root: Path, header: bytes
) -> None:
    one_blob_model(builder, raw_blob(header, b"\x01\x02\x03\x04\x05"[: 4 + (b'"s"' in header)]))
    weights = await aw.load_weights(MODEL, store=store_root)
    assert same_bits(weights["a"].reshape(-1), mx.array([1, 2, 3, 4], dtype=mx.uint8))
    if "z" in weights:
        assert tuple(weights["z"].shape) == (2, 0)
        assert weights["z"].dtype == mx.float32
        assert tuple(weights["s"].shape) == ()
        assert weights["s"].item() == 5


# ------------------------------------------------------------------------- duplicate tensors


async def test_duplicate_tensor_across_blobs(builder: StoreBuilder, store_root: Path) -> None:
    first = builder.add_blob("w1", {"w": mx.zeros((2,))})
    second = builder.add_blob("w2", {"w": mx.ones((2,))})
    builder.write_manifest(MODEL, [first, second])
    await fails(
        aw.DuplicateTensorError,
        store_root,
        "tensor defined twice",
        first.digest,
        *names_blob(store_root, second, "w"),
    )


async def test_duplicate_tensor_across_blobs_of_a_component(
    builder: StoreBuilder, store_root: Path
) -> None:
    first = builder.add_blob("transformer/blocks.0", {"x.weight": mx.zeros((2,))})
    second = builder.add_blob("transformer/blocks.1", {"x.weight": mx.ones((2,))})
    other = builder.add_blob("vae/x", {"x.weight": mx.ones((2,))})  # another component: fine
    builder.write_manifest(MODEL, [first, other, second])
    await fails(
        aw.DuplicateTensorError,
        store_root,
        "tensor defined twice",
        first.digest,
        *names_blob(store_root, second, "transformer/x.weight"),
        component="transformer",
    )
    vae = await aw.load_weights(MODEL, "vae", store=store_root)
    assert list(vae) == ["x.weight"]


async def test_duplicate_between_e0_data_blob_and_keyed_blob(
    builder: StoreBuilder, store_root: Path
) -> None:
    e0 = builder.add_blob("w", {"data": mx.zeros((2,))})
    e1 = builder.add_blob("group", {"w": mx.ones((2,))})
    builder.write_manifest(MODEL, [e0, e1])
    await fails(
        aw.DuplicateTensorError, store_root, "tensor defined twice", "tensor 'w'", e0.digest
    )


async def test_duplicate_after_scale_renaming_within_a_blob(
    builder: StoreBuilder, store_root: Path
) -> None:
    # `w.scale` is loaded as `w_scale`; a blob that also has a literal `w_scale` must not
    # silently keep only one of the two.
    layer = builder.add_blob(
        "w",
        {
            "w": mx.zeros((2, 8), dtype=mx.uint32),
            "w.scale": mx.ones((2, 1), dtype=mx.bfloat16),
            "w.bias": mx.zeros((2, 1), dtype=mx.bfloat16),
            "w_scale": mx.full((2, 1), 2.0, dtype=mx.bfloat16),
        },
    )
    builder.write_manifest(MODEL, [layer])
    await fails(aw.DuplicateTensorError, store_root, *names_blob(store_root, layer, "w_scale"))


async def test_same_digest_listed_twice_is_read_once(
    builder: StoreBuilder, store_root: Path
) -> None:
    layer = builder.add_blob("w", {"w": mx.arange(3, dtype=mx.float32)})
    builder.write_manifest(MODEL, [layer, layer])
    weights = await aw.load_weights(MODEL, store=store_root)
    assert list(weights) == ["w"]


# --------------------------------------------------------------------- config and quantization


@pytest.mark.parametrize(
    "data",
    [b"{not json", b"\xff\xfe{}", b'{"a":' + _deep(100_000) + b"}"],
    ids=["not-json", "not-utf8", "deep-nesting"],
)
async def test_config_layer_that_is_not_json(
    builder: StoreBuilder, store_root: Path, data: bytes
) -> None:
    tensor = builder.add_blob("w", {"w": mx.zeros((2,))})
    index = builder.add_json("model_index.json", data)
    builder.write_manifest(MODEL, [tensor, index])
    await fails(
        aw.ManifestError,
        store_root,
        "model_index.json",
        "not valid JSON",
        f"model {MODEL!r}",
        index.digest,
    )
    model = await aw.ModelStore(store_root).open(MODEL)
    with pytest.raises(aw.ManifestError, match=index.digest):
        await model.read_config("model_index.json")


@pytest.mark.parametrize(
    "data",
    [b"GGUF", b"[]", b'{"file_type": 4}', b'{"x":' + _deep(100_000) + b"}"],
    ids=["not-json", "array", "wrong-type", "deep-nesting"],
)
async def test_model_config_blob_that_is_not_json(
    builder: StoreBuilder, store_root: Path, data: bytes
) -> None:
    tensor = builder.add_blob("w", {"w": mx.zeros((2,))})
    config = builder.add_bytes("", data, media_type=CONFIG_MEDIA_TYPE)
    builder.write_manifest(MODEL, [tensor], config=config)
    await fails(
        aw.ManifestError, store_root, "invalid model config blob", f"model {MODEL!r}", config.digest
    )


@pytest.mark.parametrize(
    ("data", "byte"),
    [(b'{"model_family":"\xff"}', 17), (b'{"x":"\xc3\x28","file_type":"F16"}', 6)],
    ids=["known-field", "unknown-field"],
)
async def test_model_config_blob_that_is_not_utf8(
    builder: StoreBuilder, store_root: Path, data: bytes, byte: int
) -> None:
    # Detected by asyncweights itself (bytes.decode), whatever the JSON decoder's wording.
    tensor = builder.add_blob("w", {"w": mx.zeros((2,))})
    config = builder.add_bytes("", data, media_type=CONFIG_MEDIA_TYPE)
    builder.write_manifest(MODEL, [tensor], config=config)
    await fails(
        aw.ManifestError,
        store_root,
        f"invalid model config blob: not UTF-8 (byte {byte})",
        f"model {MODEL!r}",
        config.digest,
    )


@pytest.mark.parametrize("field", ["name", "x"], ids=["layer-name", "unknown-field"])
async def test_manifest_that_is_not_utf8_names_the_byte(
    builder: StoreBuilder, store_root: Path, field: str
) -> None:
    good = json.dumps(valid_manifest(builder), separators=(",", ":")).encode()
    marker = b'"mediaType":'
    bad = good.replace(marker, b'"' + field.encode() + b'":"a\xff",' + marker, 1)
    byte = bad.index(b"\xff")
    path = write_raw_manifest(store_root, bad)
    await fails(
        aw.ManifestError, store_root, f"invalid manifest: not UTF-8 (byte {byte})", str(path)
    )


async def test_quantized_weight_without_scales(builder: StoreBuilder, store_root: Path) -> None:
    packed = mx.zeros((4, 8), dtype=mx.uint32)
    layer = builder.add_blob(
        "w", {"w": packed}, style="mlx", metadata={"quant_type": "int4", "group_size": "64"}
    )
    builder.write_manifest(MODEL, [layer], config=builder.add_config(file_type="int4"))
    await fails(
        aw.QuantizationError, store_root, "without its scales", *names_blob(store_root, layer, "w")
    )


async def test_e0_quantized_weight_with_bias_but_no_scale(
    builder: StoreBuilder, store_root: Path
) -> None:
    weight = builder.add_blob("w", {"data": mx.zeros((4, 8), dtype=mx.uint32)}, style="mlx")
    bias = builder.add_blob("w_qbias", {"data": mx.zeros((4, 1), dtype=mx.bfloat16)}, style="mlx")
    builder.write_manifest(MODEL, [weight, bias])
    await fails(
        aw.QuantizationError, store_root, "without its scales", "tensor 'w'", f"model {MODEL!r}"
    )


async def test_quantized_scales_of_the_wrong_shape(builder: StoreBuilder, store_root: Path) -> None:
    layer = builder.add_blob(
        "w",
        {
            "w": mx.zeros((4, 8), dtype=mx.uint32),
            "w.scale": mx.ones((3, 1), dtype=mx.bfloat16),
            "w.bias": mx.ones((3, 1), dtype=mx.bfloat16),
        },
        style="mlx",
    )
    builder.write_manifest(MODEL, [layer])
    await fails(
        aw.QuantizationError,
        store_root,
        "do not match packed weight",
        *names_blob(store_root, layer, "w"),
    )


# ------------------------------------------------------------------------ faults: permissions

_PERMISSION_SCRIPT = textwrap.dedent(
    """
    import json, sys, anyio, asyncweights as aw
    root, names = sys.argv[1], sys.argv[2:]
    async def main():
        out = {}
        for name in names:
            try:
                w = await aw.load_weights(name, store=root)
                out[name] = ["ok", len(w)]
            except aw.AsyncWeightsError as exc:
                out[name] = [type(exc).__name__, exc.errno, str(exc)]
        print(json.dumps(out))
    anyio.run(main)
    """
)


def test_permission_denied_for_real(tmp_path: Path) -> None:
    """Real EACCES from the kernel: tests run as root, so the loader runs in a subprocess
    whose capability bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (via
    util-linux ``setpriv``); root then obeys file modes like any user.
    """
    root = tmp_path / "store"
    b = StoreBuilder(root)
    models = {n: b.add_model(n, random_weights({f"{n}.w": (2, 2)}, seed=n)) for n in NAMES}
    denied_blob = blob_path(root, models["blob"].layers[0].digest)
    denied_blob.chmod(0o000)
    (root / "manifests/registry.ollama.ai/library/manifest/latest").chmod(0o000)
    (root / "manifests/registry.ollama.ai/library/dir").chmod(0o600)  # no x: cannot enter
    proc = subprocess.run(
        [
            "setpriv",
            "--bounding-set",
            "-dac_override,-dac_read_search",
            sys.executable,
            "-c",
            _PERMISSION_SCRIPT,
            str(root),
            *NAMES,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fine"] == ["ok", 1]
    kind, code, message = out["manifest"]
    assert (kind, code) == ("ManifestError", errno.EACCES), out["manifest"]
    assert "model 'manifest'" in message
    assert "manifest/latest" in message
    assert "EACCES" in message
    kind, code, message = out["dir"]
    assert (kind, code) == ("ManifestError", errno.EACCES), out["dir"]
    assert "model 'dir'" in message
    assert "EACCES" in message
    kind, code, message = out["blob"]
    assert (kind, code) == ("LoadError", errno.EACCES), out["blob"]
    for fragment in ("model 'blob'", "tensor 'blob.w'", str(denied_blob), "EACCES"):
        assert fragment in message, (fragment, message)


NAMES = ("blob", "manifest", "dir", "fine")


async def test_permission_denied_on_blob_open(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process variant: os.open raises EACCES for one blob (as a chmod 000 would)."""
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3,)}))
    layer = model.layers[1]
    target = os.fspath(blob_path(store_root, layer.digest))
    real_open = os.open

    def guarded(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)
    exc = await fails(aw.LoadError, store_root, "EACCES", *names_blob(store_root, layer, "b"))
    assert exc.errno == errno.EACCES


# --------------------------------------------------------------- faults: files change mid-load

# prefetch_bytes=0: small blobs are read again at load time, so faults there are reached.
_SMALL = aw.Limits(workers=1, max_open_files=1, group_bytes=1, buffered_groups=0, prefetch_bytes=0)


def _reread(direct: bool) -> aw.Limits:
    """Blobs read again at load time: directly (nothing kept from planning) or by mx.load."""
    return aw.Limits(direct_read_bytes=1 << 20 if direct else 0, prefetch_bytes=0)


async def _fails_planned(
    exc_type: type[aw.AsyncWeightsError],
    root: Path,
    action: Callable[[], None],
    *fragments: str,
    limits: aw.Limits,
    verify: bool = False,
) -> aw.AsyncWeightsError:
    """A load planned whole first (as `WeightCache` plans), `action` run between the plan
    and the load: the load opens each blob again and must prove it is the file planned."""
    model = await aw.ModelStore(root).open(MODEL)
    plan = await _load.make_plan(model, None, limits)
    action()
    with pytest.raises(aw.AsyncWeightsError) as info:
        await _load.load_plan(plan, limits=limits, verify=verify)
    exc = info.value
    assert type(exc) is exc_type, repr(exc)
    for fragment in fragments:
        assert fragment in str(exc), (fragment, str(exc))
    return exc


def _after_first_group_planned(
    monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]
) -> list[int]:
    """Run `action` once in a streamed load, after the first group's headers were checked
    and before its data is read (the other headers are checked later, as it streams)."""
    real = _read.load_group
    calls: list[int] = []

    def load_group(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            action()
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_load, "load_group", load_group)
    return calls


def _second_blob(builder: StoreBuilder, store_root: Path) -> tuple[Layer, Path]:
    """A model of tensors "a" (2,) and "b" (3, 4) in their own blobs: b's layer and file."""
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3, 4)}))
    return model.layers[1], blob_path(store_root, model.layers[1].digest)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-read", "mx-load"])
async def test_blob_deleted_between_planning_and_loading(
    builder: StoreBuilder, store_root: Path, direct: bool
) -> None:
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3,), "c": (4,)}))
    layer = model.layers[1]
    exc = await _fails_planned(
        aw.BlobMissingError,
        store_root,
        blob_path(store_root, layer.digest).unlink,
        *names_blob(store_root, layer),
        limits=_reread(direct),
    )
    assert exc.errno == errno.ENOENT


@pytest.mark.parametrize("direct", [True, False], ids=["direct-read", "mx-load"])
async def test_blob_replaced_by_another_shape_between_planning_and_loading(
    builder: StoreBuilder, store_root: Path, direct: bool
) -> None:
    layer, path = _second_blob(builder, store_root)
    other = StoreBuilder(store_root.parent / "other").add_blob(
        "b", {"b": mx.zeros((2, 4), dtype=mx.float32)}
    )
    replacement = blob_path(store_root.parent / "other", other.digest)
    await _fails_planned(
        aw.BlobError,
        store_root,
        lambda: os.replace(replacement, path),
        "blob changed while loading",
        *names_blob(store_root, layer),
        limits=_reread(direct),
    )


@pytest.mark.parametrize("direct", [True, False], ids=["direct-read", "mx-load"])
async def test_blob_rewritten_same_shape_is_caught_by_verify(
    builder: StoreBuilder, store_root: Path, direct: bool
) -> None:
    layer, path = _second_blob(builder, store_root)

    def flip() -> None:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    fragments = ("blob bytes hash to sha256:", *names_blob(store_root, layer))
    await _fails_planned(
        aw.DigestMismatchError, store_root, flip, *fragments, limits=_reread(direct), verify=True
    )


# A streamed load (load_weights, stream_weights) reads each blob through the descriptor its
# header was checked through: a file deleted or replaced at its path afterwards changes
# nothing, and what loads is exactly what was validated.
_HELD = aw.Limits(workers=1, group_bytes=1, prefetch_bytes=0)  # every blob held open


@pytest.mark.parametrize("limits", [_HELD, aw.Limits()], ids=["held-open", "read-whole"])
async def test_streamed_load_keeps_the_files_it_checked(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch, limits: aw.Limits
) -> None:
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3, 4), "c": (5,)}))
    paths = [blob_path(store_root, layer.digest) for layer in model.layers[:3]]
    other = StoreBuilder(store_root.parent / "other").add_blob(
        "a", {"a": mx.zeros((7,), dtype=mx.float32)}
    )
    replacement = blob_path(store_root.parent / "other", other.digest)

    def swap_first() -> None:
        os.replace(replacement, paths[0])  # the first group's blob, already checked

    calls = _after_first_group_planned(monkeypatch, swap_first)
    weights = await aw.load_weights(MODEL, store=store_root, verify=True, limits=limits)
    assert calls
    assert_bit_exact(weights, model.expected)


async def test_streamed_load_blob_deleted_before_its_header_is_read(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob of a later group, gone before the planner reaches it: the load fails with the
    planner's typed error, mid-load, and nothing is returned."""
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3,), "c": (4,)}))
    layer = model.layers[2]
    _after_first_group_planned(monkeypatch, blob_path(store_root, layer.digest).unlink)
    exc = await fails(
        aw.BlobMissingError, store_root, *names_blob(store_root, layer, "c"), limits=_HELD
    )
    assert exc.errno == errno.ENOENT


def _flip_last_byte(path: Path) -> None:
    """Change a file in place: its last byte, inverted."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


async def test_streamed_load_blob_rewritten_in_place_is_caught_by_verify(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same file changed in place after its header was checked: the descriptor sees the
    change, and ``verify=True`` hashes exactly the bytes read through it."""
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3, 4)}))
    layer = model.layers[0]
    path = blob_path(store_root, layer.digest)

    _after_first_group_planned(monkeypatch, lambda: _flip_last_byte(path))
    fragments = ("blob bytes hash to sha256:", *names_blob(store_root, layer))
    await fails(aw.DigestMismatchError, store_root, *fragments, verify=True, limits=_HELD)


async def test_small_blob_changed_after_planning_loads_the_bytes_validated(
    builder: StoreBuilder, store_root: Path
) -> None:
    # Planning reads small blobs whole and keeps them: what loads is what was validated,
    # whatever happens to the file afterwards (a plan made whole first, as the cache does).
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3, 4)}))
    paths = [blob_path(store_root, layer.digest) for layer in model.layers[:2]]
    opened = await aw.ModelStore(store_root).open(MODEL)
    plan = await _load.make_plan(opened, None, aw.Limits())
    for p in paths:
        p.unlink()
    weights = await _load.load_plan(plan, verify=True)
    assert_bit_exact(weights, model.expected)


# ------------------------------------------------------------------------ faults: I/O errors


def _eio_on(monkeypatch: pytest.MonkeyPatch, name: str, target: str, after: int = 0) -> None:
    """Make ``os.<name>`` fail with EIO on fds open on `target`, after `after` good calls."""
    real = getattr(os, name)
    calls = 0

    def failing(fd: int, *args: Any) -> Any:
        nonlocal calls
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path == target:
            calls += 1
            if calls > after:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, *args)

    monkeypatch.setattr(os, name, failing)


async def test_io_error_reading_a_header(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3,)}))
    layer = model.layers[0]
    target = str(blob_path(store_root, layer.digest))
    _eio_on(monkeypatch, "pread", target)  # a header read alone
    _eio_on(monkeypatch, "preadv", target)  # a small blob read whole with its header
    exc = await fails(aw.LoadError, store_root, "EIO", *names_blob(store_root, layer))
    assert exc.errno == errno.EIO


async def test_io_error_in_the_middle_of_reading_tensor_data(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3,), "c": (4,)}))
    layer = model.layers[2]
    _eio_on(monkeypatch, "preadv", str(blob_path(store_root, layer.digest)))
    _eio_on(monkeypatch, "pread", str(blob_path(store_root, layer.digest)), after=1)
    exc = await fails(
        aw.LoadError, store_root, "EIO", *names_blob(store_root, layer), limits=_SMALL
    )
    assert exc.errno == errno.EIO


async def test_mlx_read_failure_is_a_load_error(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLX reports I/O failures of lazily loaded blobs as RuntimeError from eval."""
    model = builder.add_model(MODEL, random_weights({"a": (64, 64), "b": (3,)}))
    layer = model.layers[0]
    real_eval = mx.eval

    def failing_eval(*args: Any) -> None:
        raise RuntimeError("[read] Unable to read 8192 bytes from file.")

    monkeypatch.setattr(mx, "eval", failing_eval)
    limits = aw.Limits(direct_read_bytes=0, workers=1, max_open_files=1, group_bytes=1)
    exc = await fails(
        aw.LoadError, store_root, "Unable to read", *names_blob(store_root, layer), limits=limits
    )
    assert isinstance(exc.__cause__, RuntimeError)
    monkeypatch.setattr(mx, "eval", real_eval)


async def test_allocation_failure_is_a_resource_error(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder.add_model(MODEL, random_weights({"a": (64, 64)}))

    def failing_eval(*args: Any) -> None:
        raise RuntimeError("[malloc] Unable to allocate 1099511627776 bytes.")

    monkeypatch.setattr(mx, "eval", failing_eval)
    exc = await fails(
        aw.BudgetError,
        store_root,
        "Unable to allocate",
        f"model {MODEL!r}",
        limits=aw.Limits(direct_read_bytes=0),
    )
    # While the caller still holds the error, it must not hold the blob files: the cause's
    # traceback (fill_arrays' frames, the virtual files in them) is cleared with the error's.
    # Before that, the files stayed open until the error was collected, and the autouse
    # check failed whenever a reader thread let go of it after the check's gc.collect().
    gc.collect()
    assert exc.__cause__ is not None
    assert blob_fds(store_root) == []


async def test_a_failure_while_reader_threads_start_leaves_later_loads_working(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each reader thread evaluates one array when the pool is made (its MLX stream). An
    # allocation failure there broke the process's pool for good: this load, and every later
    # one in the process, failed with "unexpected BrokenThreadPool".
    built = builder.add_model(MODEL, random_weights({"a": (64, 64)}))
    monkeypatch.setattr(_read, "_READERS", {})  # the pool is made under the failing eval
    real_eval = mx.eval

    def failing_eval(*args: Any) -> None:
        raise RuntimeError("[malloc] Unable to allocate 1099511627776 bytes.")

    try:
        monkeypatch.setattr(mx, "eval", failing_eval)
        await fails(aw.BudgetError, store_root, "Unable to allocate", f"model {MODEL!r}")
        monkeypatch.setattr(mx, "eval", real_eval)
        assert_bit_exact(await aw.load_weights(MODEL, store=store_root), built.expected)
    finally:
        for pool in _read._READERS.values():
            pool.shutdown(wait=True)


# ----------------------------------------------------------------- faults: budget, many files


async def test_load_over_budget_is_refused_before_it_starts(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = random_weights({"a": (16, 16), "b": (8,)})
    builder.add_model(MODEL, w)
    total = sum(a.nbytes for a in w.values())
    started: list[object] = []
    monkeypatch.setattr(_load, "load_group", lambda *args: started.append(args))
    await fails(
        aw.BudgetError,
        store_root,
        f"load needs {total} bytes, over the budget of {total - 1}",
        f"model {MODEL!r}",
        limits=aw.Limits(max_bytes=total - 1),
    )
    assert started == []


_EMFILE_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, resource, sys, time
    import anyio, mlx.core as mx
    import asyncweights as aw
    from asyncweights._writer import encode_safetensors, RawTensor, write_manifest
    from asyncweights._manifest import build_manifest
    from asyncweights._manifest import Layer, CONFIG_MEDIA_TYPE, TENSOR_MEDIA_TYPE
    from asyncweights._writer import build_config
    root, count = sys.argv[1], int(sys.argv[2])
    os.makedirs(f"{root}/blobs", exist_ok=True)

    def put(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(f"{root}/blobs/" + digest.replace(":", "-"), "wb") as f:
            f.write(data)
        return digest

    layers = []
    for i in range(count):
        name = f"layers.{i}.w"
        data = encode_safetensors(
            [RawTensor(name, "I32", (1,), i.to_bytes(4, "little"))], style="go")
        layers.append(Layer(TENSOR_MEDIA_TYPE, put(data), len(data), name))
    config = build_config()
    manifest = build_manifest(Layer(CONFIG_MEDIA_TYPE, put(config), len(config)), layers)
    write_manifest(root, "many", manifest)

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

    def store_fds():
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return [t for t in out if t.startswith(os.path.realpath(root))]

    async def main():
        out = {}
        for direct in (1 << 20, 0):
            t = time.monotonic()
            limits = aw.Limits(direct_read_bytes=direct)
            w = await aw.load_weights("many", store=root, limits=limits)
            ok = all(w[f"layers.{i}.w"].item() == i for i in range(count))
            out[str(direct)] = [len(w), ok, round(time.monotonic() - t, 2)]
        out["fds"] = store_fds()
        print(json.dumps(out))

    anyio.run(main)
    """
)


def test_5000_blob_model_loads_under_a_64_file_limit(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _EMFILE_SCRIPT, str(tmp_path / "many"), "5000"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["1048576"][:2] == [5000, True], out
    assert out["0"][:2] == [5000, True], out
    assert out["fds"] == [], out


# ------------------------------------------------------------------- faults: progress callback


@pytest.mark.parametrize("at", [1, 3])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_progress_callback_that_raises(
    builder: StoreBuilder, store_root: Path, at: int, kind: str
) -> None:
    model = builder.add_model(MODEL, random_weights({f"t{i}": (8,) for i in range(8)}))
    seen: list[aw.Progress] = []

    def sync_cb(event: aw.Progress) -> None:
        seen.append(event)
        if len(seen) == at:
            raise ValueError("callback broke")

    async def async_cb(event: aw.Progress) -> None:
        sync_cb(event)

    limits = aw.Limits(workers=1, max_open_files=1, group_bytes=1, progress_interval=0)
    exc = await fails(
        aw.LoadError,
        store_root,
        "progress callback raised ValueError: callback broke",
        f"model {MODEL!r}",
        on_progress=sync_cb if kind == "sync" else async_cb,
        limits=limits,
    )
    assert isinstance(exc.__cause__, ValueError)
    assert len(seen) == at  # the load stopped: no event after the one that raised
    assert all(e.phase != "done" for e in seen)
    del model


async def test_progress_callback_that_blocks_does_not_stall_the_loop(
    builder: StoreBuilder, store_root: Path
) -> None:
    model = builder.add_model(MODEL, random_weights({f"t{i}": (8,) for i in range(6)}))
    phases: list[str] = []

    def slow(event: aw.Progress) -> None:
        phases.append(event.phase)
        time.sleep(1.0)

    lag = 0.0
    done = False

    async def ticker() -> None:
        nonlocal lag
        while not done:
            t = time.monotonic()
            await anyio.sleep(0.01)
            lag = max(lag, time.monotonic() - t - 0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        weights = await aw.load_weights(MODEL, store=store_root, on_progress=slow)
        done = True
    assert lag < 0.2, lag
    assert phases[0] == "planning"
    assert phases[-1] == "done"
    assert_bit_exact(weights, model.expected)


async def test_progress_callback_that_blocks_then_raises(
    builder: StoreBuilder, store_root: Path
) -> None:
    builder.add_model(MODEL, random_weights({f"t{i}": (8,) for i in range(4)}))

    def slow_then_fail(event: aw.Progress) -> None:
        time.sleep(1.0)
        raise OSError("disk full while logging")

    exc = await fails(
        aw.LoadError, store_root, "progress callback raised OSError", on_progress=slow_then_fail
    )
    assert isinstance(exc.__cause__, OSError)


# ------------------------------------------------------------------------- concurrent loads


async def test_50_concurrent_loads_of_same_and_different_models(
    builder: StoreBuilder, store_root: Path
) -> None:
    shapes = {
        "model.embed.weight": (32, 64),
        "model.layers.0.mlp.up_proj.weight": (64, 64),
        "model.norm.weight": (64,),
    }
    built = [
        builder.add_model("m0", random_weights(shapes, seed=0), era="E0"),
        builder.add_model("m1", random_weights(shapes, seed=1), era="E1", quantize="int4"),
        builder.add_model("m2", random_weights(shapes, seed=2), era="E3", quantize="mxfp8"),
        builder.add_model(
            "m3",
            random_weights(shapes, seed=3),
            era="E3",
            pack={"model.layers.0": ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]},
        ),
        builder.add_model(
            "m4", random_weights({"transformer/" + k: v for k, v in shapes.items()}, seed=4)
        ),
    ]
    results: dict[int, aw.Weights] = {}
    limits = aw.Limits(group_bytes=4096, workers=2)

    async def one(i: int) -> None:
        results[i] = await aw.load_weights(built[i % 5].name, store=store_root, limits=limits)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)
    assert len(results) == 50
    for i, weights in results.items():
        assert_bit_exact(weights, built[i % 5].expected)


async def test_streamed_load_blob_written_in_place_without_verify_is_reported(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``verify`` the bytes are not hashed, but a write in place moves the file's
    modification time, which is checked again once the group's data is read."""
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3, 4)}))
    layer = model.layers[0]
    path = blob_path(store_root, layer.digest)
    os.utime(path, ns=(0, 0))  # the write below moves it, whatever the clock's granularity

    _after_first_group_planned(monkeypatch, lambda: _flip_last_byte(path))
    fragments = ("blob changed while loading", *names_blob(store_root, layer))
    await fails(aw.BlobError, store_root, *fragments, limits=_HELD)


async def test_a_blob_touched_but_not_changed_loads_with_verify(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``verify`` the digest decides: a file whose time moved but whose bytes did not
    loads, bit-exact."""
    model = builder.add_model(MODEL, random_weights({"a": (2,), "b": (3, 4)}))
    path = blob_path(store_root, model.layers[0].digest)
    os.utime(path, ns=(0, 0))
    _after_first_group_planned(monkeypatch, lambda: os.utime(path))
    weights = await aw.load_weights(MODEL, store=store_root, verify=True, limits=_HELD)
    assert_bit_exact(weights, model.expected)


async def test_config_layer_with_an_object_over_max_keys(
    builder: StoreBuilder, store_root: Path
) -> None:
    from asyncweights._json import MAX_KEYS

    tensor = builder.add_blob("w", {"w": mx.zeros((2,))})
    pairs = ",".join(f'"t{i}":{i}' for i in range(MAX_KEYS + 1))
    data = ('{"model":{"vocab":{' + pairs + "}}}").encode()
    layer = builder.add_json("tokenizer.json", data)
    builder.write_manifest(MODEL, [tensor, layer])
    model = await aw.ModelStore(store_root).open(MODEL)
    with pytest.raises(aw.ManifestError) as info:
        await model.read_config("tokenizer.json")
    at = data.rindex(b"}}}")
    assert info.value.reason == (
        f"config 'tokenizer.json' has a JSON object with more than {MAX_KEYS} keys, the most "
        f"one may have (at {at})"
    )
    assert (info.value.model, info.value.digest) == (MODEL, layer.digest)
