"""`_header`'s dtype table against what MLX itself loads."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from asyncweights._header import DTYPE_SIZES, DTYPES, FLOAT_DTYPES, dtype_name
from asyncweights._writer import RawTensor, encode_safetensors


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_each_dtype_loads_in_mlx_as_the_table_says(tmp_path: Path, name: str) -> None:
    kind = DTYPES[name]
    data = bytes(range(1, 1 + 4 * kind.size)) if name != "BOOL" else b"\x01\x00\x01\x01"
    path = tmp_path / "t.safetensors"
    path.write_bytes(encode_safetensors([RawTensor("t", name, (4,), data)], style="go"))
    loaded = mx.load(str(path))
    assert isinstance(loaded, dict)
    array = loaded["t"]
    assert array.dtype == kind.mlx
    assert array.dtype.size == kind.size == DTYPE_SIZES[name]
    assert bytes(memoryview(array)) == data  # type: ignore[arg-type, unused-ignore]
    assert memoryview(data).cast(kind.format).itemsize == kind.size


def test_floating_dtypes() -> None:
    assert frozenset({"F16", "BF16", "F32"}) == FLOAT_DTYPES
    for name in FLOAT_DTYPES:
        assert mx.issubdtype(DTYPES[name].mlx, mx.floating)


def test_dtype_names_of_mlx_dtypes() -> None:
    assert dtype_name(mx.bfloat16) == "BF16"
    assert dtype_name(mx.uint8) == "U8"  # not an FP8 kind, which MLX also loads as uint8
    assert dtype_name(mx.complex64) == "C64"
    with pytest.raises(ValueError, match="has no safetensors name MLX can load"):
        dtype_name(mx.float64)
