"""`_quant` directly: the type table, the read rule's tie-breaks, model hints and the write rule."""

from __future__ import annotations

import mlx.core as mx
import pytest

import asyncweights as aw
from asyncweights._quant import (
    Packed,
    canonical_type,
    model_hints,
    quant_params,
    quantize_array,
    resolve,
    should_quantize,
)

Q = aw.Quantization


def affine(wc: int, sc: int, scale_dtype: str = "BF16") -> Packed:
    """A packed affine weight of 64 rows: `wc` U32 words and `sc` scales (and biases) a row."""
    return Packed("U32", (64, wc), scale_dtype, (64, sc), (64, sc))


def fp(wc: int, sc: int, scale_dtype: str = "U8") -> Packed:
    return Packed("U32", (64, wc), scale_dtype, (64, sc), None)


@pytest.mark.parametrize(
    ("label", "canonical"),
    [("Q4", "int4"), ("int8", "int8"), (" FP8 ", "int8"), ("NVFP4", "nvfp4"), ("mxfp8", "mxfp8")],
)
def test_labels_map_to_canonical_types(label: str, canonical: str) -> None:
    assert canonical_type(label) == canonical


@pytest.mark.parametrize("label", [None, "", "bfloat16", "Q4_K_M", "int3"])
def test_other_labels_mean_not_quantized(label: str | None) -> None:
    assert canonical_type(label) is None


def test_the_table_gives_mode_bits_and_default_group() -> None:
    assert Q.of("int4") == Q("int4", "affine", 4, 64)
    assert Q.of("int8", 32) == Q("int8", "affine", 8, 32)
    assert Q.of("nvfp4") == Q("nvfp4", "nvfp4", 4, 16)
    assert Q.of("mxfp4") == Q("mxfp4", "mxfp4", 4, 32)
    assert Q.of("mxfp8") == Q("mxfp8", "mxfp8", 8, 32)


def test_ratio_8_ties_int4_group_64_against_int8_group_32() -> None:
    # 8 words and one scale a row: 64 4-bit values (group 64) or 32 8-bit ones (group 32).
    packed = affine(8, 1)
    assert resolve(packed, label=None, label_group=None, hint_bits=None) == Q(
        "int4", "affine", 4, 64
    )
    assert resolve(packed, label=None, label_group=None, hint_bits=4) == Q("int4", "affine", 4, 64)
    assert resolve(packed, label=None, label_group=None, hint_bits=8) == Q("int8", "affine", 8, 32)


def test_ratio_16_is_int8_unless_the_model_says_4_bits_and_group_128() -> None:
    packed = affine(16, 1)
    int8 = Q("int8", "affine", 8, 64)
    assert resolve(packed, label=None, label_group=None, hint_bits=None) == int8
    assert resolve(packed, label=None, label_group=None, hint_bits=4) == int8
    assert resolve(packed, label=None, label_group=None, hint_bits=4, hint_group=64) == int8
    int4 = Q("int4", "affine", 4, 128)
    assert resolve(packed, label=None, label_group=None, hint_bits=4, hint_group=128) == int4


def test_a_single_candidate_needs_no_hint() -> None:
    # 4 words, one scale: int4 group 32 (int8 group 16 is no affine group).
    assert resolve(affine(4, 1), label=None, label_group=None, hint_bits=8) == Q.of("int4", 32)


@pytest.mark.parametrize(
    ("words", "scales", "qtype"), [(8, 4, "nvfp4"), (8, 2, "mxfp4"), (8, 1, "mxfp8")]
)
def test_fp_modes_by_ratio_without_biases(words: int, scales: int, qtype: str) -> None:
    assert resolve(fp(words, scales), label=None, label_group=None, hint_bits=None) == Q.of(qtype)


def test_a_label_that_fits_wins_over_the_shape_rule() -> None:
    got = resolve(affine(8, 1), label="int8", label_group="32", hint_bits=4)
    assert got == Q("int8", "affine", 8, 32)


