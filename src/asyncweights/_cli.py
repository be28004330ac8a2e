"""The command line: demo, ls, show, load, verify, import and pull, with progress bars.

Each command is a coroutine run with ``anyio.run``; it returns its result as a dict (printed
as JSON with ``--json``) and as text lines, both printed only once it has finished, so an
interrupted command prints nothing but its progress bar, which is cleared. Progress goes to
stderr through tqdm, shown when stdout and stderr are terminals or with ``--progress``.

MODEL arguments: a model name (Ollama's grammar), or a manifest file given as a path that
starts with ``/``, ``./``, ``../`` or ``~`` (no model name can start so). Every name, path
and message printed has its non-printable characters escaped (``\\x1b``, ``\\u202e`` …), so a
hostile model or tensor name cannot drive the terminal.

Exit codes: 0 success, 1 an asyncweights error (one ``error: ...`` line) or a failed check,
2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import math
import os
import resource
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import anyio
import anyio.to_thread
import mlx.core as mx
import msgspec

from ._errors import AsyncWeightsError, BlobMissingError, InvalidNameError, first_error
from ._files import open_file
from ._gguf import read_gguf_header
from ._limits import Limits
from ._load import load_weights, make_plan
from ._names import ModelName
from ._plan import Plan
from ._progress import Progress
from ._shard import Shard, check_shards
from ._store import Model, ModelStore, child_runner_of
from ._version import __version__

__all__ = ["main", "run"]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_UNITS = {
    "": 1, "b": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3, "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
}  # fmt: skip
_DTYPES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16", "f16": "float16", "fp16": "float16",
    "float16": "float16", "f32": "float32", "fp32": "float32", "float32": "float32",
}  # fmt: skip
_json = msgspec.json.Encoder()

Command = Callable[[argparse.Namespace, "Output"], Awaitable["Result"]]


@dataclass
class Result:
    """What a command prints when it has finished, and its exit status."""

    data: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    status: int = 0
    errors: list[str] = field(default_factory=list)


def parse_size(text: str) -> int:
    """Parse ``512MiB``, ``1GiB``, ``64M`` or a byte count; binary units unless ``MB``/``GB``."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number) :]
    try:
        size = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (try 512MiB or 1GiB)") from None
    if not 0 < size < 1 << 50:
        raise argparse.ArgumentTypeError(f"size {text!r} out of range")
    return int(size)


def model_ref(text: str) -> str | Path:
    """A MODEL argument: a manifest path when it starts with ``/``, ``./``, ``../`` or ``~``
    (no model name can), else a model name."""
    if text in (".", "..", "~") or text.startswith(("/", "./", "../", "~")):
        return Path(text).expanduser()
    return text


