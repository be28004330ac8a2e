"""`_json`: the stepwise parser agrees with the standard library and keeps its bounds."""

from __future__ import annotations

import gc
import json
import random
import sys
from typing import Any

import pytest

from asyncweights import _json
from asyncweights._json import (
    FAST_BYTES,
    MAX_DEPTH,
    MAX_KEYS,
    MAX_TOKEN,
    SWITCH_INTERVAL,
    JSONError,
    decode_text,
    loads,
    loads_stepwise,
)


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(9 if depth < 5 else 6)
    if kind == 0:
        return rng.randrange(-(10**12), 10**12)
    if kind == 1:
        return rng.uniform(-1e6, 1e6)
    if kind == 2:
        alphabet = 'ab"\\/\n\t\u00e9\u20ac\U0001f600\x01 '
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.choice([True, False, None])
    if kind in (4, 5):
        return rng.randrange(100)
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {f"k{rng.randrange(50)}\u00e9": _random_value(rng, depth + 1) for _ in range(5)}


@pytest.mark.parametrize("seed", range(40))
def test_stepwise_agrees_with_the_standard_library(seed: int) -> None:
    rng = random.Random(seed)
    value = _random_value(rng, 0)
    for text in (
        json.dumps(value),
        json.dumps(value, indent=rng.randrange(4)),
        json.dumps(value, ensure_ascii=False, separators=(",", ":")),
    ):
        assert loads_stepwise(text) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "{",
        "[1,]",
        '{"a":1,}',
        "NaN",
        "[Infinity]",
        "01",
        "1.",
        "-",
        ".5",
        "1e",
        '"\x01"',
        '"abc',
        '{"a" 1}',
        "{1:2}",
        "[1 2]",
        "tru",
        "nul",
        "{} {}",
        '"\\x"',
        '"\\ud800"x',
    ],
)
def test_stepwise_rejects_what_is_not_json(text: str) -> None:
    with pytest.raises(JSONError) as info:
        loads_stepwise(text)
    assert info.value.reason.startswith("not valid JSON")


