"""_weights' own rules on hand-built `Weights`: the mapping, release, dequantize, for_mlx_nn.

Loads that produce these objects are tested in test_load.py and test_companions.py.
"""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

import asyncweights as aw
from asyncweights._weights import ShardSlice
from asyncweights.testing import random_array

DIGEST = "sha256:" + "0" * 64


def info(
    name: str,
    array: mx.array,
    *,
    quantization: aw.Quantization | None = None,
    companions: dict[str, str] | None = None,
    shard: ShardSlice | None = None,
) -> aw.TensorInfo:
    return aw.TensorInfo(
        name, array.dtype, tuple(array.shape), array.nbytes, DIGEST, name, "F32",
        quantization, companions or {}, shard,
    )  # fmt: skip


def weights(
    arrays: dict[str, mx.array], infos: dict[str, aw.TensorInfo] | None = None
) -> aw.Weights:
    infos = infos if infos is not None else {n: info(n, a) for n, a in arrays.items()}
    return aw.Weights(arrays, infos, model="m:latest", component=None, quantization=None)


def quantized(w: mx.array, q: aw.Quantization) -> tuple[dict[str, mx.array], aw.TensorInfo]:
    """`w` quantized with `q` under the store's names, and the weight's info."""
    out = mx.quantize(w, group_size=q.group_size, bits=q.bits, mode=q.mode)
    arrays = {"l.weight": out[0], "l.weight_scale": out[1]}
    roles = {"scales": "l.weight_scale"}
    if q.mode == "affine":
        arrays["l.weight_qbias"] = out[2]
        roles["biases"] = "l.weight_qbias"
    return arrays, info("l.weight", out[0], quantization=q, companions=roles)


@pytest.mark.parametrize(
    ("full_shape", "axis", "ranges", "shape", "spans"),
    [
        ((4, 3), 0, ((1, 3),), (2, 3), [(12, 24)]),  # rows: one span
        ((4, 3), 1, ((1, 2),), (4, 1), [(4, 4), (16, 4), (28, 4), (40, 4)]),  # a column
        ((4, 3), 1, ((0, 3),), (4, 3), [(0, 48)]),  # whole rows merge into one span
        ((6, 2), 0, ((0, 1), (3, 4)), (2, 2), [(0, 8), (24, 8)]),  # fused: two segments
        ((6, 2), 0, ((0, 1), (1, 2)), (2, 2), [(0, 16)]),  # adjacent segments merge
        ((2, 4), 1, ((0, 0),), (2, 0), []),  # nothing held
    ],
)
def test_shard_slice_shape_and_byte_spans(
    full_shape: tuple[int, ...],
    axis: int,
    ranges: tuple[tuple[int, int], ...],
    shape: tuple[int, ...],
    spans: list[tuple[int, int]],
) -> None:
    part = ShardSlice(full_shape, axis, ranges)
    assert part.shape == shape
    assert part.spans(4) == spans
    # The spans pick exactly the elements numpy's slicing picks.
    full = np.arange(int(np.prod(full_shape)), dtype=np.float32).reshape(full_shape)
    raw = full.tobytes()
    picked = b"".join(raw[o : o + n] for o, n in part.spans(4))
    index = [slice(None)] * len(full_shape)
    pieces = []
    for lo, hi in ranges:
        index[axis] = slice(lo, hi)
        pieces.append(full[tuple(index)])
    assert picked == np.ascontiguousarray(np.concatenate(pieces, axis=axis)).tobytes()


def test_full_shape_is_the_shard_full_shape_or_the_shape() -> None:
    a = mx.zeros((2, 3))
    assert info("a", a).full_shape == (2, 3)
    assert info("a", a, shard=ShardSlice((8, 3), 0, ((2, 4),))).full_shape == (8, 3)


def test_weights_is_a_read_only_mapping_with_nbytes_and_repr() -> None:
    a, b = mx.zeros((2, 3), mx.float16), mx.ones((5,), mx.int32)
    w = weights({"a": a, "b": b})
    assert list(w) == ["a", "b"]
    assert len(w) == 2
    assert w["a"] is a
    assert w.nbytes == 2 * 3 * 2 + 5 * 4
    assert repr(w) == "<Weights 'm:latest': 2 tensors, 32 bytes>"
    w.component = "text"
    assert repr(w) == "<Weights 'm:latest', component='text': 2 tensors, 32 bytes>"
    with pytest.raises(KeyError) as caught:
        w["c"]
    assert caught.value.args == ("c",)
    assert not hasattr(w, "__setitem__")


def test_release_drops_the_arrays_keeps_the_info_and_says_so_on_access() -> None:
    w = weights({"a": mx.zeros((4,))})
    before = dict(w.info)
    w.release()
    assert (len(w), list(w), w.nbytes) == (0, [], 0)
    assert w.info == before
    with pytest.raises(KeyError) as caught:
        w["a"]
    assert caught.value.args == ("'a': weights were released",)