def printable(text: str) -> str:
    """`text` with every non-printable character escaped as Python writes it (``\\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _printable_json(text: str) -> str:
    """JSON text with non-printable characters (C1 controls, bidi overrides …) as ``\\uXXXX``.

    Outside strings JSON text is printable ASCII and whitespace, so only string contents
    change, and they decode to the same values.
    """
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable() or c in "\n ":
            out.append(c)
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            code = ord(c) - 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    return "".join(out)


def format_bytes(n: float) -> str:
    """``536870912`` → ``512.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class Output:
    """Where a command's progress and results go: a tqdm bar on a terminal, else nothing."""

    def __init__(self, *, json: bool, progress: bool | None) -> None:
        self.json = json
        if progress is None:
            progress = not json and sys.stdout.isatty() and sys.stderr.isatty()
        self.progress = progress
        self._bar: Any = None
        self._pulling = False

    def start(self, description: str, total: float, *, unit: str = "B") -> None:
        """Show a bar (replacing any bar still shown)."""
        self.clear()
        if not self.progress:
            return
        from tqdm import tqdm  # type: ignore[import-untyped]

        scaled = unit == "B"
        size = shutil.get_terminal_size()
        self._bar = tqdm(
            total=total, desc=printable(description), unit=unit, unit_scale=scaled,
            unit_divisor=1024 if scaled else 1000, file=sys.stderr, leave=False,
            # A terminal that reports a 0x0 size (a fresh pty) would hide the bar.
            ncols=size.columns, nrows=size.lines, mininterval=0.1, smoothing=0.3,
        )  # fmt: skip

    def update(self, completed: float, total: float | None = None) -> None:
        bar = self._bar
        if bar is None:
            return
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = completed
        bar.refresh()

    async def on_progress(self, event: Progress) -> None:
        """A load progress callback: it runs on the event loop, so updates are cheap.

        While a pull is under way (``load --pull``) the bar follows the download, the slower
        of the two; the load's own events take over once every blob is in.
        """
        if event.phase == "pulling":
            self._pulling = event.total_tensors == 0 or event.completed_bytes < event.total_bytes
        elif self._pulling:
            return
        self.update(event.completed_bytes, event.total_bytes)

    def clear(self) -> None:
        """Remove the bar from the terminal."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def emit(self, result: Result) -> int:
        """Print the finished result (JSON or text) and return the exit status."""
        self.clear()
        if self.json:
            text = msgspec.json.format(_json.encode(result.data), indent=2).decode()
            sys.stdout.write(_printable_json(text))
            sys.stdout.write("\n")
        else:
            for line in result.lines:
                print(printable(line))
        sys.stdout.flush()
        for error in result.errors:
            print(f"error: {printable(error)}", file=sys.stderr)
        return result.status


# ---------------------------------------------------------------------------------- ls, show


async def _describe(model: Model) -> tuple[Plan, dict[str, Any]]:
    """Facts about a model: sizes, tensors, components, quantization per component."""
    plan = await make_plan(model, None, Limits())
    components = model.components
    per_comp: dict[str, dict[str, Any]] = {}
    dtypes: Counter[str] = Counter()
    dtype_bytes: Counter[str] = Counter()
    params = 0
    for blob in plan.blobs:
        for t in blob.tensors:
            comp = t.name.split("/", 1)[0] if components and "/" in t.name else ""
            entry = per_comp.setdefault(
                comp, {"tensors": 0, "bytes": 0, "parameters": 0, "quantization": {}}
            )
            entry["tensors"] += 1
            entry["bytes"] += t.entry.nbytes
            dtypes[t.entry.dtype] += 1
            dtype_bytes[t.entry.dtype] += t.entry.nbytes
            q = t.quantization
            if t.companion:
                continue
            count = math.prod(t.entry.shape)
            if q is not None:
                count = count * 32 // q.bits
                label = f"{q.type} ({q.mode}, {q.bits}-bit, group {q.group_size})"
                entry["quantization"][label] = entry["quantization"].get(label, 0) + 1
            entry["parameters"] += count
            params += count
    q = plan.quantization
    facts: dict[str, Any] = {
        "name": model.label,
        "id": "",
        "size": model.total_tensor_size,
        "tensor_bytes": plan.total_bytes,
        "tensors": plan.total_tensors,
        "blobs": len(plan.blobs),
        "components": components,
        "quantization": None if q is None else q.type,
        "parameters": params,
        "per_component": per_comp,
        "dtypes": {d: {"tensors": dtypes[d], "bytes": dtype_bytes[d]} for d in sorted(dtypes)},
    }
    if model.path is not None:
        facts["id"] = model.digest.removeprefix("sha256:")[:12]  # Ollama's ID: of the bytes read
    return plan, facts


_KIND_NAMES = {
    "tensor": "tensor model",
    "gguf": "GGUF model",
    "adapter": "adapter only",
    "cloud": "cloud model",
    "empty": "no weights",
}


_STORED = {
    "manifests": "legacy",
    "manifests-v2 symlink": "v2 symlink",
    "manifests-v2 hard link": "v2 hardlink",
    "manifests-v2 copy": "v2 copy",
    "file": "file",
}


def _size(model: Model) -> int:
    """Bytes of the distinct blobs the manifest names (config included, anchors not), as
    ``ollama ls`` sizes a model."""
    layers = [model.manifest.config, *model.manifest.layers]
    anchors = {id(x) for x in model.manifest.anchor_layers}
    return sum({x.digest: x.size for x in layers if id(x) not in anchors}.values())


def _modified(model: Model) -> str | None:
    if model.modified is None:
        return None
    moment = datetime.datetime.fromtimestamp(model.modified, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _children(model: Model) -> list[dict[str, Any]]:
    """A manifest list's children: runner, format, digest and whether it is in the store."""
    if model.manifest_list is None:
        return []
    out = []
    for child in model.manifest_list.manifests:
        local = child.inline is not None or (
            bool(child.digest) and model.store.blob_path(child.digest).exists()
        )
        out.append(
            {"runner": child_runner_of(child), "format": child.format,
             "digest": child.digest or None, "local": local}
        )  # fmt: skip
    return out


async def _facts(model: Model, name: str) -> dict[str, Any]:
    """What `ls` and `show` say about any kind of model."""
    facts: dict[str, Any] = {
        "name": name,
        "id": model.digest.removeprefix("sha256:")[:12],
        "digest": model.digest,
        "kind": model.kind,
        "format": model.format,
        "runner": model.runner,
        "size": _size(model),
        "modified": _modified(model),
        "layout": model.layout,
    }
    if model.manifest_list is not None:
        facts["manifest_list"] = {"digest": model.list_digest, "children": _children(model)}
    if model.skipped:
        facts["skipped"] = model.skipped
    try:
        config = await model.config()
    except AsyncWeightsError as exc:
        facts["config_error"] = exc.reason
        config = None
    if config is not None:
        facts["config"] = {k: v for k, v in msgspec.structs.asdict(config).items() if v}
    return facts


def _details(row: dict[str, Any]) -> str:
    """The DETAILS column of `ls`."""
    kind = row.get("kind")
    config = row.get("config", {})
    if kind == "unreadable":
        return f"unreadable: {row['error']}"
    if kind == "tensor":
        if "error" in row:
            text = f"broken: {row['error']}"
        else:
            text = f"{row['tensors']} tensors"
            if row["components"]:
                text += ", components " + ",".join(row["components"])
            text += f", {row['quantization'] or 'unquantized'}"
    elif kind == "gguf":
        text = " ".join(x for x in (config.get("file_type"), config.get("model_family")) if x)
    elif kind == "adapter":
        text = "no base weights"
    elif kind == "cloud":
        text = f"runs on {config.get('remote_host') or '?'}"
        if config.get("remote_model"):
            text += f" as {config['remote_model']}"
    else:
        text = ""
    if "manifest_list" in row:
        children = row["manifest_list"]["children"]
        listed = ", ".join(
            f"{c['runner']}/{c['format']}" + ("" if c["local"] else " (absent)") for c in children
        )
        text = (text + "; " if text else "") + f"list: {listed}"
    if "skipped" in row:
        text = (text + "; " if text else "") + f"manifests-v2 skipped: {row['skipped']}"
    return text or "-"


