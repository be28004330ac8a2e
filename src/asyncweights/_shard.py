"""Loading across machines: which part of each tensor one rank of a distributed group holds.

A `Shard` is one rank's plan. Its rules follow ``mlx.nn.layers.distributed`` (mlx
``python/mlx/nn/layers/distributed.py`` at 0.32): an ``"all-to-sharded"`` layer splits its
weight on axis ``max(ndim - 2, 0)`` (the output rows; the ``out`` axis of stacked experts
``[E, out, in]``) and its bias on the last axis; a ``"sharded-to-all"`` layer splits its
weight on the last axis (the input columns) and keeps its bias whole; fused layers split each
segment on its own (``segments``, as ``shard_linear`` takes them). A packed quantized weight's
scales and biases follow the weight. Everything else is replicated.

Each split becomes byte ranges of the blob (`ShardSlice.spans`): one contiguous span per
segment for a row split of a matrix, one per expert (and segment) for stacked experts, one
per row for a column split. The planner keeps the spans and the reader (`_read.read_shard`)
reads them straight into the rank's MLX arrays, so a rank reads about ``1/world`` of every
split tensor instead of the whole tensor (mlx-lm's way: lazy ``mx.load`` then a slice, which
makes MLX's ``Load`` primitive read the whole tensor first).

A pipeline `Shard` (`Shard.pipeline`) keeps a contiguous range of layers whole; the blobs of
the other layers are never opened.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import msgspec

from ._errors import AsyncWeightsError, ShardError
from ._header import DTYPES
from ._limits import Limits
from ._plan import Plan, group_blobs
from ._read import files_per_group
from ._store import Model
from ._weights import ShardSlice, Weights

__all__ = ["DEFAULT_RULES", "Shard", "ShardSlice", "Sharding", "check_shards"]

#: How a layer is split, in ``mlx.nn.layers.distributed``'s terms, or kept whole.
Sharding: TypeAlias = Literal["all-to-sharded", "sharded-to-all", "replicate"]
#: Segments of a fused layer, as ``shard_linear`` takes them: a count of equal parts, split
#: indices (ints) or fractions of the axis (floats).
Segments: TypeAlias = int | Sequence[int] | Sequence[float]
Rule: TypeAlias = Sharding | tuple[Sharding, Segments]

#: The defaults: the layer names of the common transformer layout (Llama, Qwen, Mistral,
#: Gemma, mlx-lm's ``switch_mlp`` experts), sharded as mlx-lm's ``shard`` methods do.
DEFAULT_RULES: tuple[tuple[str, Rule], ...] = (
    ("qkv_proj", ("all-to-sharded", 3)),
    ("gate_up_proj", ("all-to-sharded", 2)),
    ("q_proj", "all-to-sharded"),
    ("k_proj", "all-to-sharded"),
    ("v_proj", "all-to-sharded"),
    ("gate_proj", "all-to-sharded"),
    ("up_proj", "all-to-sharded"),
    ("o_proj", "sharded-to-all"),
    ("down_proj", "sharded-to-all"),
)

_LAYER = re.compile(r"(?:^|[./])(?:layers|blocks|h)\.(\d+)(?=[./]|$)")
_KINDS = ("all-to-sharded", "sharded-to-all", "replicate")


class Shard:
    """One rank's part of a model: which tensors it loads and which slice of each.

    Args:
        rank: this rank, ``0 <= rank < world``.
        world: the number of ranks.
        rules: tensor-parallel rules by pattern, tried in order before `DEFAULT_RULES` (when
            `defaults`): a pattern (``fnmatch``) matches a layer's path (the tensor name less
            ``.weight`` / ``.bias``; a packed weight's scales and biases use the weight's) in
            full or as its last components (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``). A rule is ``"all-to-sharded"``,
            ``"sharded-to-all"``, ``"replicate"`` or ``(rule, segments)`` for a fused layer
            (``("all-to-sharded", [q, q + kv])`` for a GQA ``qkv_proj``).
        defaults: also use `DEFAULT_RULES` after `rules`.
        layers: a pipeline stage instead: load only the layers in this range (whole), plus
            the tensors outside any layer (embeddings, final norm, head). Layer numbers come
            from ``layers.N.`` / ``blocks.N.`` / ``h.N.`` in the names; manifest layers of
            other layers are skipped before their blobs are opened.

    Raises:
        ValueError: a rank outside the world, an unknown rule, or bad segments.
    """

    __slots__ = ("_rules", "defaults", "layers", "rank", "world")

    def __init__(
        self,
        rank: int,
        world: int,
        *,
        rules: Mapping[str, Rule] | Sequence[tuple[str, Rule]] | None = None,
        defaults: bool = True,
        layers: range | tuple[int, int] | None = None,
    ) -> None:
        if type(world) is not int or world < 1:
            raise ValueError(f"world must be a positive int, not {world!r}")
        if type(rank) is not int or not 0 <= rank < world:
            raise ValueError(f"rank must be an int in [0, {world}), not {rank!r}")
        items = list(rules.items()) if isinstance(rules, Mapping) else list(rules or ())
        parsed: list[tuple[str, Sharding, Segments]] = []
        for pattern, rule in [*items, *(DEFAULT_RULES if defaults else ())]:
            kind, segments = (rule, 1) if isinstance(rule, str) else rule
            if kind not in _KINDS:
                raise ValueError(f"rule for {pattern!r}: {kind!r} is not one of {_KINDS}")
            if isinstance(segments, int) and segments < 1:
                raise ValueError(f"rule for {pattern!r}: segments must be positive")
            parsed.append((pattern, kind, segments))
        if layers is not None and not isinstance(layers, range):
            layers = range(*layers)
        self.rank = rank
        self.world = world
        self.defaults = defaults
        self.layers: range | None = layers
        self._rules = tuple(parsed)

    @classmethod
    def from_group(cls, group: Any = None, **options: Any) -> Shard:
        """The shard of this process's rank in an ``mx.distributed`` group (the global group
        when None); `options` as for `Shard`."""
        import mlx.core as mx

        group = group or mx.distributed.init()
        return cls(group.rank(), group.size(), **options)

    @classmethod
    def pipeline(cls, rank: int, world: int, num_layers: int) -> Shard:
        """A pipeline stage: rank ``r`` of ``world`` takes a contiguous run of the
        ``num_layers`` layers, in order; the first ``num_layers % world`` ranks one more."""
        if type(world) is not int or world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank!r} is not in a world of {world!r}")
        base, extra = divmod(num_layers, world)
        start = rank * base + min(rank, extra)
        return cls(
            rank,
            world,
            defaults=False,
            rules=[("*", "replicate")],
            layers=range(start, start + base + (rank < extra)),
        )

    def __repr__(self) -> str:
        stage = "" if self.layers is None else f", layers={self.layers!r}"
        return f"Shard(rank={self.rank}, world={self.world}{stage})"

    @property
    def key(self) -> str:
        """A text that identifies the plan (for caches): equal plans, equal keys."""
        text = repr((self.rank, self.world, self._rules, self.layers))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # --------------------------------------------------------------------- pipeline stages

    def keeps(self, name: str) -> bool:
        """Whether a tensor (or a manifest layer) of this name belongs to this stage."""
        if self.layers is None:
            return True
        found = _LAYER.search(name)
        return found is None or int(found.group(1)) in self.layers

    # ----------------------------------------------------------------------- tensor splits

    def rule(self, path: str) -> tuple[Sharding, Segments]:
        """The rule for a layer path (first match: `rules`, then the defaults)."""
        for pattern, kind, segments in self._rules:
            if (
                fnmatch.fnmatchcase(path, pattern)
                or fnmatch.fnmatchcase(path, "*." + pattern)
                or fnmatch.fnmatchcase(path, "*/" + pattern)
            ):
                return kind, segments
        return "replicate", 1

    def slice_for(
        self, name: str, shape: tuple[int, ...], *, owner: str | None = None
    ) -> ShardSlice | None:
        """The slice of tensor `name` (full `shape`) this rank holds; None when whole.

        Args:
            owner: for a packed weight's companion (scales, biases), the weight's name: the
                companion is split as the weight is.

        Raises:
            ShardError: the axis (or a segment) does not divide by the world size.
        """
        if self.world == 1:
            return None
        base = owner or name
        is_bias = owner is None and name.endswith(".bias")
        path = base.removesuffix(".weight").removesuffix(".bias")
        kind, segments = self.rule(path)
        if kind == "replicate" or not shape:
            return None
        if kind == "sharded-to-all":
            if is_bias or (owner is not None and len(shape) < 2):
                return None
            axis = len(shape) - 1
        else:
            axis = len(shape) - 1 if is_bias else max(len(shape) - 2, 0)
        size = shape[axis]
        ranges = []
        for lo, hi in _segments(size, segments, name):
            if (hi - lo) % self.world:
                what = "axis" if (lo, hi) == (0, size) else f"segment [{lo}, {hi}) of axis"
                raise ShardError(
                    f"{what} {axis} of shape {list(shape)} does not split into {self.world} "
                    f"equal parts ({kind})",
                    tensor=name,
                )
            part = (hi - lo) // self.world
            ranges.append((lo + self.rank * part, lo + (self.rank + 1) * part))
        return ShardSlice(tuple(shape), axis, tuple(ranges))

    # ------------------------------------------------------------------------- planning

    def select_layers(self, model: Model) -> Model:
        """`model` with only the manifest layers of this stage (the others never opened)."""
        if self.layers is None:
            return model
        kept = [
            layer
            for layer in model.manifest.layers
            if not layer.is_tensor or not layer.name or self.keeps(layer.name)
        ]
        manifest = msgspec.structs.replace(model.manifest, layers=kept)
        return Model(model.store, manifest, label=model.label, path=None, digest=model.digest)

    def apply(self, plan: Plan, limits: Limits) -> None:
        """Cut `plan` to this rank: drop other stages' tensors, give each split tensor its
        slice, and regroup by the bytes now read.

        Raises:
            ShardError: a GGUF model, a split that does not divide, or a column split of a
                quantized weight that cuts a quantization group (before any tensor is read).
        """
        owners: dict[str, str] = {}
        for blob in plan.blobs:
            if blob.gguf is not None:
                raise ShardError(
                    "sharded loads read safetensors blobs; this is a GGUF model",
                    model=plan.model,
                    digest=blob.digest,
                )
            for t in blob.tensors:
                for companion in (t.companions or {}).values():
                    owners[companion] = t.name
        blobs = []
        for blob in plan.blobs:
            blob.tensors = [t for t in blob.tensors if self.keeps(t.name)]
            if not blob.tensors:
                continue
            blob.sharded = True
            blob.data = None
            nbytes = 0
            for t in blob.tensors:
                try:
                    t.slice = self.slice_for(t.name, t.entry.shape, owner=owners.get(t.name))
                    if t.slice is not None and t.quantization is not None:
                        _check_groups(t.name, t.slice, t.quantization.bits, t.quantization)
                except AsyncWeightsError as exc:
                    exc.add_context(model=plan.model, digest=blob.digest, path=blob.path)
                    raise
                itemsize = DTYPES[t.entry.dtype].size
                nbytes += sum(n for _, n in t.slice.spans(itemsize)) if t.slice else t.entry.nbytes
            blob.nbytes = nbytes
            blobs.append(blob)
        plan.blobs = blobs
        plan.groups = group_blobs(blobs, limits, files_per_group(limits))


def _segments(size: int, segments: Segments, name: str) -> list[tuple[int, int]]:
    """``(lo, hi)`` of each segment of an axis of `size`, as mlx's ``_split`` cuts it."""
    if isinstance(segments, int):
        if size % segments:
            raise ShardError(f"axis of {size} does not split into {segments} segments", tensor=name)
        step = size // segments
        return [(i * step, (i + 1) * step) for i in range(segments)]
    points = [int(s * size) if isinstance(s, float) else int(s) for s in segments]
    bounds = [0, *points, size]
    if any(a > b for a, b in itertools.pairwise(bounds)):
        raise ShardError(f"segments {list(segments)} are not in order for {size}", tensor=name)
    return list(itertools.pairwise(bounds))


