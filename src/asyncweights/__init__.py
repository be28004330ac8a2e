"""asyncweights: load model weights from Ollama-style stores into MLX arrays, from async code.

import asyncweights as aw
weights = await aw.load_weights("z-image", "transformer")
"""

from __future__ import annotations

import typing as _typing

from ._cache import CacheEntry as CacheEntry
from ._cache import CacheKey as CacheKey
from ._cache import CacheStats as CacheStats
from ._cache import WeightCache as WeightCache
from ._errors import AsyncWeightsError as AsyncWeightsError
from ._errors import BlobError as BlobError
from ._errors import BlobMissingError as BlobMissingError
from ._errors import BudgetError as BudgetError
from ._errors import ComponentNotFoundError as ComponentNotFoundError
from ._errors import ConfigNotFoundError as ConfigNotFoundError
from ._errors import DigestMismatchError as DigestMismatchError
from ._errors import DuplicateTensorError as DuplicateTensorError
from ._errors import HeaderError as HeaderError
from ._errors import InvalidDigestError as InvalidDigestError
from ._errors import InvalidNameError as InvalidNameError
from ._errors import LoadError as LoadError
from ._errors import ManifestError as ManifestError
from ._errors import ModelExistsError as ModelExistsError
from ._errors import ModelNotFoundError as ModelNotFoundError
from ._errors import PreconditionFailedError as PreconditionFailedError
from ._errors import QuantizationError as QuantizationError
from ._errors import RegistryAuthError as RegistryAuthError
from ._errors import RegistryError as RegistryError
from ._errors import RegistryNotFoundError as RegistryNotFoundError
from ._errors import RegistryServerError as RegistryServerError
from ._errors import ShardError as ShardError
from ._errors import SizeMismatchError as SizeMismatchError
from ._errors import SourceError as SourceError
from ._errors import StoreWriteError as StoreWriteError
from ._errors import UnsupportedDTypeError as UnsupportedDTypeError
from ._errors import UnsupportedModelError as UnsupportedModelError
from ._gguf import GGUFArray as GGUFArray
from ._import import import_model as import_model
from ._limits import Limits as Limits
from ._load import load_weights as load_weights
from ._load import stream_weights as stream_weights
from ._manifest import Layer as Layer
from ._manifest import Manifest as Manifest
from ._manifest import ManifestList as ManifestList
from ._manifest import ManifestRef as ManifestRef
from ._manifest import ModelConfig as ModelConfig
from ._names import ModelName as ModelName
from ._progress import Progress as Progress
from ._progress import ProgressCallback as ProgressCallback
from ._pull import pull as pull
from ._quant import Quantization as Quantization
from ._remove import Removal as Removal
from ._remove import remove_model as remove_model
from ._shard import Shard as Shard
from ._shard import check_shards as check_shards
from ._store import Model as Model
from ._store import ModelStore as ModelStore
from ._version import __version__ as __version__
from ._weights import ShardSlice as ShardSlice
from ._weights import Tensor as Tensor
from ._weights import TensorInfo as TensorInfo
from ._weights import Weights as Weights

__all__ = [
    "AsyncWeightsError",
    "BlobError",
    "BlobMissingError",
    "BudgetError",
    "CacheEntry",
    "CacheKey",
    "CacheStats",
    "ComponentNotFoundError",
    "ConfigNotFoundError",
    "DigestMismatchError",
    "DuplicateTensorError",
    "GGUFArray",
    "HeaderError",
    "InvalidDigestError",
    "InvalidNameError",
    "Layer",
    "Limits",
    "LoadError",
    "Manifest",
    "ManifestError",
    "ManifestList",
    "ManifestRef",
    "Model",
    "ModelConfig",
    "ModelExistsError",
    "ModelName",
    "ModelNotFoundError",
    "ModelStore",
    "PreconditionFailedError",
    "Progress",
    "ProgressCallback",
    "Quantization",
    "QuantizationError",
    "RegistryAuthError",
    "RegistryError",
    "RegistryNotFoundError",
    "RegistryServerError",
    "Removal",
    "Shard",
    "ShardError",
    "ShardSlice",
    "SizeMismatchError",
    "SourceError",
    "StoreWriteError",
    "Tensor",
    "TensorInfo",
    "UnsupportedDTypeError",
    "UnsupportedModelError",
    "WeightCache",
    "Weights",
    "check_shards",
    "import_model",
    "load_weights",
    "pull",
    "remove_model",
    "stream_weights",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("asyncweights."):
        if isinstance(_obj, type) and "__annotations__" in vars(_obj):
            # typing.get_type_hints resolves a class's string annotations in the module its
            # __module__ names: resolve them now, in the module that defines them, so that
            # they still resolve once the class says it lives in the package.
            _hints = _typing.get_type_hints(_obj, include_extras=True)
            _obj.__annotations__ = {k: _hints[k] for k in vars(_obj)["__annotations__"]}
        _obj.__module__ = "asyncweights"
del _name, _obj, _hints, _typing
