"""What a load produces: `Weights` (a mapping of names to MLX arrays) and `Tensor` items."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlx.core as mx

    from ._quant import Quantization

__all__ = ["Tensor", "TensorInfo", "Weights"]


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
    """

    name: str
    dtype: mx.Dtype
    shape: tuple[int, ...]
    nbytes: int
    digest: str
    key: str
    source_dtype: str
    quantization: Quantization | None = None


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