def _check_groups(name: str, piece: ShardSlice, bits: int, q: Any) -> None:
    """A column split of a packed weight must cut on whole quantization groups."""
    if piece.axis != len(piece.full_shape) - 1:
        return
    for lo, hi in piece.ranges:
        for edge in (lo, hi):
            bits_in = edge * 32  # packed words of 32 bits
            if bits_in % bits or (bits_in // bits) % q.group_size:
                raise ShardError(
                    f"column split at packed word {edge} (input column {bits_in / bits:g}) "
                    f"cuts a quantization group (group_size {q.group_size}, {bits} bits): "
                    f"input columns per rank must be a multiple of the group size",
                    tensor=name,
                )


# -------------------------------------------------------------------------- check_shards

_WIDTH = 8  # dims recorded per shape
_RECORD = 2 + 2 + 2 + 1 + _WIDTH + _WIDTH + 3


def check_shards(group: Any, weights: Weights) -> None:
    """Check that every rank of `group` loaded the same model, split the same way.

    The ranks all-gather, per tensor: a hash of its name, of its blob digest, of its bytes,
    its shape, its full shape and the slice it holds. Every rank must hold the same names
    from the same blobs with the same full shapes; a replicated tensor must have the same
    bytes everywhere; a split tensor's slice must be the rank's own part (its shape, and the
    part of the rank at its position in the group). A collective call: every rank calls it.
    It checks tensor-parallel loads; pipeline stages hold different tensors by design.

    Raises:
        ShardError: naming the first tensor that differs, and the ranks.
    """
    import mlx.core as mx

    size, rank = group.size(), group.rank()
    names = sorted(weights.info)
    count = mx.distributed.all_gather(mx.array([len(names)], dtype=mx.int64), group=group)
    counts: list[int] = count.tolist()  # type: ignore[assignment]
    records = [_record(name, weights) for name in names]
    if len(set(counts)) != 1:
        # Learn which names differ: gather name hashes, padded to the largest count.
        most = max(counts)
        hashes = [r[:2] for r in records] + [[0, 0]] * (most - len(records))
        got: list[list[int]] = mx.distributed.all_gather(  # type: ignore[assignment]
            mx.array(hashes, dtype=mx.int64), group=group
        ).tolist()
        held = {tuple(r[:2]): n for r, n in zip(records, names, strict=True)}
        for other in range(size):
            seen = {tuple(h) for h in got[other * most : other * most + counts[other]]}
            for key, name in held.items():
                if key not in seen:
                    raise ShardError(
                        f"rank {rank} holds this tensor and rank {other} does not "
                        f"({counts[rank]} against {counts[other]} tensors)",
                        model=weights.model,
                        tensor=name,
                    )
        raise ShardError(f"ranks hold different numbers of tensors: {counts}", model=weights.model)
    table = mx.distributed.all_gather(
        mx.array(records or [[0] * _RECORD], dtype=mx.int64), group=group
    )
    rows: list[list[int]] = table.tolist()  # type: ignore[assignment]
    n = max(1, len(names))
    for i, name in enumerate(names):
        mine = records[i]
        for other in range(size):
            theirs = rows[other * n + i]
            problem = _compare(mine, theirs, rank, other, size)
            if problem:
                raise ShardError(problem, model=weights.model, tensor=name)


def _h(text: bytes) -> list[int]:
    d = hashlib.blake2b(text, digest_size=8).digest()
    return [int.from_bytes(d[:4], "little"), int.from_bytes(d[4:], "little")]


def _record(name: str, weights: Weights) -> list[int]:
    import mlx.core as mx

    info = weights.info[name]
    array = weights[name]
    raw = mx.contiguous(array.reshape(-1)).view(mx.uint8)
    mx.eval(raw)
    data = bytes(memoryview(raw))  # type: ignore[arg-type, unused-ignore]
    piece = info.shard
    full = info.full_shape
    held = info.shape
    if len(full) > _WIDTH:
        full = (*full[: _WIDTH - 1], _prod(full[_WIDTH - 1 :]))
        held = (*held[: _WIDTH - 1], _prod(held[_WIDTH - 1 :]))
    pad = [-1] * _WIDTH
    axis = -1 if piece is None else piece.axis
    start = -1 if piece is None else piece.ranges[0][0]
    width = -1 if piece is None else piece.ranges[0][1] - piece.ranges[0][0]
    return [
        *_h(name.encode()),
        *_h(info.digest.encode()),
        *_h(data),
        len(info.full_shape),
        *(list(held) + pad)[:_WIDTH],
        *(list(full) + pad)[:_WIDTH],
        axis,
        start,
        width,
    ]


def _prod(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _compare(mine: list[int], theirs: list[int], rank: int, other: int, size: int) -> str:
    if mine[:2] != theirs[:2]:
        return f"rank {rank} and rank {other} hold different tensors at this position"
    if mine[2:4] != theirs[2:4]:
        return f"rank {rank} and rank {other} read it from different blobs (model versions)"
    full = slice(7 + _WIDTH, 7 + 2 * _WIDTH)
    if mine[full] != theirs[full]:
        return (
            f"full shape differs: rank {rank} {_dims(mine[full])}, "
            f"rank {other} {_dims(theirs[full])}"
        )
    axis, width = mine[-3], mine[-1]
    if axis != theirs[-3]:
        return f"rank {rank} splits it on axis {axis}, rank {other} on axis {theirs[-3]}"
    if axis < 0:
        if mine[4:6] != theirs[4:6]:
            return f"replicated tensor differs between rank {rank} and rank {other}"
        return ""
    held = slice(7, 7 + _WIDTH)
    if mine[held] != theirs[held]:
        return f"rank {rank} holds shape {_dims(mine[held])}, rank {other} {_dims(theirs[held])}"
    # The first segment starts at 0, so rank k's part starts at k times its width.
    if theirs[-1] != width or theirs[-2] != other * width:
        return (
            f"rank {other} holds the wrong part: it starts at {theirs[-2]} on axis {axis}, "
            f"rank {other}'s part starts at {other * width}"
        )
    return ""


def _dims(values: list[int]) -> list[int]:
    return [v for v in values if v >= 0]