async def cmd_ls(args: argparse.Namespace, out: Output) -> Result:
    store = ModelStore(args.store, runner=args.runner)
    rows: list[dict[str, Any]] = []
    unlisted: list[str] = []  # folders that could not be read: listed past, reported, exit 1
    async for name in store.models(on_error=lambda exc: unlisted.append(str(exc))):
        try:
            model = await store.open(name)
        except AsyncWeightsError as exc:
            rows.append({"name": str(name), "kind": "unreadable", "error": exc.reason})
            continue
        row = await _facts(model, str(name))
        if model.kind == "tensor":
            try:
                _, described = await _describe(model)
            except AsyncWeightsError as exc:
                row["error"] = exc.reason
            else:
                for key in ("tensors", "components", "quantization"):
                    row[key] = described[key]
        rows.append(row)
    table = [["NAME", "ID", "SIZE", "MODIFIED", "KIND", "FORMAT", "STORED", "DETAILS"]]
    for r in rows:
        modified = (r.get("modified") or "-").replace("T", " ").removesuffix("Z")[:16]
        table.append([
            r["name"], r.get("id", "-"), format_bytes(r["size"]) if "size" in r else "-",
            modified, _KIND_NAMES.get(r["kind"], r["kind"]), r.get("format") or "-",
            _STORED.get(r.get("layout") or "", "-"), _details(r),
        ])  # fmt: skip
    data = {"store": str(store.root), "models": rows}
    lines = _table(table)
    if not rows and not unlisted:
        # Say which store was looked at: an empty table alone does not tell a new user that
        # the default store is ~/.ollama/models, nor that it does not exist.
        missing = "" if store.root.is_dir() else " (no such directory)"
        lines = [f"no models in store '{store.root}'{missing}"]
    return Result(data, lines, status=1 if unlisted else 0, errors=unlisted)


async def cmd_show(args: argparse.Namespace, out: Output) -> Result:
    store = ModelStore(args.store, runner=args.runner)
    model = await store.open(model_ref(args.model))
    facts = await _facts(model, model.label)
    facts.update(
        manifest=str(model.path) if model.path else None, layers=len(model.manifest.layers)
    )
    lines = [
        f"model         {facts['name']}",
        f"kind          {_KIND_NAMES[model.kind]}  format {model.format or '-'}"
        f"  runner {model.runner or '-'}",
        f"manifest      {facts['manifest']} ({model.layout or '-'})",
        f"digest        {model.digest}",
        f"modified      {facts['modified'] or '-'}  size {format_bytes(facts['size'])}",
    ]
    if "manifest_list" in facts:
        listed = ", ".join(
            f"{c['runner']}/{c['format']}" + ("" if c["local"] else " (absent)")
            for c in facts["manifest_list"]["children"]
        )
        lines.append(f"manifest list {model.list_digest}: {listed}")
    if model.skipped:
        lines.append(f"skipped       manifests-v2 entry: {model.skipped}")
    if model.kind == "tensor":
        lines += await _show_tensor(model, facts)
    else:
        lines += _show_layers(model, facts)
    if model.kind == "gguf":
        lines += await _show_gguf(model, facts)
    return Result(facts, lines)


async def _show_gguf(model: Model, facts: dict[str, Any]) -> list[str]:
    """A GGUF model's facts from its headers (read off the event loop; no tensor data, so
    types asyncweights cannot load are listed too): architecture, parameters, file type, and
    tensors per GGML type. Added to `facts` under ``"gguf"``."""
    gguf: dict[str, Any] = {}
    facts["gguf"] = gguf
    lines = [""]
    table = [["COMPONENT", "GGML TYPE", "TENSORS", "BYTES"]]
    for component, layer in model.gguf_components:
        path = model.store.blob_path(layer.digest)
        try:
            f = await anyio.to_thread.run_sync(
                functools.partial(read_gguf_header, path, expected_size=layer.size)
            )
        except AsyncWeightsError as exc:
            exc.add_context(model=model.label, digest=layer.digest)
            gguf[component] = {"error": str(exc)}
            lines.append(f"gguf          {component}: unreadable: {exc}")
            continue
        histogram = f.type_histogram()
        sizes: dict[str, int] = {}
        for t in f.tensors.values():
            sizes[t.ggml_type] = sizes.get(t.ggml_type, 0) + t.nbytes
        gguf[component] = {
            "architecture": f.architecture,
            "parameters": f.parameter_count,
            "file_type": f.file_type,
            "version": f.version,
            "tensors": len(f.tensors),
            "tensor_types": histogram,
        }
        lines.append(
            f"gguf          {component}: architecture {f.architecture or '-'}, "
            f"{f.parameter_count:,} parameters, file type {f.file_type or '-'}, "
            f"GGUF v{f.version}, {len(f.tensors)} tensors"
        )
        for ggml_type, count in histogram.items():
            table.append([component, ggml_type, str(count), format_bytes(sizes[ggml_type])])
    return [*lines, "", *_table(table)] if len(table) > 1 else lines