def test_a_label_that_does_not_fit_warns_and_the_shapes_decide() -> None:
    with pytest.warns(UserWarning, match=r"quantization label 'int8' \(group 64\) does not match"):
        got = resolve(affine(8, 1), label="int8", label_group="64", hint_bits=None)
    assert got == Q("int4", "affine", 4, 64)


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (Packed("F16", (64, 8), "BF16", (64, 1), (64, 1)), "packed weight must be U32, not F16"),
        (Packed("U32", (64, 8), "BF16", (32, 1), (32, 1)), "scales [32, 1] do not match"),
        (Packed("U32", (64, 8), "BF16", (64, 1), (64, 2)), "biases [64, 2] do not match"),
        (Packed("U32", (64, 8), "BF16", (64, 0), (64, 0)), "scales have a zero last dimension"),
        (fp(8, 1, "F16"), "no biases and F16 scales"),
        (affine(8, 1, "U8"), "affine scales must be floating point, not U8"),
        (affine(8, 3), "packed/scale ratio 8/3 fits no affine 4- or 8-bit group"),
        (fp(8, 3), "packed/scale ratio 8/3 fits no FP quantization"),
    ],
)
def test_shapes_that_fit_nothing_are_refused(packed: Packed, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve(packed, label=None, label_group=None, hint_bits=None)


def test_model_hints_from_model_index_and_config() -> None:
    assert model_hints({"quantization": "Q4", "group_size": 32}, "") == ("Q4", 32)
    # The config blob's canonical file_type wins over the index's label.
    assert model_hints({"quantization": "Q4", "group_size": 32}, "int8") == ("int8", 32)
    assert model_hints({"quantization": "bfloat16"}, "") == (None, None)
    assert model_hints({"group_size": 0}, "") == (None, None)
    assert model_hints({"group_size": "32"}, "") == (None, None)
    assert model_hints({"group_size": True}, "") == (None, None)
    assert model_hints(None, "nvfp4") == ("nvfp4", None)
    assert model_hints(["not", "an", "object"], "Q4_K_M") == (None, None)


def test_write_rule_parameters() -> None:
    assert quant_params("int4") == Q("int4", "affine", 4, 64)
    assert quant_params("int4", era="E0") == Q("int4", "affine", 4, 32)
    assert quant_params("int8", era="E0") == Q("int8", "affine", 8, 64)
    assert quant_params(("MXFP4", 64)) == Q("mxfp4", "mxfp4", 4, 64)
    with pytest.raises(ValueError, match="unknown quant type 'q3'"):
        quant_params("q3")


@pytest.mark.parametrize(
    ("name", "dtype", "shape", "expected"),
    [
        ("model.layers.0.mlp.up_proj.weight", "BF16", (128, 64), True),
        ("transformer/blocks.0.attn.to_q.weight", "F32", (64, 64), True),
        ("vae/decoder.conv.weight", "F32", (64, 64), False),
        ("model.embed_tokens.weight", "BF16", (128, 64), False),
        ("model.layers.0.input_layernorm.weight", "BF16", (64, 64), False),
        ("blocks.0.ln_1.weight", "BF16", (64, 64), False),
        ("model.layers.0.mlp.up_proj.bias", "BF16", (128, 64), False),
        ("model.layers.0.mlp.up_proj.weight", "I32", (128, 64), False),
        ("model.layers.0.mlp.up_proj.weight", "BF16", (64,), False),
        ("model.layers.0.mlp.up_proj.weight", "BF16", (128, 96), False),
    ],
)
def test_which_tensors_an_import_quantizes(
    name: str, dtype: str, shape: tuple[int, ...], expected: bool
) -> None:
    assert should_quantize(name, dtype, shape, 64) is expected


def test_quantize_array_packs_and_read_rule_reads_it_back() -> None:
    # What the writer produces, the reader's shape rule classifies as the same type.
    weight = mx.random.normal((64, 128), key=mx.random.key(1)).astype(mx.bfloat16)
    for q in (Q.of("int4"), Q.of("int8", 32), Q.of("mxfp8")):
        packed, scales, biases = quantize_array(weight, q)
        assert packed.dtype == mx.uint32
        assert (biases is None) == (q.mode != "affine")
        facts = Packed(
            "U32",
            tuple(packed.shape),
            "U8" if scales.dtype == mx.uint8 else "BF16",
            tuple(scales.shape),
            None if biases is None else tuple(biases.shape),
        )
        hint = q.bits if q.mode == "affine" else None
        assert resolve(facts, label=None, label_group=None, hint_bits=hint) == q