def test_bounds_have_their_own_messages() -> None:
    with pytest.raises(JSONError) as deep:
        loads_stepwise("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert deep.value.reason == f"JSON nested too deeply (over {MAX_DEPTH} levels)"
    assert loads_stepwise("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(JSONError) as long_string:
        loads_stepwise('["' + "x" * (MAX_TOKEN + 1) + '"]')
    assert long_string.value.reason == f"string at 1 longer than {MAX_TOKEN} characters"
    escaped_quotes = '["' + '\\"' * (MAX_TOKEN // 2 + 1) + '"]'
    with pytest.raises(JSONError, match="longer than"):
        loads_stepwise(escaped_quotes)
    assert loads_stepwise('["' + "x" * MAX_TOKEN + '"]') == ["x" * MAX_TOKEN]
    with pytest.raises(JSONError) as number:
        loads_stepwise("[" + "1" * 401 + "]")
    assert number.value.reason == "number at 1 longer than 400 characters"
    spaces = " " * (3 * MAX_TOKEN)
    assert loads_stepwise(spaces + "[1]" + spaces) == [1]


def test_duplicate_keys_are_reported_when_asked() -> None:
    assert loads_stepwise('{"a":1,"a":2}') == {"a": 2}
    with pytest.raises(JSONError) as info:
        loads_stepwise('{"a":{"b":1,"b":2}}', unique_keys=True)
    assert (info.value.reason, info.value.key) == ("duplicate key 'b'", "b")
    with pytest.raises(JSONError, match="duplicate key 'a'"):
        loads_stepwise('{"\\u0061":1,"a":2}', unique_keys=True)


@pytest.mark.parametrize("where", [0, 5, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 << 20])
def test_utf8_errors_give_the_byte_offset_across_steps(where: int) -> None:
    data = bytearray(b"a" * ((3 << 20) + 10))
    data[where] = 0xFF
    expected = None
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        expected = exc.start
    with pytest.raises(JSONError) as info:
        decode_text(data)
    assert info.value.reason == f"not UTF-8 (byte {expected})"
    # A multi-byte character cut by a step boundary is fine, and a truncated one is not.
    euro = "€".encode()
    text = b"x" * ((1 << 20) - 1) + euro + b"y"
    assert decode_text(text) == text.decode()
    with pytest.raises(JSONError, match=r"not UTF-8 \(byte 2\)"):
        decode_text(b"ab" + euro[:2])


def test_loads_takes_the_fast_path_for_small_documents_and_steps_above(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = json.dumps({f"t{i}": {"dtype": "F32", "shape": [i], "x": [1.5]} for i in range(2000)})
    assert len(big) > FAST_BYTES
    small = json.dumps({"a": [1, 2, {"b": None}]})
    calls: list[int] = []
    real = _json.loads_stepwise

    def counting(text: str, *, unique_keys: bool = False) -> Any:
        calls.append(len(text))
        return real(text, unique_keys=unique_keys)

    monkeypatch.setattr(_json, "loads_stepwise", counting)
    assert loads(small.encode()) == json.loads(small)
    assert calls == []
    assert loads(big.encode()) == json.loads(big)
    assert calls == [len(big)]
    with pytest.raises(JSONError, match=r"^not valid JSON"):
        loads(b"[1,]")
    with pytest.raises(JSONError, match=r"^not UTF-8 \(byte 3\)"):
        loads(b'["a\xff"]')


def test_stepwise_slides_its_window_over_many_pieces() -> None:
    value = {f"k{i}": ["é€😀" * (i % 7), i, {"x": [1.5, None, True]}] for i in range(30_000)}
    text = json.dumps(value, ensure_ascii=False)
    data = text.encode()
    assert len(data) > 4 * MAX_TOKEN  # many pieces, multi-byte characters across their edges
    assert loads_stepwise(text) == value
    assert loads_stepwise(data) == value
    assert loads_stepwise(memoryview(data)) == value
    bad = bytearray(data)
    bad[700_001] = 0xFF
    try:
        bytes(bad).decode("utf-8")
    except UnicodeDecodeError as exc:
        expected = exc.start
    with pytest.raises(JSONError) as info:
        loads_stepwise(bad)
    assert info.value.reason == f"not UTF-8 (byte {expected})"
    with pytest.raises(JSONError) as late:
        loads_stepwise(text[:-1] + ",}")
    assert late.value.reason == f"not valid JSON: expected a string key at {len(text)}"


def test_an_object_may_have_max_keys_keys_and_no_more() -> None:
    at_cap = "{" + ",".join(f'"k{i}":{i}' for i in range(MAX_KEYS)) + "}"
    decoded = loads_stepwise(at_cap)
    assert len(decoded) == MAX_KEYS
    assert decoded[f"k{MAX_KEYS - 1}"] == MAX_KEYS - 1
    _json.release(decoded)
    over = at_cap[:-1] + ',"last":1}'
    with pytest.raises(JSONError) as exc:
        loads_stepwise(over)
    assert exc.value.reason == (
        f"JSON object with more than {MAX_KEYS} keys, the most one may have (at {len(over) - 1})"
    )
    # Arrays have no such bound (a list grows without copying its items one by one).
    assert len(loads_stepwise("[" + ",".join(["0"] * (MAX_KEYS + 1)) + "]")) == MAX_KEYS + 1


def test_gc_paused_shortens_the_switch_interval_and_restores_both() -> None:
    before = sys.getswitchinterval()
    assert before > SWITCH_INTERVAL  # CPython's default, 5 ms
    assert gc.isenabled()
    with _json.gc_paused():
        assert not gc.isenabled()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
        with _json.gc_paused():  # nested: still paused, restored only by the outer exit
            pass
        assert not gc.isenabled()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
    assert gc.isenabled()
    assert sys.getswitchinterval() == before
    # An interval set by someone else while paused is theirs: left as they set it.
    try:
        with _json.gc_paused():
            sys.setswitchinterval(0.002)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)
    # One already shorter than ours is not touched.
    try:
        sys.setswitchinterval(0.0005)
        with _json.gc_paused():
            assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)