def _show_layers(model: Model, facts: dict[str, Any]) -> list[str]:
    """`show`'s lines for a model that is not a tensor model: its config and its layers."""
    config = facts.get("config", {})
    lines = []
    for key in ("model_format", "model_family", "file_type", "remote_host", "remote_model",
                "parser", "renderer", "requires"):  # fmt: skip
        if config.get(key):
            lines.append(f"{key:<13} {config[key]}")
    if config.get("capabilities"):
        lines.append(f"capabilities  {','.join(config['capabilities'])}")
    if "config_error" in facts:
        lines.append(f"config        unreadable: {facts['config_error']}")
    if model.kind == "cloud":
        lines.append("weights       none here: the model runs on its remote host")
    facts["layer_list"] = [
        {"media_type": x.media_type, "digest": x.digest, "size": x.size, "name": x.name}
        for x in model.manifest.layers
    ]
    if model.manifest.layers:
        table = [["LAYER", "DIGEST", "SIZE", "NAME"]]
        for x in model.manifest.layers:
            short = x.media_type.removeprefix("application/vnd.ollama.image.")
            short = short.removeprefix("application/vnd.")
            table.append([short, x.digest[7:19], format_bytes(x.size), x.name or "-"])
        lines += ["", *_table(table)]
    return lines


async def _show_tensor(model: Model, facts: dict[str, Any]) -> list[str]:
    """`show`'s lines for a tensor model: components, quantization, parameters, dtypes."""
    config = await model.config()
    _, described = await _describe(model)
    described["tensor_layers_size"] = described.pop("size")
    for key in ("name", "id"):
        described.pop(key)
    facts.update(described)
    index: dict[str, Any] = {}
    if "model_index.json" in model.config_names:
        value = await model.read_config("model_index.json")
        if isinstance(value, dict):
            index = {
                k: value[k]
                for k in ("architecture", "parameter_count", "quantization", "group_size")
                if k in value
            }
    facts.update(
        model_format=config.model_format,
        file_type=config.file_type,
        capabilities=config.capabilities or [],
        requires=config.requires,
        configs=model.config_names,
        model_index=index,
    )
    lines = [
        f"config        {config.model_format or '-'}  file_type {config.file_type or '-'}"
        f"  requires {config.requires or '-'}"
        f"  capabilities {','.join(facts['capabilities']) or '-'}",
        f"layers        {facts['layers']} ({facts['blobs']} tensor blobs, "
        f"{format_bytes(facts['tensor_layers_size'])})",
        f"tensors       {facts['tensors']} ({format_bytes(facts['tensor_bytes'])})",
        f"parameters    {facts['parameters']:,}",
        f"quantization  {facts['quantization'] or 'none'}",
    ]  # fmt: skip
    if index:
        lines.append("model_index   " + ", ".join(f"{k}={v}" for k, v in index.items()))
    lines.append("")
    table = [["COMPONENT", "TENSORS", "BYTES", "PARAMETERS", "QUANTIZATION"]]
    for comp, c in facts["per_component"].items():
        quant = "; ".join(f"{k} x{v}" for k, v in c["quantization"].items()) or "none"
        table.append(
            [
                comp or "-",
                str(c["tensors"]),
                format_bytes(c["bytes"]),
                f"{c['parameters']:,}",
                quant,
            ]
        )
    lines += _table(table)
    lines.append("")
    table = [["DTYPE", "TENSORS", "BYTES"]]
    for dtype, d in facts["dtypes"].items():
        table.append([dtype, str(d["tensors"]), format_bytes(d["bytes"])])
    lines += _table(table)
    if model.config_names:
        lines += ["", "configs       " + ", ".join(model.config_names)]
    return lines


# ------------------------------------------------------------------------------ load, verify


def peak_memory() -> dict[str, int]:
    """Peak memory of this process: MLX's allocator and the OS (ru_maxrss, KiB on Linux)."""
    import mlx.core as mx

    scale = 1 if sys.platform == "darwin" else 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {"mlx_peak_bytes": int(mx.get_peak_memory()), "max_rss_bytes": int(rss)}