def test_empty_weights_missing_name_is_a_plain_key_error() -> None:
    w = weights({})
    with pytest.raises(KeyError) as caught:
        w["a"]
    assert caught.value.args == ("a",)


@pytest.mark.parametrize(
    "q",
    [
        aw.Quantization("int4", "affine", 4, 64),
        aw.Quantization("int8", "affine", 8, 32),
        aw.Quantization("mxfp4", "mxfp4", 4, 32),
        aw.Quantization("nvfp4", "nvfp4", 4, 16),
    ],
)
def test_dequantize_is_mx_dequantize_with_the_recorded_facts(q: aw.Quantization) -> None:
    source = random_array((8, 128), mx.float32, seed=q.type)
    arrays, winfo = quantized(source, q)
    w = weights(arrays, {"l.weight": winfo})
    expected = mx.dequantize(
        arrays["l.weight"], arrays["l.weight_scale"], arrays.get("l.weight_qbias"),
        group_size=q.group_size, bits=q.bits, mode=q.mode,
    )  # fmt: skip
    got = w.dequantize("l.weight")
    assert got.dtype == expected.dtype
    assert mx.array_equal(got, expected).item()
    assert w.dequantize("l.weight", dtype=mx.bfloat16).dtype == mx.bfloat16


@pytest.mark.parametrize("per_row", [False, True])
def test_nvfp4_global_scale_multiplies_per_tensor_or_per_row(per_row: bool) -> None:
    q = aw.Quantization("nvfp4", "nvfp4", 4, 16)
    arrays, winfo = quantized(random_array((4, 64), mx.float32, seed="g"), q)
    scale = np.array([0.5, 2.0, 4.0, 8.0] if per_row else [2.0], np.float32)
    arrays["l.weight.global_scale"] = mx.array(scale if per_row else scale.reshape(()))
    roles = {**winfo.companions, "global_scale": "l.weight.global_scale"}
    w = weights(
        arrays, {"l.weight": info("l.weight", arrays["l.weight"], quantization=q, companions=roles)}
    )
    plain = mx.dequantize(
        arrays["l.weight"], arrays["l.weight_scale"], group_size=16, bits=4, mode="nvfp4"
    )
    assert plain.dtype == mx.bfloat16  # MLX's default for nvfp4: the scales' dtype
    # Multiplied in float32, rounded back to bfloat16 (ml_dtypes rounds to nearest even).
    factor = scale[:, None] if per_row else scale[0]
    expected = (np.array(plain.astype(mx.float32)) * factor).astype(ml_dtypes.bfloat16)
    got = w.dequantize("l.weight")
    assert got.dtype == mx.bfloat16
    assert np.array(got.astype(mx.float32)).tobytes() == expected.astype(np.float32).tobytes()


def test_dequantize_returns_an_unquantized_tensor_as_it_is_and_names_missing_ones() -> None:
    a = mx.arange(6)
    w = weights({"a": a})
    assert w.dequantize("a") is a
    with pytest.raises(KeyError):
        w.dequantize("b")
    arrays, winfo = quantized(
        random_array((2, 64), mx.float32), aw.Quantization("int4", "affine", 4, 32)
    )
    del arrays["l.weight_qbias"]
    with pytest.raises(KeyError) as caught:
        weights(arrays, {"l.weight": winfo}).dequantize("l.weight")
    assert caught.value.args == ("l.weight_qbias",)


def test_for_mlx_nn_renames_companions_only_and_shares_the_arrays() -> None:
    q = aw.Quantization("int4", "affine", 4, 32)
    arrays, winfo = quantized(random_array((2, 64), mx.float32), q)
    arrays["l.weight.global_scale"] = mx.array(1.0)  # a companion by role, below
    roles = {**winfo.companions, "global_scale": "l.weight.global_scale"}
    arrays["norm.weight"] = mx.ones((4,))
    arrays["l.weight_scale_extra"] = mx.ones((1,))  # not a companion: keeps its name
    infos = {n: info(n, a) for n, a in arrays.items()}
    infos["l.weight"] = info("l.weight", arrays["l.weight"], quantization=q, companions=roles)
    w = weights(arrays, infos)
    out = w.for_mlx_nn()
    assert sorted(out) == [
        "l.biases", "l.global_scale", "l.scales", "l.weight", "l.weight_scale_extra",
        "norm.weight",
    ]  # fmt: skip
    assert out["l.scales"] is arrays["l.weight_scale"]
    assert out["l.biases"] is arrays["l.weight_qbias"]
    assert out["l.weight"] is arrays["l.weight"]
    assert sorted(w) == sorted(arrays)  # the Weights itself is untouched
