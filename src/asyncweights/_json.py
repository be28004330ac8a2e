"""JSON of untrusted size, decoded in steps short enough to leave the event loop free.

Manifests, config blobs and safetensors headers are decoded in worker threads, but a worker
thread still holds the GIL for as long as one C call runs: one ``msgspec`` call on a 94 MB
header held it for 2.4 s, and the event loop with it. So:

* Documents up to `FAST_BYTES` are decoded by one ``msgspec`` call (about 1 ms for a real
  64 KiB header; the worst shape measured, nested empty arrays, about 3 ms).
* Larger ones are decoded by `loads_stepwise`, a parser whose loop is Python and whose C
  calls (one token each: ``json.decoder.scanstring`` for a string, a regex for a number or
  whitespace) each cover a bounded span of text. The interpreter hands the GIL to the event
  loop between any two of them (every ``sys.getswitchinterval()``, 5 ms by default). It is
  slower (seconds for a document at the caps), which only inputs far above any real model
  pay.
* Two more C calls would hold the GIL for as long as the document is big, so they are
  avoided while such a tree lives (`gc_paused`): a full garbage collection, which walks
  every container of the tree at once (measured: 0.1-0.5 s at the caps), and freeing the
  tree in one go (one recursive dealloc); `release` empties it piece by piece instead.
* A thread waiting for the GIL waits one switch interval (5 ms by default) before it asks
  the running thread to let go, so with a decoder running, every wake-up of the event loop
  came 5 ms late, and any other delay (a short C call, the OS scheduler) pushed it past
  10 ms. `gc_paused` also lowers the interval to `SWITCH_INTERVAL` (1 ms) while a big
  document is decoded: the event loop's lag at the caps fell from 5.2 ms typical, 15-24 ms
  worst, to 1.2 ms typical, 7 ms worst (a 1 ms ticker thread beside the decoder, 2-core VM).
* An object of more than `MAX_KEYS` keys is refused: CPython grows a dict by copying all its
  entries in one step, and the step that takes a dict past 349,525 keys copies 349,525
  entries, 13.5 ms measured (the one before it: 174,762 entries, 6.5 ms; a 2.2M-key object
  grows in a 62 ms step). The largest real object, a tokenizer's vocabulary, has at most
  262,144 keys (Gemma 3).

Both accept exactly JSON (RFC 8259): no ``NaN``, no trailing commas, strict UTF-8, no
control characters inside strings.
"""

from __future__ import annotations

import codecs
import gc
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from json import decoder as _stdlib
from typing import Any

import msgspec

__all__ = [
    "FAST_BYTES",
    "MAX_KEYS",
    "SWITCH_INTERVAL",
    "JSONError",
    "decode_text",
    "gc_paused",
    "loads",
    "loads_stepwise",
    "release",
]

#: documents up to this many bytes are decoded in one msgspec call
FAST_BYTES = 64 * 1024
#: the longest string or run of whitespace the stepwise parser accepts as one token
MAX_TOKEN = 256 * 1024
#: how deeply arrays and objects may nest (real manifests, configs and headers: 3-6)
MAX_DEPTH = 256
#: the most keys one object may have: the largest dict CPython builds without a growth step
#: that copies more than 174,762 entries (its table of 2^19 slots holds 349,525)
MAX_KEYS = 349_525
#: the GIL switch interval (seconds) while a big document is decoded (`gc_paused`)
SWITCH_INTERVAL = 0.001
_STEP = 256 * 1024  # text is decoded and parsed in pieces of this many bytes
# The parser sees the text through a window that always holds the next token whole: every
# copy made to slide it (and the only copies of the text there are) stays this small.
_WINDOW = MAX_TOKEN + 1024
_NUMBER_CHARS = 400  # a number longer than this is not one a model file needs
_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_DECODER = msgspec.json.Decoder()
# The C string scanner of the standard library (json's own; untyped in typeshed).
_scanstring: Callable[[str, int, bool], tuple[str, int]] = _stdlib.scanstring  # type: ignore[attr-defined]