async def load_summary(
    out: Output,
    model: str | Path | Model,
    component: str | None,
    *,
    store: str | ModelStore | None,
    dtype: Any = None,
    verify: bool = False,
    description: str = "loading",
    pull: bool = False,
    registry: str | None = None,
    shard: Shard | None = None,
    check: Any = None,
) -> dict[str, Any]:
    """Load with a progress bar and summarize: tensors, bytes, seconds, GB/s, quantization.

    With `pull` the bar follows the download while blobs arrive, then the load. With
    `shard`, also what this rank holds and read (``/proc/self/io`` ``rchar`` where the OS
    has it); with `check` (an ``mx.distributed`` group) the ranks run `check_shards`.
    """
    out.start(description, 0)
    started = time.perf_counter()
    read_before = _rchar()
    weights = await load_weights(
        model, component, store=store, dtype=dtype, verify=verify,
        on_progress=out.on_progress, pull=pull, registry=registry, shard=shard,
        limits=Limits.throughput(),  # a command line has no event loop to keep free
    )  # fmt: skip
    seconds = time.perf_counter() - started
    read_after = _rchar()
    shard_facts: dict[str, Any] | None = None
    if shard is not None:
        split = [i for i in weights.info.values() if i.shard is not None]
        shard_facts = {
            "rank": shard.rank,
            "world": shard.world,
            "layers": None if shard.layers is None else [shard.layers.start, shard.layers.stop],
            "split_tensors": len(split),
            "whole_tensors": len(weights.info) - len(split),
            "split_bytes_held": sum(i.nbytes for i in split),
            "split_bytes_full": sum(
                i.nbytes * math.prod(i.full_shape) // max(1, math.prod(i.shape)) for i in split
            ),
            "bytes_read": None
            if read_before is None or read_after is None
            else read_after - read_before,
            "checked": False,
        }
        if check is not None:
            check_shards(check, weights)
            shard_facts["checked"] = True
    out.clear()
    per_comp: dict[str, dict[str, Any]] = {}
    for name, info in weights.info.items():
        comp = component or (name.split("/", 1)[0] if "/" in name else "")
        c = per_comp.setdefault(comp, {"tensors": 0, "bytes": 0, "dtypes": {}, "quantization": {}})
        c["tensors"] += 1
        c["bytes"] += info.nbytes
        dtype = str(info.dtype).removeprefix("mlx.core.")
        c["dtypes"][dtype] = c["dtypes"].get(dtype, 0) + 1
        q = info.quantization
        if q is not None:
            label = f"{q.type}/g{q.group_size}"
            c["quantization"][label] = c["quantization"].get(label, 0) + 1
    nbytes = weights.nbytes
    summary = {
        "model": weights.model,
        "component": component,
        "tensors": len(weights),
        "bytes": nbytes,
        "seconds": round(seconds, 4),
        "gb_per_s": round(nbytes / seconds / 1e9, 3) if seconds > 0 else None,
        "quantization": None if weights.quantization is None else weights.quantization.type,
        "per_component": per_comp,
        "verified": verify,
    }
    if shard_facts is not None:
        summary["shard"] = shard_facts
    weights.release()
    return summary


