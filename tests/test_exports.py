"""The public surface, pinned: ``__all__`` of `asyncweights` and `asyncweights.testing`, and
where each public name says it lives."""

from __future__ import annotations

import inspect
import typing

import mlx.core as mx

import asyncweights as aw
import asyncweights.testing as testing

PACKAGE = [
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

TESTING = [
    "BuiltModel",
    "Era",
    "Layer",
    "LayoutName",
    "MetadataStyle",
    "RawTensor",
    "StoreBuilder",
    "default_policy",
    "quant_params",
    "quantize_array",
    "random_array",
    "random_weights",
]


def test_package_all_is_pinned_and_sorted() -> None:
    assert aw.__all__ == PACKAGE
    assert sorted(aw.__all__) == aw.__all__
    for name in aw.__all__:
        assert hasattr(aw, name), name


def test_testing_all_is_pinned_and_sorted() -> None:
    assert testing.__all__ == TESTING
    assert sorted(testing.__all__) == testing.__all__
    for name in testing.__all__:
        assert hasattr(testing, name), name


def _defined(obj: object) -> bool:
    """Classes and functions carry a module of their own; type aliases do not."""
    return inspect.isclass(obj) or inspect.isfunction(obj)


def test_public_names_say_they_live_in_the_package() -> None:
    for name in aw.__all__:
        obj = getattr(aw, name)
        if _defined(obj):
            assert obj.__module__ == "asyncweights", name


def test_testing_names_are_its_own_or_the_package_objects() -> None:
    # A name testing shares with the package is the package's own object (aw.Layer is
    # testing.Layer); nothing of the writer's internals hides behind a package name.
    for name in testing.__all__:
        obj = getattr(testing, name)
        if name in aw.__all__:
            assert obj is getattr(aw, name), name
        elif _defined(obj):
            assert obj.__module__ == "asyncweights.testing", name
    assert testing.Layer is aw.Layer
    assert not hasattr(testing, "Tensor")
    assert not hasattr(testing, "QuantParams")


def test_what_public_functions_take_and_return_is_exported() -> None:
    # The types in the signatures of the cache and the loaders are reachable from `aw`.
    stats = typing.get_type_hints(vars(aw.WeightCache)["stats"].fget)["return"]
    entries = typing.get_type_hints(aw.WeightCache.entries)["return"]
    assert stats is aw.CacheStats
    assert typing.get_args(entries) == (aw.CacheEntry,)
    assert typing.get_type_hints(aw.CacheEntry)["key"] is aw.CacheKey
    hints = typing.get_type_hints(aw.load_weights)
    assert hints["on_progress"] == aw.ProgressCallback | None


def _public_callables() -> list[tuple[str, object]]:
    """Every public class and function of `aw`, and every function defined in those classes
    (methods, properties' getters, static and class methods)."""
    found: list[tuple[str, object]] = []
    for name in aw.__all__:
        obj = getattr(aw, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # a type alias such as ProgressCallback
        found.append((name, obj))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if isinstance(member, property):
                    member = member.fget
                elif isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    found.append((f"{name}.{attr}", member))
    return found


def test_get_type_hints_resolves_every_public_class_and_function() -> None:
    # Public classes say they live in `asyncweights`; typing.get_type_hints resolves a
    # class's annotations in that module, a function's in the module that defines it.
    failed = {}
    for name, obj in _public_callables():
        try:
            typing.get_type_hints(obj, include_extras=True)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    assert failed == {}
    checked = dict(_public_callables())
    assert {"CacheEntry", "TensorInfo", "Weights.dequantize", "check_shards"} <= set(checked)
    hints = typing.get_type_hints(aw.TensorInfo)
    assert hints["dtype"] is mx.Dtype
    assert hints["quantization"] == aw.Quantization | None
    assert typing.get_type_hints(aw.check_shards)["weights"] is aw.Weights
