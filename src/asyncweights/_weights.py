"""What a load produces: `Weights` (a mapping of names to MLX arrays) and `Tensor` items."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import msgspec

# Imported at run time, not only for mypy: typing.get_type_hints resolves these names.
from ._quant import Quantization

__all__ = ["ShardSlice", "Tensor", "TensorInfo", "Weights"]


class ShardSlice(msgspec.Struct, frozen=True):
    """The part of one tensor a rank holds.

    Attributes:
        full_shape: the tensor's shape in the blob.
        axis: the axis it is split on (non-negative).
        ranges: ``(start, stop)`` index ranges along `axis`, concatenated in this order (one
            per segment of a fused tensor).
    """

    full_shape: tuple[int, ...]
    axis: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the rank holds."""
        held = sum(hi - lo for lo, hi in self.ranges)
        return (*self.full_shape[: self.axis], held, *self.full_shape[self.axis + 1 :])

    def spans(self, itemsize: int) -> list[tuple[int, int]]:
        """``(offset, length)`` byte ranges from the tensor's first byte, in array order.

        Adjacent ranges are merged: a row split of a matrix is one span per segment.
        """
        outer = 1
        for d in self.full_shape[: self.axis]:
            outer *= d
        inner = itemsize
        for d in self.full_shape[self.axis + 1 :]:
            inner *= d
        size = self.full_shape[self.axis]
        out: list[tuple[int, int]] = []
        for o in range(outer):
            for lo, hi in self.ranges:
                offset, length = (o * size + lo) * inner, (hi - lo) * inner
                if out and out[-1][0] + out[-1][1] == offset:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                elif length:
                    out.append((offset, length))
        return out


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Facts about one loaded tensor.

    Attributes:
        name: the name in `Weights` (component prefix stripped).
        dtype: the MLX dtype of the loaded array (after any conversion).
        shape: the array's shape.
        nbytes: bytes of the loaded array.
        digest: the blob it came from.
        key: its key inside that blob (``"data"`` for E0 blobs; for GGUF blobs the array's
            GGUF name, or the ``.scales`` / ``.biases`` name of a converted block type).
        source_dtype: the safetensors dtype string stored in the blob, or for GGUF blobs
            the GGML type (``"Q4_K"``) the array was converted from.
        quantization: set on a packed quantized weight ``X`` (its companions are
            ``X_scale`` and ``X_qbias``; for GGUF, ``<base>.scales`` and ``<base>.biases``
            as ``mx.load`` names them, where ``X`` is ``<base>.weight``); None otherwise.
        companions: on a packed quantized weight, the names of its companions by role:
            ``"scales"``, ``"biases"`` (affine modes only) and ``"global_scale"`` (NVFP4's
            second-level float32 scale, ``X.global_scale`` as Ollama stores it). Companions
            keep their stored dtype whatever ``dtype=`` asks. Empty otherwise.
        shard: in a sharded load (``shard=``), the part of the tensor this rank holds: its
            full shape, the axis and the index ranges along it; None when held whole.
    """

    name: str
    dtype: mx.Dtype
    shape: tuple[int, ...]
    nbytes: int
    digest: str
    key: str
    source_dtype: str
    quantization: Quantization | None = None
    companions: Mapping[str, str] = field(default_factory=dict)
    shard: ShardSlice | None = None

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The tensor's shape in the model (`shape` unless this rank holds a slice)."""
        return self.shape if self.shard is None else self.shard.full_shape


@dataclass(frozen=True, slots=True)
class Tensor:
    """One evaluated tensor as `stream_weights` yields it."""

    name: str
    array: mx.array
    info: TensorInfo