def _rchar() -> int | None:
    """Bytes this process has read (``/proc/self/io`` ``rchar``), None where unknown."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def summary_lines(s: dict[str, Any]) -> list[str]:
    rate = f"{s['gb_per_s']:.2f} GB/s" if s["gb_per_s"] is not None else "-"
    part = f" [{s['component']}]" if s["component"] else ""
    lines = [
        f"loaded {s['model']}{part}: {s['tensors']} tensors, {format_bytes(s['bytes'])} "
        f"in {s['seconds']:.3f} s ({rate})" + (", blobs verified" if s["verified"] else "")
    ]
    for comp, c in s["per_component"].items():
        dtypes = ", ".join(f"{k} x{v}" for k, v in c["dtypes"].items())
        quant = ", ".join(f"{k} x{v}" for k, v in c["quantization"].items()) or "none"
        lines.append(
            f"  {comp or 'model':<13} {c['tensors']:>5} tensors {format_bytes(c['bytes']):>10}"
            f"  {dtypes}; quantization: {quant}"
        )
    shard = s.get("shard")
    if shard is not None:
        where = (
            ""
            if shard["layers"] is None
            else f", layers {shard['layers'][0]}..{shard['layers'][1] - 1}"
        )
        read = "-" if shard["bytes_read"] is None else format_bytes(shard["bytes_read"])
        lines.append(
            f"  rank {shard['rank']}/{shard['world']}{where}: {shard['split_tensors']} split "
            f"tensors ({format_bytes(shard['split_bytes_held'])} of "
            f"{format_bytes(shard['split_bytes_full'])}), {shard['whole_tensors']} whole; "
            f"read {read}" + (", shards checked across ranks" if shard["checked"] else "")
        )
    return lines


def memory_line(mem: dict[str, int]) -> str:
    return (
        f"peak memory: MLX {format_bytes(mem['mlx_peak_bytes'])}, "
        f"RSS {format_bytes(mem['max_rss_bytes'])}"
    )


async def cmd_load(args: argparse.Namespace, out: Output) -> Result:
    import mlx.core as mx

    dtype = getattr(mx, _DTYPES[args.dtype]) if args.dtype else None
    ref = model_ref(args.model)
    if args.pull and not isinstance(ref, str):
        raise InvalidNameError("--pull needs a model name, not a manifest path", model=args.model)
    store = ModelStore(args.store, runner=args.runner)
    shard, group = _shard_of(args)
    summary = await load_summary(
        out, ref, args.component, store=store, dtype=dtype, verify=args.verify,
        pull=args.pull, registry=_registry(args), shard=shard, check=group,
    )  # fmt: skip
    summary.update(peak_memory())
    return Result(summary, [*summary_lines(summary), memory_line(summary)])


def _shard_of(args: argparse.Namespace) -> tuple[Shard | None, Any]:
    """The `Shard` of ``--rank/--world/--pipeline``, and the group for ``--check``.

    Under ``mlx.launch`` the rank defaults to ``$MLX_RANK`` and the world to the group's size.
    """
    if args.world is None and args.rank is None and not args.check:
        return None, None
    group = None
    world, rank = args.world, args.rank
    if args.check or world is None or (rank is None and "MLX_RANK" not in os.environ):
        import mlx.core as mx

        group = mx.distributed.init()
        world = group.size() if world is None else world
        rank = group.rank() if rank is None else rank
    if rank is None:
        rank = int(os.environ["MLX_RANK"])
    if args.pipeline is not None:
        return Shard.pipeline(rank, world, args.pipeline), group if args.check else None
    return Shard(rank, world), group if args.check else None


async def cmd_verify(args: argparse.Namespace, out: Output) -> Result:
    model = await ModelStore(args.store, runner=args.runner).open(model_ref(args.model))
    store = model.store  # a manifest path may have fixed another store than --store's
    layers = [model.manifest.config, *model.manifest.layers]
    blobs: dict[str, tuple[int, list[str]]] = {}
    for layer in layers:
        size, names = blobs.setdefault(layer.digest, (layer.size, []))
        names.append("(config)" if layer is model.manifest.config else layer.name or "")
    # Ollama 0.40 keeps manifest documents as blobs too: the runnable one and its list.
    for digest, what in ((model.digest, "(manifest)"), (model.list_digest, "(manifest list)")):
        if digest and digest not in blobs and model.layout != "manifests":
            path = store.blob_path(digest)
            if path.exists():
                blobs[digest] = (path.stat().st_size, [what])
    total = sum(size for size, _ in blobs.values())
    config_digest = model.manifest.config.digest
    done = [0]
    lock = threading.Lock()

    def hash_blob(digest: str, size: int) -> str | None:
        path = store.blob_path(digest)
        h = hashlib.sha256()
        seen = 0
        try:
            # One descriptor, non-blocking open, a regular file: a FIFO cannot hang verify.
            with open_file(path, "config" if digest == config_digest else "blob") as f:
                buf = bytearray(8 << 20)
                view = memoryview(buf)
                while n := f.read_into(buf, seen):
                    h.update(view[:n])  # hashlib releases the GIL: the two workers overlap
                    seen += n
                    with lock:
                        done[0] += n
        except BlobMissingError:
            return "missing"
        except AsyncWeightsError as exc:
            return exc.reason
        with lock:
            done[0] += size - seen
        if seen != size:
            return f"size {seen} bytes, manifest says {size}"
        actual = "sha256:" + h.hexdigest()
        return None if actual == digest else f"content hashes to {actual}"

    problems: dict[str, str] = {}
    limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
    out.start(f"verifying {model.label}", total)

    async def check(digest: str, size: int) -> None:
        problem = await anyio.to_thread.run_sync(hash_blob, digest, size, limiter=limiter)
        if problem is not None:
            problems[digest] = problem

    async def refresh() -> None:
        while True:
            out.update(done[0])
            await anyio.sleep(0.1)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(refresh)
        async with anyio.create_task_group() as workers:
            for digest, (size, _) in blobs.items():
                workers.start_soon(check, digest, size)
        tg.cancel_scope.cancel()
    seconds = time.perf_counter() - started
    bad = [
        {"digest": d, "path": str(store.blob_path(d)), "layers": blobs[d][1], "problem": p}
        for d, p in problems.items()
    ]
    data = {
        "model": model.label, "blobs": len(blobs), "bytes": total, "seconds": round(seconds, 4),
        "ok": not bad, "bad": bad,
    }  # fmt: skip
    lines = [
        f"verified {model.label}: {len(blobs)} blobs, {format_bytes(total)} in {seconds:.2f} s"
        + (": all good" if not bad else f": {len(bad)} bad")
    ]
    for b in bad:
        listed = ", ".join(n for n in b["layers"] if n) or "-"
        lines.append(f"  BAD {b['digest']} ({listed}): {b['problem']}")
    errors = [f"{len(bad)} of {len(blobs)} blobs failed verification"] if bad else []
    return Result(data, lines, status=1 if bad else 0, errors=errors)


# ------------------------------------------------------------------------------ import, demo


async def cmd_import(args: argparse.Namespace, out: Output) -> Result:
    from ._import import import_model

    store = ModelStore(args.store)
    write = functools.partial(
        import_model, args.directory, args.name, store=store, layout=args.layout,
        quantize=args.quantize, variant=args.variant, force=args.force,
        on_progress=out.on_progress,
    )  # fmt: skip
    model, seconds, new_names = await _writing(out, store, f"importing {args.name}", write)
    digests = {layer.digest for layer in [model.manifest.config, *model.manifest.layers]}
    _, facts = await _describe(model)
    data = {
        "name": args.name,
        "store": str(store.root),
        "manifest": str(model.path),
        "layout": args.layout,
        "quantize": args.quantize,
        "tensors": facts["tensors"],
        "blobs": len(digests),
        "new_blobs": len(new_names),
        "bytes": facts["size"],
        "seconds": round(seconds, 4),
        "quantization": facts["quantization"],
        "components": facts["components"],
    }
    lines = [
        f"imported {args.name} into store {store.root}: {data['tensors']} tensors in "
        f"{data['blobs']} blobs ({data['new_blobs']} new), {format_bytes(data['bytes'])} "
        f"in {seconds:.2f} s",
        f"  layout {args.layout}, quantization {data['quantization'] or 'none'}",
    ]
    return Result(data, lines)


def _registry(args: argparse.Namespace) -> str | None:
    """``--registry``, made ``http://`` by ``--insecure`` when given without a scheme."""
    registry: str | None = args.registry
    if registry is not None and args.insecure and "://" not in registry:
        registry = "http://" + registry
    return registry


