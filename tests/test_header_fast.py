"""The header fast path (`_header._parse_common`) against the full parser.

The fast path may only accept: for every header it takes, the result must be exactly the
full parser's (entries, their order, metadata), and every header it declines must reach the
full parser, whose errors are the only ones. Each case is parsed twice, once with the fast
path and once with it switched off, and the two outcomes compared.
"""

from __future__ import annotations

import gc
import json
import struct
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncweights import HeaderError, UnsupportedDTypeError
from asyncweights import _header as header_module
from asyncweights._header import DTYPE_SIZES, BlobHeader, parse_header
from asyncweights._writer import RawTensor, encode_safetensors

Outcome = tuple[str, Any]


def _outcome(raw: bytes, file_size: int) -> Outcome:
    try:
        header = parse_header(raw, file_size)
    except HeaderError as exc:
        return type(exc).__name__, (str(exc), exc.tensor)
    return "ok", (header, list(header.entries), list(header.metadata))


def _both(raw: bytes, file_size: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Outcome, Outcome]:
    fast = _outcome(raw, file_size)
    with monkeypatch.context() as m:
        m.setattr(header_module, "_parse_common", lambda text, data_len: None)
        full = _outcome(raw, file_size)
    return fast, full


def _frame(text: str | bytes, data_len: int) -> tuple[bytes, int]:
    body = text.encode() if isinstance(text, str) else text
    raw = struct.pack("<Q", len(body)) + body
    return raw, len(raw) + data_len


def _took_fast(raw: bytes, file_size: int) -> bool:
    n = struct.unpack("<Q", raw[:8])[0]
    return header_module._parse_common(raw[8 : 8 + n], file_size - 8 - n) is not None


E = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
E2 = '{"dtype":"F32","shape":[2],"data_offsets":[8,16]}'

#: (header text, data bytes, whether the fast path must take it)
CASES: list[tuple[str | bytes, int, bool]] = [
    # the common shapes, valid
    ('{"w":' + E + "}", 8, True),
    ('{"w":' + E + "}      ", 8, True),
    ('{"w":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}}', 8, True),
    ('{"w":{"shape":[2],"data_offsets":[0,8],"dtype":"F32"}}', 8, True),
    ('{"__metadata__":{"format":"pt"},"w":' + E + "}", 8, True),
    ('{"__metadata__":{},"w":' + E + "}", 8, True),
    ('{"__metadata__":null,"w":' + E + "}", 8, True),
    ('{"__metadata__" : null , "w":' + E + "}", 8, True),
    ('{"__metadata__":nul,"w":' + E + "}", 8, False),
    ('{"__metadata__":null,"__metadata__":null,"w":' + E + "}", 8, False),
    ('{"__metadata__":null}', 0, False),
    ('{"__metadata__":{"a":"1","b":"2","c":""},"b":' + E2 + ',"a":' + E + "}", 16, True),
    ('{"a":' + E + ',"b":' + E2 + "}", 16, True),
    ('{"b":' + E2 + ',"a":' + E + "}", 16, True),
    ('{"s":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}}', 2, True),
    ('{"z":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]}}', 0, True),
    ('{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"w":' + E + "}", 8, True),
    ('{"big":{"dtype":"U8","shape":[2147483647],"data_offsets":[0,2147483647]}}', 2**31 - 1, True),
    ('{"ünï cödé ✓":' + E + "}", 8, True),
    (
        ' \t\n{ "w" : { "dtype" : "F32" , "shape" : [ 2 ] , "data_offsets" : [ 0 , 8 ] } }\r\n',
        8,
        True,
    ),
    ('{"w":{"dtype":"F32","shape":[ ],"data_offsets":[0,4]}}', 4, True),
    ('{"":' + E + "}", 8, True),
    ('{"dtype_x":' + E + "}", 8, True),
    # valid, but a shape the fast path declines
    ('{"w\\u0031":' + E + "}", 8, False),
    ('{"w":' + E + ',"__metadata__":{"a":"b"}}', 8, False),
    ('{"__metadata__":{"a\\"q":"b"},"w":' + E + "}", 8, False),
    ('{"__metadata__":{"a":"b"}}', 0, False),
    ("{}", 0, True),
    ('{"dtype":' + E + "}", 8, False),
    # every rule broken, each once
    ('{"w":' + E + ',"w":' + E2 + "}", 16, False),
    ('{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ('{"__metadata__":{"a":"1","a":"2"},"w":' + E + "}", 8, False),
    ('{"__metadata__":{},"__metadata__":{},"w":' + E + "}", 8, False),
    ('{"__metadata__":{"a":1},"w":' + E + "}", 8, False),
    ('{"__metadata__":' + E + ',"w":' + E + "}", 8, False),
    ('{"__metadata__":[],"w":' + E + "}", 8, False),
    ('{"__metadata__":{},}', 0, False),
    ('{"w":' + E + ",}", 8, False),
    ('{"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}', 8, False),
    ('{"w":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ('{"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4, False),
    ('{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2147483648],"data_offsets":[0,8589934592]}}', 2**33, False),
    ('{"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}}', 9, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[-1,7]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}', 12, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,1e1]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[00,8]}}', 8, False),
    (
        '{"w":{"dtype":"U8","shape":[1],"data_offsets":'
        "[99999999999999999999999,100000000000000000000000]}}",
        1,
        False,
    ),
    ('{"w":{"dtype":"F32","shape":[2]}}', 8, False),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}}', 8, False),
    ('{"w":[1,2]}', 8, False),
    ('{"w":' + E + "}", 9, False),  # a trailing byte
    ('{"w":' + E + "}", 4, False),  # past the data section
    ('{"a":' + E + ',"b":' + E + "}", 8, False),  # overlap
    ('{"a":' + E + ',"b":{"dtype":"F32","shape":[2],"data_offsets":[9,17]}}', 17, False),  # gap
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12, False),  # gap at the start
    ("[]", 0, False),
    ('"text"', 0, False),
    ('{"w":' + E + "}\x00\x00", 8, False),
    ('{"w":' + E + "} x", 8, False),
    ('{"w\x01":' + E + "}", 8, False),
    (b'{"w\xff":' + E.encode() + b"}", 8, False),
    (b'{"\xed\xa0\x80":' + E.encode() + b"}", 8, False),  # a UTF-8-encoded surrogate
    ('{"w":' + E, 8, False),
    ('{"w":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}}', 8, False),
    ("[" * 2000 + "]" * 2000, 0, False),
]


