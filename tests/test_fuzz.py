"""Property tests of the parsers: untrusted bytes give a result or one of our typed errors.

``fuzz/fuzz_header.py`` is the coverage-guided counterpart, run by hand.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncweights import HeaderError, InvalidNameError, ManifestError, ModelName, ModelStore
from asyncweights._header import DTYPE_SIZES, parse_header
from asyncweights._manifest import decode_manifest, encode_manifest
from asyncweights._writer import RawTensor, encode_header

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def _entry_like() -> st.SearchStrategy[Any]:
    """Values near a tensor entry, so the field rules are reached, not just the JSON ones."""
    dims = st.integers(min_value=-2, max_value=2**33) | st.floats() | st.booleans() | st.none()
    return st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from([*DTYPE_SIZES, "F64", "Q4", ""]) | json_values,
            "shape": st.lists(dims, max_size=4) | json_values,
            "data_offsets": st.lists(st.integers(min_value=-2, max_value=2**65), max_size=3)
            | json_values,
        },
    )


def _frame(text: bytes, data_len: int) -> tuple[bytes, int]:
    raw = len(text).to_bytes(8, "little") + text
    return raw, len(raw) + data_len


@FAST
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=2**64))
def test_arbitrary_bytes_into_parse_header(data: bytes, file_size: int) -> None:
    try:
        header = parse_header(data, file_size)
    except HeaderError:
        return
    assert header.file_size == file_size


@FAST
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=64))
def test_arbitrary_text_behind_a_valid_length(text: bytes, data_len: int) -> None:
    raw, size = _frame(text, data_len)
    with contextlib.suppress(HeaderError):
        parse_header(raw, size)


@FAST
@given(
    st.dictionaries(st.text(max_size=8), _entry_like() | json_values, max_size=5),
    st.integers(min_value=0, max_value=64),
)
def test_structured_headers_are_valid_or_typed_errors(doc: dict[str, Any], data_len: int) -> None:
    raw, size = _frame(json.dumps(doc).encode(), data_len)
    try:
        header = parse_header(raw, size)
    except HeaderError:
        return
    # Accepted: the rules really hold.
    data = size - header.data_start
    spans = sorted((e.begin, e.end) for e in header.entries.values())
    end = 0
    for begin, stop in spans:
        assert begin == end
        end = stop
    assert end == data
    for e in header.entries.values():
        assert all(type(d) is int and 0 <= d < 2**31 for d in e.shape)
        assert math.prod(e.shape) * DTYPE_SIZES[e.dtype] == e.nbytes


tensor_specs = st.lists(
    st.tuples(
        st.text(min_size=0, max_size=12).filter(lambda s: s != "__metadata__"),
        st.sampled_from(sorted(DTYPE_SIZES)),
        st.lists(st.integers(min_value=0, max_value=5), max_size=3),
    ),
    max_size=6,
    unique_by=lambda t: t[0],
)


@FAST
@given(
    tensor_specs,
    st.sampled_from(["go", "mlx"]),
    st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    st.randoms(use_true_random=False),
)
def test_valid_generated_headers_round_trip(
    specs: list[tuple[str, str, list[int]]], style: Any, metadata: dict[str, str] | None, rnd: Any
) -> None:
    rnd.shuffle(specs)  # data order need not be key order
    tensors = [
        RawTensor(name, dtype, tuple(shape), bytes(DTYPE_SIZES[dtype] * math.prod(shape)))
        for name, dtype, shape in specs
    ]
    head = encode_header(tensors, style=style, metadata=metadata)
    size = len(head) + sum(t.nbytes for t in tensors)
    header = parse_header(head, size)
    assert header.data_start == len(head)
    assert header.metadata == (metadata or {})
    assert set(header.entries) == {t.name for t in tensors}
    offset = 0
    for t in tensors:
        e = header.entries[t.name]
        assert (e.dtype, e.shape, e.begin, e.end) == (t.dtype, t.shape, offset, offset + t.nbytes)
        offset += t.nbytes


@FAST
@given(st.binary(max_size=512))
def test_arbitrary_bytes_into_decode_manifest(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        decode_manifest(data, model="m")


_LAYER = {
    "mediaType": "application/vnd.ollama.image.tensor",
    "digest": "sha256:" + "ab" * 32,
    "size": 10,
    "name": "w",
}
_VALID = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {**_LAYER, "mediaType": "application/vnd.docker.container.image.v1+json"},
    "layers": [_LAYER],
}


@FAST
@given(
    st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "x"]),
    json_values | st.just([_LAYER, {**_LAYER, "digest": "sha256:" + "AB" * 32}]),
    st.sampled_from(["mediaType", "digest", "size", "name", "x"]),
    json_values,
)
def test_mutated_manifests_decode_or_raise_manifest_error(
    top: str, value: Any, field: str, layer_value: Any
) -> None:
    doc = json.loads(json.dumps(_VALID))
    doc[top] = value
    if isinstance(doc.get("layers"), list) and doc["layers"] and isinstance(doc["layers"][0], dict):
        doc["layers"][0][field] = layer_value
    try:
        manifest = decode_manifest(json.dumps(doc).encode(), model="m")
    except ManifestError:
        return
    for layer in [manifest.config, *manifest.layers]:
        assert layer.digest == layer.digest.lower()
        assert len(layer.digest) == 71
        assert layer.size >= 0
    assert decode_manifest(encode_manifest(manifest)) == manifest


@FAST
@given(st.text(max_size=40) | st.from_regex(r"[a-z./:\\-]{0,30}", fullmatch=True))
def test_no_model_name_builds_a_path_outside_the_store(name: str) -> None:
    store = ModelStore("/srv/store")
    try:
        path = store.manifest_path(name)
    except InvalidNameError:
        return
    resolved = Path(*(p for p in path.parts if p)).resolve(strict=False)
    assert resolved.is_relative_to(Path("/srv/store/manifests").resolve(strict=False))
    assert len(path.relative_to(store.manifests_dir).parts) == 4
    assert not any(p in ("", ".", "..") for p in ModelName.parse(name).parts)