async def cmd_pull(args: argparse.Namespace, out: Output) -> Result:
    from ._pull import pull

    store = ModelStore(args.store)
    write = functools.partial(
        pull, args.model, store=store, registry=_registry(args), insecure=args.insecure,
        verify=args.verify, on_progress=out.on_progress,
    )  # fmt: skip
    model, seconds, new_names = await _writing(out, store, f"pulling {args.model}", write)
    layers = [model.manifest.config, *model.manifest.layers]
    sizes = {layer.digest: layer.size for layer in layers}
    new = [digest for digest in sizes if digest.replace(":", "-") in new_names]
    fetched = sum(sizes[digest] for digest in new)
    data = {
        "name": args.model,
        "digest": model.digest,
        "manifest": None if model.path is None else str(model.path),
        "blobs": len(sizes),
        "new_blobs": len(new),
        "bytes": sum(sizes.values()),
        "downloaded_bytes": fetched,
        "seconds": round(seconds, 4),
    }
    rate = f" ({fetched / seconds / 1e6:.1f} MB/s)" if seconds > 0 and fetched else ""
    lines = [
        f"pulled {args.model}: {data['blobs']} blobs ({len(new)} new), "
        f"{format_bytes(fetched)} downloaded in {seconds:.2f} s{rate}",
        f"  {model.digest}",
    ]
    return Result(data, lines)


async def _writing(
    out: Output, store: ModelStore, description: str, write: Callable[[], Awaitable[Model]]
) -> tuple[Model, float, set[str]]:
    """Run `write` (an import or a pull into `store`) under a progress bar titled
    `description`: the model it wrote, its wall seconds, and the blob file names it added."""
    before = set(_blob_names(store))
    out.start(description, 0)
    started = time.perf_counter()
    model = await write()
    seconds = time.perf_counter() - started
    out.clear()
    return model, seconds, set(_blob_names(store)) - before


def _blob_names(store: ModelStore) -> list[str]:
    try:
        return [p.name for p in store.blobs_dir.iterdir() if p.name.startswith("sha256-")]
    except FileNotFoundError:
        return []


async def cmd_rm(args: argparse.Namespace, out: Output) -> Result:
    from ._remove import remove_model

    store = ModelStore(args.store)
    removed = []
    lines = []
    for name in args.names:
        result = await remove_model(name, store=store)
        removed.append(
            {"name": name, "manifests": [str(p) for p in result.manifests],
             "blobs": result.blobs, "kept": result.kept,
             "unreadable": [str(p) for p in result.unreadable]}
        )  # fmt: skip
        line = f"deleted '{name}' from store {store.root}: {len(result.blobs)} blobs removed"
        if result.kept:
            line += f", {len(result.kept)} kept (still used)"
        lines.append(line)
        for path in result.unreadable:
            lines.append(f"  kept every blob: manifest {path} cannot be read")
    return Result({"store": str(store.root), "removed": removed}, lines)


async def cmd_demo(args: argparse.Namespace, out: Output) -> Result:
    """Generate (or reuse) the demo models, load each with a progress bar, and summarize."""
    from ._demo import cache_dir, demo_names, ensure_demo, remove_other_sizes

    size: int = args.size
    default_store = args.store is None
    store = ModelStore(args.store if args.store else cache_dir() / "demo")
    names = demo_names(size)
    for name in names:
        ModelName.parse(name)
    generated = await ensure_demo(store, size, out)
    removed: list[str] = []
    if default_store and not args.keep:
        # Only the cache's own store is ever cleaned, never a store the user named.
        removed = await anyio.to_thread.run_sync(remove_other_sizes, store, size)
    loads = []
    for name in names:
        mx.reset_peak_memory()
        summary = await load_summary(
            out, name, None, store=str(store.root), description=f"loading {name}"
        )
        summary["mlx_peak_bytes"] = int(mx.get_peak_memory())
        loads.append(summary)
    memory = peak_memory()
    memory["mlx_peak_bytes"] = max(s["mlx_peak_bytes"] for s in loads)
    data = {
        "store": str(store.root),
        "size": size,
        "generated": generated is not None,
        "generate_seconds": None if generated is None else round(generated, 3),
        "removed": removed,
        "loads": loads,
        **memory,
    }
    how = "reused" if generated is None else f"generated in {generated:.2f} s"
    lines = [f"demo store {store.root} ({how})"]
    for s in loads:
        lines += summary_lines(s)
        lines.append(f"  peak MLX memory during this load: {s['mlx_peak_bytes'] / MiB:.1f} MiB")
    lines.append(memory_line(memory))
    return Result(data, lines)


