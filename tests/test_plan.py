"""`_plan` directly: pure planning from layers, headers and hints (no store, no I/O)."""

from __future__ import annotations

import pytest

import asyncweights as aw
from asyncweights._header import BlobHeader, TensorEntry
from asyncweights._manifest import TENSOR_MEDIA_TYPE
from asyncweights._plan import (
    BlobPlan,
    _Collision,
    _remap,
    blob_paths,
    group_blobs,
    plan_tensors,
    select_layers,
)

DIGESTS = ["sha256:" + f"{i:x}" * 64 for i in range(1, 10)]


def blob(i: int, nbytes: int, file_size: int) -> BlobPlan:
    header = BlobHeader(file_size=file_size, data_start=8, entries={})
    return BlobPlan(DIGESTS[i % len(DIGESTS)], f"/b/{i}", header, nbytes=nbytes)


def sizes(groups: list[list[BlobPlan]]) -> list[int]:
    return [len(g) for g in groups]


def test_groups_start_small_and_double_up_to_group_bytes() -> None:
    # group_bytes 2048: the first group may hold 2048/32 = 64 bytes, then 128, 256, 512 ...
    limits = aw.Limits(group_bytes=2048)
    blobs = [blob(i, 64, file_size=100) for i in range(10)]
    groups = group_blobs(blobs, limits, files=8)
    assert sizes(groups) == [1, 2, 4, 3]
    assert [b for g in groups for b in g] == blobs  # in order, each once


def test_a_blob_larger_than_the_cap_gets_a_group_of_its_own() -> None:
    limits = aw.Limits(group_bytes=2048)
    blobs = [blob(0, 10, 100), blob(1, 5000, 100), blob(2, 10, 100)]
    assert sizes(group_blobs(blobs, limits, files=8)) == [1, 1, 1]


def test_blobs_read_lazily_are_bounded_by_open_files() -> None:
    # Blobs above direct_read_bytes stay open until evaluated: at most `files` a group.
    limits = aw.Limits(group_bytes=1 << 30, direct_read_bytes=1000)
    lazy = [blob(i, 10, file_size=5000) for i in range(5)]
    assert sizes(group_blobs(lazy, limits, files=2)) == [2, 2, 1]
    small = [blob(i, 10, file_size=500) for i in range(5)]
    assert sizes(group_blobs(small, limits, files=2)) == [5]


def test_remap_names_scales_and_quantization_biases() -> None:
    entry = TensorEntry("k", "F32", (1,), 0, 4)
    keys = {k: entry for k in ("w", "w.scale", "w.bias", "b.bias", "n.weight")}
    assert _remap(keys) == {
        "w": "w",
        "w_scale": "w.scale",
        "w_qbias": "w.bias",  # a bias beside its scale is the quantization bias
        "b.bias": "b.bias",  # a layer's own bias keeps its name
        "n.weight": "n.weight",
    }
    assert _remap({"x.scale": entry}) == {"x_scale": "x.scale"}
    with pytest.raises(_Collision) as info:
        _remap({"w.scale": entry, "w_scale": entry})
    assert info.value.name == "w_scale"


def layer(name: str | None, i: int = 0, size: int = 100) -> aw.Layer:
    return aw.Layer(TENSOR_MEDIA_TYPE, DIGESTS[i], size, name)


def test_select_layers_of_a_component() -> None:
    layers = [layer("vae/a", 0), layer("transformer/b", 1), layer("vae/c", 2)]
    assert select_layers("m", layers, ["vae", "transformer"], "vae") == [layers[0], layers[2]]
    assert select_layers("m", layers, ["vae", "transformer"], None) == layers
    with pytest.raises(aw.ComponentNotFoundError, match="no component 'text_encoder'"):
        select_layers("m", layers, ["vae", "transformer"], "text_encoder")
    with pytest.raises(aw.ComponentNotFoundError):
        select_layers("m", [], [], None)


def test_blob_paths_one_per_distinct_blob() -> None:
    layers = [layer("a", 0), layer("b", 0), layer("c", 1)]
    paths = blob_paths("/srv/models/blobs", "m", layers)
    assert paths == {
        DIGESTS[0]: "/srv/models/blobs/sha256-" + "1" * 64,
        DIGESTS[1]: "/srv/models/blobs/sha256-" + "2" * 64,
    }


def test_plan_tensors_names_resolves_and_checks_the_budget() -> None:
    # One packed int4 weight with its scales and biases, and a plain tensor, in two blobs.
    weight = TensorEntry("w", "U32", (64, 8), 0, 64 * 8 * 4)
    scale = TensorEntry("w.scale", "BF16", (64, 1), weight.end, weight.end + 128)
    bias = TensorEntry("w.bias", "BF16", (64, 1), scale.end, scale.end + 128)
    norm = TensorEntry("norm", "F32", (4,), 0, 16)
    headers = {
        DIGESTS[0]: BlobHeader(8 + bias.end, 8, {"w": weight, "w.scale": scale, "w.bias": bias}),
        DIGESTS[1]: BlobHeader(8 + 16, 8, {"norm": norm}),
    }
    layers = [layer("w", 0, 8 + bias.end), layer("norm", 1, 24)]
    paths = blob_paths("/r/blobs", "m", layers)
    plan = plan_tensors("m", None, layers, headers, {}, paths, ("int4", None), aw.Limits(), 4)
    names = [(t.name, t.key, t.companion) for b in plan.blobs for t in b.tensors]
    assert sorted(names) == [
        ("norm", "norm", False),
        ("w", "w", False),
        ("w_qbias", "w.bias", True),
        ("w_scale", "w.scale", True),
    ]
    assert plan.quantization == aw.Quantization("int4", "affine", 4, 64)
    assert plan.total_bytes == bias.end + 16
    assert plan.groups == [plan.blobs]
    with pytest.raises(aw.BudgetError, match=f"load needs {bias.end + 16} bytes"):
        plan_tensors(
            "m", None, layers, headers, {}, paths, ("int4", None), aw.Limits(max_bytes=100), 4
        )