class Weights(Mapping[str, "mx.array"]):
    """The tensors of one load: a read-only mapping of names to evaluated MLX arrays.

    Attributes:
        model: the model as the caller named it.
        component: the component loaded, or None for every tensor.
        info: a `TensorInfo` per name.
        quantization: the model-level quantization, or None when unquantized (for a GGUF
            model: the quantization holding the most tensor bytes).
        metadata: for a GGUF model, the GGUF metadata (``general.architecture``,
            hyperparameters; arrays such as the tokenizer's are `GGUFArray`, decoded only
            when read); None otherwise.
    """

    def __init__(
        self,
        arrays: dict[str, mx.array],
        info: dict[str, TensorInfo],
        *,
        model: str,
        component: str | None,
        quantization: Quantization | None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._arrays = arrays
        self.info = info
        self.model = model
        self.component = component
        self.quantization = quantization
        self.metadata = metadata

    def __getitem__(self, name: str) -> mx.array:
        try:
            return self._arrays[name]
        except KeyError:
            if not self._arrays and self.info:
                raise KeyError(f"{name!r}: weights were released") from None
            raise

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        part = f", component={self.component!r}" if self.component else ""
        return f"<Weights {self.model!r}{part}: {len(self)} tensors, {self.nbytes} bytes>"

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(a.nbytes for a in self._arrays.values())

    def release(self) -> None:
        """Drop every array reference so MLX can free the memory (the info stays)."""
        self._arrays = {}

    def dequantize(self, name: str, *, dtype: mx.Dtype | None = None) -> mx.array:
        """The float values of a packed quantized weight, from its facts and companions.

        ``mx.dequantize(w[X], w[scales], w.get(biases), group_size=q.group_size, bits=q.bits,
        mode=q.mode)`` with ``q = w.info[X].quantization`` and the companions named by
        ``w.info[X].companions``; an NVFP4 weight with a ``global_scale`` is then multiplied
        by it (per tensor, or per output row when it is a vector) and cast back to the
        dequantized dtype, as Ollama's MLX runner applies it
        (``x/mlxrunner/mlx/ops_extra.go`` ``Dequantize`` at ollama ``fb3076099``).
        A tensor that is not quantized is returned as it is.

        Args:
            name: the packed weight ``X``.
            dtype: the output dtype (MLX's default: that of the scales).

        Raises:
            KeyError: no tensor of that name, or a companion that was not loaded.
        """
        import mlx.core as mx

        info = self.info[name]
        q = info.quantization
        if q is None:
            return self[name]
        roles = info.companions
        biases = self[roles["biases"]] if "biases" in roles else None
        out = mx.dequantize(
            self[name], self[roles["scales"]], biases, group_size=q.group_size, bits=q.bits,
            mode=q.mode, dtype=dtype,
        )  # fmt: skip
        if "global_scale" in roles:
            scale = self[roles["global_scale"]]
            if scale.size > 1:
                scale = scale.reshape(scale.size, 1)
            out = (out * scale).astype(out.dtype)
        return out

    def for_mlx_nn(self) -> dict[str, mx.array]:
        """The tensors named as `mlx.nn` modules name their parameters.

        A packed weight ``<path>.weight`` stays ``<path>.weight``; its scales become
        ``<path>.scales`` and its biases ``<path>.biases``, the parameters of
        ``nn.QuantizedLinear``, ``nn.QuantizedEmbedding`` and mlx-lm's switch layers; an NVFP4
        global scale becomes ``<path>.global_scale`` (no `mlx.nn` module has it: fold it in
        with `dequantize`, or load with ``strict=False``). Every other tensor keeps its
        name. So ``model.load_weights(list(w.for_mlx_nn().items()))`` loads a model whose
        quantized layers were made with ``nn.quantize`` with the same group size, bits and
        mode.

        Returns:
            a new dict; the arrays are shared, not copied.
        """
        out: dict[str, mx.array] = {}
        renamed: dict[str, str] = {}
        for name, info in self.info.items():
            if info.quantization is None or not info.companions:
                continue
            base = name.removesuffix(".weight")
            for role, companion in info.companions.items():
                renamed[companion] = f"{base}.{role}"
        for name, array in self._arrays.items():
            out[renamed.get(name, name)] = array
        return out