# ---------------------------------------------------------------------------------- plumbing


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _common_options(store_help: str) -> argparse.ArgumentParser:
    """The options every command takes; `store_help` says where its --store defaults to."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR", help=store_help)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument(
        "--runner",
        choices=["mlx", "llamacpp", "ggml"],
        help="the child of an Ollama manifest list to use (default: mlx, then llamacpp, ggml)",
    )
    common.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when on a terminal)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options("models root (default: $OLLAMA_MODELS or ~/.ollama/models)")
    parser = argparse.ArgumentParser(
        prog="asyncweights",
        description="Load, inspect, verify and import Ollama-style MLX weight stores.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        parents=[
            _common_options(
                "where to write and load the demo models (default: a store under the user"
                " cache directory, $XDG_CACHE_HOME/asyncweights/demo or"
                " ~/.cache/asyncweights/demo)"
            )
        ],
        help="generate a demo model and load it",
        description="Generate (once) a synthetic image-generation model of about --size bytes"
        " and its int4 variant, then load both with progress bars. The models are written to"
        " --store DIR if given, else to a store under the user cache directory.",
    )
    p.add_argument(
        "--size", type=parse_size, default=512 * MiB, help="model size, e.g. 64MiB (512MiB)"
    )
    p.add_argument(
        "--keep", action="store_true", help="keep demo models of other sizes in the cache"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ls", parents=[common], help="list the models in the store")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", parents=[common], help="show a model's manifest facts")
    p.add_argument("model", help="a model name, or a manifest path starting with / ./ ../ ~")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("load", parents=[common], help="load a model and summarize")
    p.add_argument("model", help="a model name, or a manifest path starting with / ./ ../ ~")
    p.add_argument("-c", "--component", help="load one component: text_encoder, transformer, vae …")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="convert floating-point tensors")
    p.add_argument("--verify", action="store_true", help="check blob digests while loading")
    p.add_argument(
        "--pull",
        action="store_true",
        help="pull the model from its registry while loading (only missing blobs)",
    )
    _registry_arguments(p)
    p.add_argument(
        "--rank", type=int, help="load only this rank's shard (default: $MLX_RANK, mlx.launch's)"
    )
    p.add_argument(
        "--world", type=int, help="ranks the model is split across (default: the group's size)"
    )
    p.add_argument(
        "--pipeline",
        type=int,
        metavar="LAYERS",
        help="pipeline stages instead of tensor parallel: this rank's run of LAYERS layers",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="compare shards across the mx.distributed group (every rank must run it)",
    )
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("pull", parents=[common], help="pull a model from a registry")
    p.add_argument("model", help="model name: name[:tag], ns/name[:tag] or host/ns/name[:tag]")
    p.add_argument(
        "--verify", action="store_true", help="rehash blobs already present (default: size)"
    )
    _registry_arguments(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("verify", parents=[common], help="check every blob's sha256")
    p.add_argument("model", help="a model name, or a manifest path starting with / ./ ../ ~")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("import", parents=[common], help="import a safetensors directory")
    p.add_argument(
        "directory", type=Path, help="directory of *.safetensors files (and JSON configs)"
    )
    p.add_argument("name", help="model name to write, e.g. my-model:latest")
    p.add_argument(
        "--layout",
        choices=["named", "data"],
        default="named",
        help="blob keys: tensor names (named, Ollama 0.19+) or 'data' (E0, Ollama 0.14)",
    )
    p.add_argument(
        "--quantize", choices=["q4", "q8"], help="quantize eligible weights (int4 or int8)"
    )
    p.add_argument(
        "--variant", help="Hugging Face weight variant to load (model.fp16.safetensors …)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace a model of the same name in the store"
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "rm",
        parents=[common],
        help="remove models and the blobs no other model uses",
        description="Remove each model's manifest (its manifests-v2 entry and legacy manifest),"
        " then every blob it used that no other manifest, manifest list or manifest document"
        " uses, as `ollama rm` does.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="model names, e.g. my-model:latest")
    p.set_defaults(func=cmd_rm)
    return parser


def _registry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        metavar="URL",
        help="fetch from this registry instead of the name's host, e.g. http://127.0.0.1:5000"
        " (plain HTTP only when spelled http://)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="plain HTTP for a registry given without scheme"
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status."""
    args = build_parser().parse_args(argv)
    out = Output(json=args.json, progress=args.progress)
    command: Command = args.func
    try:
        try:
            result = anyio.run(command, args, out)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
    except KeyboardInterrupt:
        out.clear()
        return 130
    except AsyncWeightsError as exc:
        out.clear()
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:
        out.clear()
        where = f": {exc.filename}" if exc.filename else ""
        print(printable(f"error: {exc.strerror or exc}{where}"), file=sys.stderr)
        return 1
    return out.emit(result)


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report for a task group that failed: interrupts first, then ours."""
    kinds: tuple[type[BaseException], ...] = (KeyboardInterrupt, AsyncWeightsError, OSError)
    for kind in kinds:
        match = group.subgroup(kind)
        if match is not None:
            if kind is AsyncWeightsError:
                return first_error(match)  # type: ignore[arg-type]
            exc: BaseException = match
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            return exc
    return group


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``asyncweights`` console script."""
    try:
        status = run(argv)
    except BrokenPipeError:
        # The reader went away (``asyncweights ls | head``): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 141
    sys.exit(status)
