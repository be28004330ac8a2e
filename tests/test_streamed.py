"""Streamed planning: headers checked group by group while earlier groups load.

`load_weights` and `stream_weights` plan as they go (`_read.StreamPlanner`): these tests pin
what that changes and what it must not: the first group loads before later headers are read,
a bad later header fails the load with the planner's typed error (mid-stream for
`stream_weights`), whole-model checks still run, progress totals settle exactly, and the
result is the plan `make_plan` gives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

import asyncweights as aw
from asyncweights import _header, _load, _read
from asyncweights._files import open_file
from asyncweights._writer import RawTensor, encode_safetensors
from asyncweights.testing import StoreBuilder, random_weights

MODEL = "streamed"
SHAPES = {f"blocks.{i}.weight": (8, 4 + i) for i in range(6)}
#: one unit a group, one group planned at a time: every step of the stream is visible
STEPWISE = aw.Limits(workers=1, group_bytes=1, buffered_groups=0)


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def _break_dtype(path: Path) -> None:
    """Make the header name an unknown dtype, the file's size unchanged."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n]
    assert b'"BF16"' in header
    path.write_bytes(data[:8] + header.replace(b'"BF16"', b'"BX16"', 1) + data[8 + n :])


def _same(a: mx.array, b: mx.array) -> bool:
    return a.dtype == b.dtype and bytes(memoryview(a)) == bytes(memoryview(b))  # type: ignore[arg-type]