class JSONError(ValueError):
    """Not valid JSON, or beyond a bound of this module; `reason` says which and where."""

    def __init__(self, reason: str, key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: the duplicated key, for a duplicate key
        self.key = key


def loads(data: bytes | bytearray | memoryview, *, unique_keys: bool = False) -> Any:
    """Decode a JSON document: in one msgspec call when small, else in bounded steps.

    Args:
        data: UTF-8 JSON.
        unique_keys: reject an object with a key twice (only checked by the stepwise path;
            callers that need it on small documents check those themselves).

    Raises:
        JSONError: invalid UTF-8 (with the byte offset), invalid JSON, or a bound exceeded.
    """
    if len(data) <= FAST_BYTES:
        decode_text(data)  # the UTF-8 check, worded by us (decoders word it differently)
        try:
            return _DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise JSONError(f"not valid JSON: {exc}") from None
        except RecursionError:
            raise JSONError("JSON nested too deeply") from None
    return loads_stepwise(data, unique_keys=unique_keys)


def decode_text(data: bytes | bytearray | memoryview) -> str:
    """Strict UTF-8 to text, in steps of 1 MiB.

    Raises:
        JSONError: ``not UTF-8 (byte N)``.
    """
    if len(data) <= _STEP:
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONError(f"not UTF-8 (byte {exc.start})") from None
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    view = memoryview(data).cast("B")
    parts = []
    try:
        for start in range(0, len(view), _STEP):
            chunk = view[start : start + _STEP]
            try:
                parts.append(decoder.decode(chunk, final=start + _STEP >= len(view)))
            except UnicodeDecodeError as exc:
                # The decoder may hold up to 3 bytes of the previous chunk.
                held = len(decoder.getstate()[0]) if exc.start == 0 else 0
                raise JSONError(f"not UTF-8 (byte {start + exc.start - held})") from None
    finally:
        view.release()
    return "".join(parts)


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False
_interval_was: float | None = None


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off, and the GIL switch interval at most
    `SWITCH_INTERVAL`, while a big tree is built, used and released.

    Process-wide, counted (nested and concurrent pauses are fine), and restored as found
    (an interval someone else changed meanwhile is left as they set it); only cycles wait,
    and only for as long as the block runs.
    """
    global _gc_pauses, _gc_was_enabled, _interval_was
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
            interval = sys.getswitchinterval()
            _interval_was = interval if interval > SWITCH_INTERVAL else None
            if _interval_was is not None:
                sys.setswitchinterval(SWITCH_INTERVAL)
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0:
                if _gc_was_enabled:
                    gc.enable()
                # setswitchinterval rounds to microseconds: compare as it reads back.
                if (
                    _interval_was is not None
                    and abs(sys.getswitchinterval() - SWITCH_INTERVAL) < 1e-6
                ):
                    sys.setswitchinterval(_interval_was)
                _interval_was = None


def release(value: Any) -> None:
    """Empty a decoded tree container by container, so no single dealloc frees it all
    (under `gc_paused`, so the event loop gets the GIL within 1 ms meanwhile)."""
    with gc_paused():
        _release(value)


def _release(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            while item:
                child = item.popitem()[1]
                if isinstance(child, dict | list) and child:
                    stack.append(child)
        elif isinstance(item, list):
            while item:
                child = item.pop()
                if isinstance(child, dict | list) and child:
                    stack.append(child)


def loads_stepwise(
    source: str | bytes | bytearray | memoryview, *, unique_keys: bool = False
) -> Any:
    """Parse JSON (text, or UTF-8 bytes) in bounded steps (see the module docstring).

    The text is never held whole: it is decoded and parsed in pieces of 256 KiB. Keep the
    result under `gc_paused` while using it and `release` it when done; a document that fails
    is released here.

    Raises:
        JSONError: not UTF-8 (with the byte offset), invalid JSON, nesting deeper than
            `MAX_DEPTH`, an object of more than `MAX_KEYS` keys, a string or run of
            whitespace longer than `MAX_TOKEN` characters, a number over 400 characters.
    """
    stack: list[list[Any]] = []
    with gc_paused():
        try:
            return _parse(_Source(_pieces(source)), stack, unique_keys)
        except JSONError:
            release([frame[0] for frame in stack])
            raise


def _pieces(source: str | bytes | bytearray | memoryview) -> Iterator[str]:
    if isinstance(source, str):
        for start in range(0, len(source), _STEP):
            yield source[start : start + _STEP]
        return
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    view = memoryview(source).cast("B")
    try:
        for start in range(0, len(view), _STEP):
            try:
                yield decoder.decode(view[start : start + _STEP], final=start + _STEP >= len(view))
            except UnicodeDecodeError as exc:
                held = len(decoder.getstate()[0]) if exc.start == 0 else 0
                raise JSONError(f"not UTF-8 (byte {start + exc.start - held})") from None
    finally:
        view.release()


class _Source:
    """The text seen through a window that holds at least `_WINDOW` characters past any
    position the parser asks for (fewer only at the end of the text)."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.text = ""
        self.base = 0  # offset in the whole text of text[0], for messages
        self.done = False

    def ensure(self, pos: int) -> int:
        """Slide the window so that it starts at `pos`; returns `pos` in the new window."""
        if self.done or len(self.text) - pos >= _WINDOW:
            return pos
        parts = [self.text[pos:]]
        size = len(parts[0])
        while size < _WINDOW:
            piece = next(self._pieces, None)
            if piece is None:
                self.done = True
                break
            parts.append(piece)
            size += len(piece)
        self.text = "".join(parts)
        self.base += pos
        return 0

    def at(self, pos: int) -> str:
        return f"{self.base + pos}"


def _parse(src: _Source, stack: list[list[Any]], unique_keys: bool) -> Any:
    # Each open container: [container, key awaiting its value (objects only)].
    pos = _skip_ws(src, 0)
    while True:
        # -- one value at `pos`
        pos = src.ensure(pos)
        text = src.text
        if pos >= len(text):
            raise JSONError(
                f"not valid JSON: input ended where a value was expected (at {src.at(pos)})"
            )
        c = text[pos]
        value: Any
        if c == "{" or c == "[":
            if len(stack) >= MAX_DEPTH:
                raise JSONError(f"JSON nested too deeply (over {MAX_DEPTH} levels)")
            pos = _skip_ws(src, pos + 1)
            close = "}" if c == "{" else "]"
            if pos < len(src.text) and src.text[pos] == close:
                value = {} if c == "{" else []
                pos += 1
            elif c == "{":
                key, pos = _key(src, pos)
                stack.append([{}, key])
                continue
            else:
                stack.append([[], None])
                continue
        elif c == '"':
            value, pos = _string(src, pos)
        elif c == "-" or "0" <= c <= "9":
            value, pos = _number(src, pos)
        elif text.startswith("true", pos):
            value, pos = True, pos + 4
        elif text.startswith("false", pos):
            value, pos = False, pos + 5
        elif text.startswith("null", pos):
            value, pos = None, pos + 4
        else:
            raise JSONError(f"not valid JSON: unexpected character {c!r} at {src.at(pos)}")
        # -- attach it to the containers it completes
        while True:
            pos = _skip_ws(src, pos)
            text = src.text
            if not stack:
                if pos != len(text):
                    raise JSONError(f"not valid JSON: trailing characters at {src.at(pos)}")
                return value
            top = stack[-1]
            container = top[0]
            if isinstance(container, dict):
                key = top[1]
                if unique_keys and key in container:
                    raise JSONError(f"duplicate key {key!r}", key)
                if len(container) >= MAX_KEYS:
                    raise JSONError(
                        f"JSON object with more than {MAX_KEYS} keys, the most one may have "
                        f"(at {src.at(pos)})"
                    )
                container[key] = value
                close = "}"
            else:
                container.append(value)
                close = "]"
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(src, pos + 1)
                if close == "}":
                    top[1], pos = _key(src, pos)
                break  # the next value of this container
            if pos < len(text) and text[pos] == close:
                stack.pop()
                value = container
                pos += 1
                continue
            raise JSONError(f"not valid JSON: expected ',' or {close!r} at {src.at(pos)}")


def _skip_ws(src: _Source, pos: int) -> int:
    while True:
        pos = src.ensure(pos)
        match = _WS.match(src.text, pos, pos + MAX_TOKEN)
        assert match is not None  # `*` matches the empty string
        end = match.end()
        if end < pos + MAX_TOKEN:
            return end
        pos = end  # a long run: go on in bounded steps


def _key(src: _Source, pos: int) -> tuple[str, int]:
    pos = src.ensure(pos)
    if pos >= len(src.text) or src.text[pos] != '"':
        raise JSONError(f"not valid JSON: expected a string key at {src.at(pos)}")
    key, pos = _string(src, pos)
    pos = _skip_ws(src, pos)
    if pos >= len(src.text) or src.text[pos] != ":":
        raise JSONError(f"not valid JSON: expected ':' at {src.at(pos)}")
    return key, _skip_ws(src, pos + 1)


def _string(src: _Source, pos: int) -> tuple[str, int]:
    """The string starting at ``text[pos] == '"'``, at most `MAX_TOKEN` characters long."""
    pos = src.ensure(pos)
    text = src.text
    limit = pos + 1 + MAX_TOKEN + 1  # the closing quote must lie before this
    i = pos + 1
    while True:
        q = text.find('"', i, limit)
        if q < 0:
            if limit > len(text):
                raise JSONError(f"not valid JSON: unterminated string at {src.at(pos)}")
            raise JSONError(f"string at {src.at(pos)} longer than {MAX_TOKEN} characters")
        slashes = 0
        while text[q - 1 - slashes] == "\\":
            slashes += 1
        if slashes % 2 == 0:
            break
        i = q + 1
    try:
        return _scanstring(text, pos + 1, True)  # bounded: the quote at q ends it
    except ValueError as exc:  # json.JSONDecodeError
        raise JSONError(f"not valid JSON: {exc}") from None


def _number(src: _Source, pos: int) -> tuple[int | float, int]:
    pos = src.ensure(pos)
    m = _NUMBER.match(src.text, pos, pos + _NUMBER_CHARS + 1)
    if m is None:
        raise JSONError(f"not valid JSON: bad number at {src.at(pos)}")
    end = m.end()
    if end > pos + _NUMBER_CHARS:
        raise JSONError(f"number at {src.at(pos)} longer than {_NUMBER_CHARS} characters")
    if m.group(1) or m.group(2):
        return float(m.group()), end
    return int(m.group()), end