@pytest.mark.parametrize(("text", "data_len", "fast"), CASES)
def test_fast_path_and_full_parser_agree(
    text: str | bytes, data_len: int, fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, size = _frame(text, data_len)
    got, want = _both(raw, size, monkeypatch)
    assert got == want
    assert _took_fast(raw, size) is fast
    if fast:
        assert got[0] == "ok"


def test_rejections_keep_their_types_and_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few of the declined cases, spelled out: the full parser's exact wording."""
    raw, size = _frame('{"w":' + E + ',"w":' + E2 + "}", 16)
    with pytest.raises(HeaderError, match=r"^duplicate key 'w' in header") as info:
        parse_header(raw, size)
    assert info.value.tensor == "w"
    raw, size = _frame('{"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}', 8)
    with pytest.raises(UnsupportedDTypeError, match=r"^unsupported dtype 'F64'; supported: BF16"):
        parse_header(raw, size)
    raw, size = _frame('{"a":' + E + ',"b":' + E + "}", 8)
    with pytest.raises(HeaderError, match=r"^data_offsets \[0, 8\] overlaps another tensor"):
        parse_header(raw, size)
    raw, size = _frame('{"__metadata__":{"a":1},"w":' + E + "}", 8)
    with pytest.raises(HeaderError, match=r"^__metadata__ must be an object of strings"):
        parse_header(raw, size)


def _styles() -> Iterator[tuple[str, bytes]]:
    tensors = [
        RawTensor("b.weight", "BF16", (3, 2), bytes(12)),
        RawTensor("a.scale", "F32", (3, 1), bytes(12)),
        RawTensor("c", "U32", (), bytes(4)),
    ]
    for style in ("go", "mlx"):
        yield style, encode_safetensors(tensors, style=style)
        yield (
            style + "+metadata",
            encode_safetensors(
                tensors, style=style, metadata={"format": "mlx", "quant_type": "int4"}
            ),
        )


def test_writers_outputs_take_the_fast_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Ollama's Go writer, ``mx.save_safetensors`` and our writer produce is the common
    shape: parsed by the fast path, exactly as the full parser parses it."""
    files: list[tuple[str, bytes]] = list(_styles())
    path = tmp_path / "m.safetensors"
    mx.save_safetensors(
        str(path),
        {"w": mx.zeros((2, 3)), "a": mx.ones((4,), dtype=mx.bfloat16)},
        metadata={"format": "mlx", "note": "x"},
    )
    files.append(("mx.save_safetensors", path.read_bytes()))
    for what, data in files:
        n = struct.unpack("<Q", data[:8])[0]
        raw = data[: 8 + n]
        got, want = _both(raw, len(data), monkeypatch)
        assert got == want, what
        assert got[0] == "ok", what
        assert _took_fast(raw, len(data)), what
        header = parse_header(raw, len(data))
        assert isinstance(header, BlobHeader)
        assert header.data_start == 8 + n


_keys = st.text(max_size=6) | st.sampled_from(["w", "__metadata__", "dtype", "a\\", 'q"'])
_ints = st.integers(min_value=-3, max_value=40) | st.sampled_from([2**31 - 1, 2**31, 2**64])
_fields = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPE_SIZES, "F64", "f32", ""]) | st.integers(),
        "shape": st.lists(_ints | st.booleans() | st.floats(width=16), max_size=3),
        "data_offsets": st.lists(_ints, min_size=0, max_size=3),
        "extra": st.none(),
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(_keys, _fields), max_size=4),
    st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4) | st.integers()),
    st.integers(min_value=0, max_value=64),
    st.sampled_from(["", " ", "\n", "  \t"]),
    st.booleans(),
)
def test_random_headers_agree(
    items: list[tuple[str, dict[str, Any]]],
    metadata: dict[str, Any] | None,
    data_len: int,
    pad: str,
    spaced: bool,
) -> None:
    """Near-valid headers (duplicates kept: built as text) parse the same both ways."""
    separators = (", ", ": ") if spaced else (",", ":")
    parts = []
    if metadata is not None:
        parts.append('"__metadata__":' + json.dumps(metadata, separators=separators))
    for key, fields in items:
        parts.append(json.dumps(key) + ":" + json.dumps(fields, separators=separators))
    text = "{" + ",".join(parts) + "}" + pad
    raw, size = _frame(text, data_len)
    with pytest.MonkeyPatch.context() as monkeypatch:
        got, want = _both(raw, size, monkeypatch)
    assert got == want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=5), st.sampled_from(sorted(DTYPE_SIZES))),
        min_size=1,
        max_size=5,
        unique_by=lambda item: item[0],
    ),
    st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=3),
    st.booleans(),
)
def test_random_valid_headers_take_the_fast_path(
    names: list[tuple[str, str]], shape: list[int], shuffle: bool
) -> None:
    """Valid headers of the common shape: the fast path takes every one, and agrees."""
    entries = {}
    offset = 0
    for key, dtype in names:
        count = DTYPE_SIZES[dtype]
        for d in shape:
            count *= d
        entries[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + count]}
        offset += count
    order = list(entries.items())
    if shuffle:
        order.reverse()
    text = json.dumps(dict(order), separators=(",", ":"), ensure_ascii=False)
    if "\\" in text or "__metadata__" in entries or any(k in entries for k in ("dtype", "shape")):
        return  # escapes and reserved names are the full parser's, tested above
    if any(k == "data_offsets" for k in entries):
        return
    raw, size = _frame(text, offset)
    assert _took_fast(raw, size)
    with pytest.MonkeyPatch.context() as monkeypatch:
        got, want = _both(raw, size, monkeypatch)
    assert got == want
    assert got[0] == "ok"


def test_parsed_headers_are_not_tracked_by_the_cyclic_gc(monkeypatch: pytest.MonkeyPatch) -> None:
    # A header and its entries hold only strings, numbers and tuples: no cycle can pass
    # through them, so they stay out of the collector's generations (a 5,120-blob model
    # leaves ~20k fewer tracked objects), whichever parser made them.
    raw, size = _frame('{"__metadata__":{"a":"b"},"w":' + E + ',"v":' + E2 + "}", 16)
    fast, full = _both(raw, size, monkeypatch)
    for outcome in (fast, full):
        header = outcome[1][0]
        assert isinstance(header, BlobHeader)
        assert not gc.is_tracked(header)
        assert not gc.is_tracked(header.entries)
        assert [gc.is_tracked(e) for e in header.entries.values()] == [False, False]
        assert header.entries["v"].shape == (2,)
        assert header.entries["v"].nbytes == 8