async def test_first_group_loads_before_later_headers_are_read(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = builder.add_model(MODEL, random_weights(SHAPES, seed=1))
    events: list[str] = []
    real_head, real_load = _header.head_of, _read.load_group

    def head_of(f: Any, **kwargs: Any) -> Any:
        events.append("header")
        return real_head(f, **kwargs)

    def load_group(group: Any, *args: Any, **kwargs: Any) -> Any:
        events.append("load")
        return real_load(group, *args, **kwargs)

    monkeypatch.setattr(_read, "head_of", head_of)
    monkeypatch.setattr(_load, "load_group", load_group)
    weights = await aw.load_weights(MODEL, store=store_root, limits=STEPWISE)
    assert list(weights) == list(SHAPES)
    assert all(_same(weights[k], v) for k, v in model.expected.items())
    # One header, its group's load, the next header, ...: never every header first.
    assert events == ["header", "load"] * len(SHAPES)


async def test_a_bad_later_header_fails_load_weights_with_its_typed_error(
    builder: StoreBuilder, store_root: Path
) -> None:
    model = builder.add_model(MODEL, random_weights(SHAPES, seed=2))
    last = model.layers[-1]
    path = _blob(store_root, last.digest)
    _break_dtype(path)
    with pytest.raises(aw.UnsupportedDTypeError) as info:
        await aw.load_weights(MODEL, store=store_root, limits=STEPWISE)
    message = str(info.value)
    for fragment in ("unsupported dtype 'BX16'", f"model {MODEL!r}", last.digest, str(path)):
        assert fragment in message, (fragment, message)


async def test_stream_weights_raises_mid_stream_after_the_good_tensors(
    builder: StoreBuilder, store_root: Path
) -> None:
    model = builder.add_model(MODEL, random_weights(SHAPES, seed=3))
    bad = model.layers[3]
    _break_dtype(_blob(store_root, bad.digest))
    got: dict[str, mx.array] = {}

    async def consume() -> None:
        async with aw.stream_weights(MODEL, store=store_root, limits=STEPWISE) as tensors:
            async for tensor in tensors:
                got[tensor.name] = tensor.array

    with pytest.raises(aw.UnsupportedDTypeError) as info:
        await consume()
    assert bad.digest in str(info.value)
    assert list(got) == list(SHAPES)[:3]  # every tensor before the bad blob, and no other
    assert all(_same(got[k], model.expected[k]) for k in got)


async def test_a_name_defined_twice_across_groups_fails(
    builder: StoreBuilder, store_root: Path
) -> None:
    """Two blobs (in different groups) that both name ``x``: the second is refused."""
    first = builder.add_blob("a", {"x": mx.ones((3,))})
    second = builder.add_blob("b", {"x": mx.zeros((3,))})
    builder.write_manifest(MODEL, [first, second])
    with pytest.raises(aw.DuplicateTensorError) as info:
        await aw.load_weights(MODEL, store=store_root, limits=STEPWISE)
    assert "tensor defined twice, also by blob " + first.digest in str(info.value)
    assert second.digest in str(info.value)


async def test_progress_totals_start_from_the_manifest_and_settle_exactly(
    builder: StoreBuilder, store_root: Path
) -> None:
    model = builder.add_model(MODEL, random_weights(SHAPES, seed=4))
    events: list[aw.Progress] = []
    weights = await aw.load_weights(
        MODEL, store=store_root, limits=STEPWISE, on_progress=events.append
    )
    blob_bytes = sum(layer.size for layer in model.layers if layer.name in SHAPES)
    tensor_bytes = sum(a.nbytes for a in weights.values())
    assert events[0].phase == "planning"
    assert (events[0].total_bytes, events[0].total_tensors) == (blob_bytes, len(SHAPES))
    assert events[-1].phase == "done"
    assert (events[-1].total_bytes, events[-1].total_tensors) == (tensor_bytes, len(SHAPES))
    assert events[-1].completed_bytes == tensor_bytes
    assert all(e.completed_bytes <= e.total_bytes for e in events)


async def test_streamed_result_is_the_whole_plans_result(
    builder: StoreBuilder, store_root: Path
) -> None:
    """Same names in the same order, same facts, as the load planned whole first."""
    shapes: dict[str, tuple[int, ...]] = {
        f"layers.{i}.mlp.up_proj.weight": (64, 64) for i in range(3)
    }
    shapes["norm.weight"] = (64,)
    builder.add_model(
        MODEL,
        random_weights(shapes, seed=5),
        quantize=lambda name, array: "int4" if "up_proj" in name else None,
    )
    streamed = await aw.load_weights(MODEL, store=store_root, limits=STEPWISE)
    opened = await aw.ModelStore(store_root).open(MODEL)
    whole = await _load.load_plan(await _load.make_plan(opened, None, STEPWISE))
    assert list(streamed) == list(whole)
    assert streamed.info == whole.info
    assert streamed.quantization == whole.quantization is not None
    assert all(_same(streamed[k], whole[k]) for k in whole)


async def test_a_budget_the_manifest_does_not_prove_is_checked_before_any_read(
    builder: StoreBuilder, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder.add_model(MODEL, random_weights(SHAPES, seed=6))
    loads: list[object] = []
    monkeypatch.setattr(_load, "load_group", lambda *args: loads.append(args))
    with pytest.raises(aw.BudgetError, match="over the budget of 16"):
        await aw.load_weights(MODEL, store=store_root, limits=aw.Limits(max_bytes=16))
    assert loads == []


def test_the_header_cache_is_proved_on_the_descriptor(tmp_path: Path) -> None:
    """A header parsed before is used for a held-open blob only if the bytes read through
    the new descriptor are the same: a file rewritten in the same second with another
    header is parsed again."""
    path = tmp_path / "blob"
    path.write_bytes(encode_safetensors([RawTensor("a", "F32", (2,), bytes(8))], style="go"))
    with open_file(path, "blob") as f:
        first, _ = _header.head_of(f, whole_upto=0, fresh=True)
    stat = path.stat()
    path.write_bytes(encode_safetensors([RawTensor("b", "F32", (2,), bytes(8))], style="go"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same identity as cached
    with open_file(path, "blob") as f:
        again, _ = _header.head_of(f, whole_upto=0, fresh=True)
        stale, _ = _header.head_of(f, whole_upto=0, fresh=False)
    assert list(first.entries) == ["a"]
    assert list(again.entries) == ["b"]
    assert stale is again  # the cache now holds the header proved on this file


async def test_a_small_blob_goes_first_when_the_model_starts_with_a_large_one(
    builder: StoreBuilder, store_root: Path
) -> None:
    """The first tensor of a stream waits for the first group: a small unit is moved before
    a large first blob. `load_weights` still returns the manifest's order."""
    shapes = {"a.embed": (256, 256), "b.norm": (4,), "c.weight": (256, 256)}
    model = builder.add_model(MODEL, random_weights(shapes, seed=7))
    limits = aw.Limits(workers=1, group_bytes=32 * 64 * 1024)  # first group: 64 KiB
    order: list[str] = []
    async with aw.stream_weights(MODEL, store=store_root, limits=limits) as tensors:
        async for tensor in tensors:
            order.append(tensor.name)
    assert order == ["b.norm", "a.embed", "c.weight"]
    weights = await aw.load_weights(MODEL, store=store_root, limits=limits)
    assert list(weights) == list(shapes)
    assert all(_same(weights[k], v) for k, v in model.expected.items())


async def test_companions_split_across_groups_are_checked_before_the_end(
    builder: StoreBuilder, store_root: Path
) -> None:
    """A packed weight in one blob, its scales and biases in another whose layer name does
    not share its base: planned whole (or in one group) they are one int4 weight; loaded in
    separate groups, each group was read without the other, and the whole-model check at the
    end refuses the load instead of returning tensors read the wrong way."""
    weight = RawTensor("w", "U32", (64, 8), bytes(64 * 8 * 4))
    scales = RawTensor("w.scale", "BF16", (64, 1), bytes(128))
    biases = RawTensor("w.bias", "BF16", (64, 1), bytes(128))
    first = builder.add_blob("x", [weight])
    second = builder.add_blob("y", [scales, biases])
    builder.write_manifest(MODEL, [first, second], config=builder.add_config(file_type="int4"))
    int4 = aw.Quantization("int4", "affine", 4, 64)
    together = await aw.load_weights(MODEL, store=store_root)  # one group
    assert together.info["w"].quantization == together.quantization == int4
    assert together.info["w"].companions == {"scales": "w_scale", "biases": "w_qbias"}
    with pytest.raises(aw.QuantizationError) as info:
        await aw.load_weights(MODEL, store=store_root, limits=STEPWISE)
    message = str(info.value)
    assert "a quantized weight and its companions were loaded in different groups" in message
    assert "tensor 'w'" in message
    assert first.digest in message
