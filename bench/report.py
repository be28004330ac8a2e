"""Turn raw runs into medians, ratios, the verdicts against the targets, tables and a chart.

The targets are stated in bench/README.md (section "Targets").
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

Doc = dict[str, Any]
BASELINES = ["seed", "single", "st_numpy", "raw1", "raw2", "raw1_fresh", "raw2_fresh"]
SHOWN_RATIOS = ["seed", "single", "st_numpy", "raw2", "raw2_fresh"]
LOADERS = [
    "aw_load", "aw_load_trio", "aw_load_fast", "aw_stream", "aw_stream_trio", "aw_verify",
    "seed", "single", "st_numpy",
]  # fmt: skip
_NOT_FIGURES = {"rep", "ok"}
_RSS_NOTE = {
    "process": "VmHWM, interpreter and imports included",
    "load": "VmHWM minus RSS before the load",
}
_START, _END = "<!-- results:start -->", "<!-- results:end -->"


def summarize(doc: Doc) -> Doc:
    """Medians (and min/max of time and rate) per model, condition and strategy; ratios."""
    buckets: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in doc["runs"]:
        buckets[(run["model"], run["condition"], run["strategy"])].append(run)
    groups: dict[str, dict[str, Any]] = {}
    for (model, condition, strategy), runs in buckets.items():
        ok = [r for r in runs if r.get("ok")]
        g: dict[str, Any] = {
            "model": model, "condition": condition, "strategy": strategy,
            "runs": len(runs), "ok": len(ok),
            "errors": sorted({r["error"] for r in runs if not r.get("ok")}),
        }  # fmt: skip
        fields = {k for r in ok for k, v in r.items() if _number(v) and k not in _NOT_FIGURES}
        g["median"] = {
            k: statistics.median(vals) for k in sorted(fields) if (vals := _values(ok, k))
        }
        g["min"] = {k: min(_values(ok, k)) for k in ("gbps", "wall_s") if _values(ok, k)}
        g["max"] = {k: max(_values(ok, k)) for k in ("gbps", "wall_s") if _values(ok, k)}
        groups[_key(model, condition, strategy)] = g
    for g in groups.values():
        gbps = g["median"].get("gbps")
        g["ratio"] = {}
        for base in BASELINES:
            other = groups.get(_key(g["model"], g["condition"], base))
            if gbps and other and other["median"].get("gbps"):
                g["ratio"][base] = gbps / other["median"]["gbps"]
    summary: dict[str, Any] = {"groups": groups}
    summary["targets"] = targets({**doc, "summary": summary})
    summary["information"] = information({**doc, "summary": summary})
    return summary


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in runs if _number(r.get(key))]


def _key(model: str, condition: str, strategy: str) -> str:
    return f"{model}/{condition}/{strategy}"


def _group(doc: Doc, model: str, condition: str, strategy: str) -> dict[str, Any] | None:
    groups: dict[str, dict[str, Any]] = doc["summary"]["groups"]
    return groups.get(_key(model, condition, strategy))


def _med(doc: Doc, model: str, condition: str, strategy: str, field: str) -> float | None:
    g = _group(doc, model, condition, strategy)
    return None if g is None else g["median"].get(field)


def _worst(
    doc: Doc, strategies: list[str], field: str, models: list[str], condition: str | None = None
) -> float | None:
    """The largest value of ``field`` in any successful run of these strategies (in
    ``condition`` if given)."""
    vals = [
        r[field] for r in doc["runs"]
        if r.get("ok") and r["strategy"] in strategies and r["model"] in models
        and condition in (None, r["condition"]) and _number(r.get(field))
    ]  # fmt: skip
    return max(vals) if vals else None


def _ratio_figure(
    doc: Doc, model: str, cond: str, strategy: str, base: str
) -> tuple[float | None, str]:
    """``strategy``'s median GB/s over ``base``'s, same model and cache state, and its text."""
    g = _group(doc, model, cond, strategy)
    x = None if g is None else g["ratio"].get(base)
    if x is None:
        return None, "—"
    return x, f"{x:.2f}x ({_runs(g)} runs; {base} {_runs(_group(doc, model, cond, base))})"


def _runs(g: dict[str, Any] | None) -> str:
    return "0" if g is None else f"{g['ok']}"


def targets(doc: Doc) -> list[dict[str, str]]:
    """The targets of bench/README.md "Targets", one row per figure: the target, what was
    measured, met / **MISSED** / not run (no run of the strategies it needs)."""
    rows: list[dict[str, str]] = []

    def row(figure: str, target: str, measured: str, met: bool | None) -> None:
        verdict = "not run" if met is None else "met" if met else "**MISSED**"
        rows.append({"figure": figure, "target": target, "measured": measured, "verdict": verdict})

    for model, cond, strategy, base, bound, what in (
        ("big", "warm", "aw_load", "seed", 0.95, "responsive default (load_weights) vs seed-style"),
        ("big", "warm", "aw_load_fast", "seed", 1.0,
         "throughput choice (Limits.throughput()) vs seed-style"),
        ("small", "warm", "aw_load", "single", 1.0, "load_weights vs one-file mx.load"),
        ("big", "cold", "aw_load", "seed", 1.3, "load_weights vs seed-style"),
    ):  # fmt: skip
        x, measured = _ratio_figure(doc, model, cond, strategy, base)
        row(f"{model}, {cond}: {what}", f"≥ {bound:.2f}x", measured,
            None if x is None else x >= bound)  # fmt: skip

    for strategy, label in (("aw_load", "asyncio"), ("aw_load_trio", "trio")):
        figure = f"event-loop lag, big warm load, responsive default, {label} (medians)"
        g = _group(doc, "big", "warm", strategy)
        p99 = None if g is None else g["median"].get("lag_p99_ms")
        mx = None if g is None else g["median"].get("lag_max_ms")
        if g is None or p99 is None or mx is None:
            row(figure, "p99 ≤ 2 ms, max ≤ 10 ms", "—", None)
            continue
        worst = _worst(doc, [strategy], "lag_max_ms", ["big"], "warm")
        measured = f"p99 {p99:.1f} ms, max {mx:.1f} ms ({g['ok']} runs; worst max {worst:.1f} ms)"
        row(figure, "p99 ≤ 2 ms, max ≤ 10 ms", measured, p99 <= 2 and mx <= 10)

    for model, bound in (("big", 20), ("small", 50)):
        for strategy, label in (("aw_stream", "asyncio"), ("aw_stream_trio", "trio")):
            t = _med(doc, model, "warm", strategy, "first_tensor_ms")
            row(f"time to first tensor, stream_weights, {model} warm, {label} (median)",
                f"≤ {bound} ms", "—" if t is None else f"{t:.1f} ms",
                None if t is None else t <= bound)  # fmt: skip

    for model in ("big", "small"):
        cancels = [r for r in doc["runs"] if r["model"] == model
                   and r["strategy"] in ("aw_cancel", "aw_cancel_trio")]  # fmt: skip
        # A load that finished before the cancel arrived measures nothing.
        ok = [r for r in cancels if r.get("ok") and not r.get("finished_before_cancel")]
        figure = f"cancel, {model} warm: time from cancel to return (median, worst)"
        if not ok:
            row(figure, "≤ 20 ms", "—", None)
            row(f"cancel, {model} warm: left right after return (worst run)", "nothing", "—", None)
            continue
        runs = {label: sum(r["strategy"] == s for r in ok)
                for s, label in (("aw_cancel", "asyncio"), ("aw_cancel_trio", "trio"))}  # fmt: skip
        counted = ", ".join(f"{k} {f'{n} runs' if n else 'not run'}" for k, n in runs.items())
        lat = statistics.median(r["cancel_latency_ms"] for r in ok)
        worst = max(r["cancel_latency_ms"] for r in ok)
        row(figure, "≤ 20 ms", f"{lat:.1f} ms ({worst:.1f} ms; {counted})", lat <= 20)
        left = {
            "blob files": max(r["after_blob_fds"] for r in ok),
            "busy threads": max(r["after_busy_threads"] for r in ok),
            "MLX active MiB": max(r["after_mlx_active_mib"] for r in ok),
        }
        settled = {
            "blob files": max(r["settled_blob_fds"] for r in ok),
            "busy threads": max(r["settled_busy_threads"] for r in ok),
            "MLX active MiB": max(r["settled_mlx_active_mib"] for r in ok),
        }
        measured = ", ".join(f"{k} {v:g}" for k, v in left.items())
        measured += "; 200 ms later: " + ", ".join(f"{k} {v:g}" for k, v in settled.items())
        row(f"cancel, {model} warm: left right after return (worst run)", "nothing", measured,
            all(v == 0 for v in left.values()) and all(r.get("ok") for r in cancels))  # fmt: skip

    for model in ("big", "small"):
        # aw_reload times, in one process, a first WeightCache lease, cache.evict() and the
        # same lease again (MLX's buffer cache kept); its wall_s spans both loads.
        g = _group(doc, model, "warm", "aw_reload")
        figure = f"reload through WeightCache vs its first load, {model} warm (median of runs)"
        x = None if g is None else g["median"].get("reload_speedup")
        if g is None or x is None:
            row(figure, "≥ 1.8x faster", "—", None)
            continue
        first, again = g["median"].get("first_load_s"), g["median"].get("reload_s")
        measured = f"{x:.2f}x (first load {_f(first, '.3f')} s, reload {_f(again, '.3f')} s; "
        measured += f"{g['ok']} runs)"
        row(figure, "≥ 1.8x faster", measured, x >= 1.8)

    for cond in ("warm", "cold"):
        plain = _med(doc, "big", cond, "aw_load", "wall_s")
        ver = _med(doc, "big", cond, "aw_verify", "wall_s")
        x = ver / plain if plain and ver else None
        measured = "—" if x is None else f"{x:.2f}x ({ver:.3f} s vs {plain:.3f} s)"
        row(f"verify=True load time vs plain, big {cond} (medians)", "≤ 1.5x", measured,
            None if x is None else x <= 1.5)  # fmt: skip

    aw = ["aw_load", "aw_load_trio", "aw_load_fast", "aw_stream", "aw_stream_trio", "aw_verify",
          "aw_reload"]  # fmt: skip
    fds = _worst(doc, aw, "max_fds_extra", ["big", "small"])
    row("open files held during any load (worst run, both models)", "≤ 64",
        "—" if fds is None else f"{fds:g}", None if fds is None else fds <= 64)  # fmt: skip
    nofile = [r for r in doc["runs"] if r["strategy"] == "aw_nofile64"]
    if nofile:
        bad = [f"{r['model']}: {r.get('error')}" for r in nofile if not r.get("ok")]
        measured = "; ".join(bad) if bad else f"{len(nofile)}/{len(nofile)} loads ok"
        row("loads under `ulimit -n 64`", "all load", measured, not bad)
    else:
        row("loads under `ulimit -n 64`", "all load", "—", None)

    for field, what in (("rss_over_model_mib", "process"), ("load_rss_over_model_mib", "load")):
        rss = [_med(doc, "big", c, "aw_load", field) for c in ("warm", "cold")]
        rss_v = [v for v in rss if v is not None]
        row(f"peak RSS over model bytes, big, warm and cold ({what}: {_RSS_NOTE[what]})",
            "≤ 64 MiB", f"+{max(rss_v):.0f} MiB" if rss_v else "—",
            None if not rss_v else max(rss_v) <= 64)  # fmt: skip
    return rows


def information(doc: Doc) -> list[dict[str, str]]:
    """Ratios against the machine's raw limits, measured in the same run: no target, shown to
    say how far each load is from what the machine can do."""
    rows = []
    for model, cond, strategy, base, what in (
        ("big", "warm", "aw_load", "raw2_fresh", "load_weights vs raw read, fresh memory, 2 thr"),
        ("big", "warm", "aw_load_fast", "raw2_fresh",
         "throughput choice vs raw read, fresh memory, 2 thr"),
        ("big", "cold", "aw_load", "raw2", "load_weights vs raw cold read, 2 threads"),
        ("small", "cold", "aw_load", "raw2", "load_weights vs raw cold read, 2 threads"),
    ):  # fmt: skip
        x, measured = _ratio_figure(doc, model, cond, strategy, base)
        rows.append({"figure": f"{model}, {cond}: {what}",
                     "measured": "not run" if x is None else measured})  # fmt: skip
    return rows


# -- tables ------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
              for r in rows]  # fmt: skip
    return "\n".join(lines)


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def condition_table(doc: Doc, model: str, condition: str) -> str:
    headers = [
        "strategy", "ok", "wall s", "GB/s", "min-max", *(f"x{b}" for b in SHOWN_RATIOS),
        "peak RSS MiB", "MLX peak MiB", "+fds", "lag p50/p99/max ms", "1st tensor ms",
        "resident",
    ]  # fmt: skip
    rows = []
    order = [*LOADERS, "raw1", "raw2", "raw1_fresh", "raw2_fresh"]
    for strategy in order:
        g = _group(doc, model, condition, strategy)
        if g is None:
            continue
        m = g["median"]
        lag = "—"
        if "lag_p99_ms" in m:
            lag = f"{m['lag_p50_ms']:.1f}/{m['lag_p99_ms']:.1f}/{m['lag_max_ms']:.1f}"
        rows.append([
            strategy, f"{g['ok']}/{g['runs']}", _f(m.get("wall_s"), ".3f"), _f(m.get("gbps")),
            f"{_f(g['min'].get('gbps'))}-{_f(g['max'].get('gbps'))}",
            *(_f(g["ratio"].get(b)) for b in SHOWN_RATIOS),
            _f(m.get("peak_rss_mib"), ".0f"), _f(m.get("mlx_peak_mib"), ".0f"),
            _f(m.get("max_fds_extra"), ".0f"), lag, _f(m.get("first_tensor_ms"), ".1f"),
            _f(m.get("residency")),
        ])  # fmt: skip
    return _table(headers, rows) if rows else ""


def limits_table(doc: Doc) -> str:
    rows = []
    for strategy, extra, label in (
        ("memcpy", "fresh_fill_gbps", "first touch of fresh 4 KiB pages"),
        ("sha256", "gbps_2threads", "two threads together"),
    ):
        g = _group(doc, "big", "-", strategy)
        if g:
            m = g["median"]
            rows.append([strategy, f"{g['ok']}/{g['runs']}", _f(m.get("gbps")),
                         f"{label}: {_f(m.get(extra))}"])  # fmt: skip
    return _table(["limit", "ok", "GB/s", "also"], rows) if rows else ""


def checks_table(doc: Doc) -> str:
    rows = []
    for model in ("big", "small"):
        for strategy in ("aw_cancel", "aw_cancel_trio"):
            g = _group(doc, model, "warm", strategy)
            if not g:
                continue
            m = g["median"]
            rows.append([
                f"{model} {strategy}", f"{g['ok']}/{g['runs']}", _f(m.get("cancel_at_fraction")),
                _f(m.get("cancel_latency_ms"), ".1f"),
                f"{_f(m.get('after_blob_fds'), 'g')} / {_f(m.get('after_gc_blob_fds'), 'g')} / "
                f"{_f(m.get('settled_blob_fds'), 'g')}",
                f"{_f(m.get('after_busy_threads'), 'g')} / "
                f"{_f(m.get('settled_busy_threads'), 'g')}",
                f"{_f(m.get('after_mlx_active_mib'), '.1f')} / "
                f"{_f(m.get('settled_mlx_active_mib'), '.1f')}",
                ", ".join(g["errors"]) or "",
            ])  # fmt: skip
    headers = ["cancel run", "ok", "at fraction", "latency ms", "blob fds after / gc / +200 ms",
               "busy threads", "MLX active MiB", "errors"]  # fmt: skip
    out = _table(headers, rows) if rows else ""
    reloads = []
    for model in ("big", "small"):
        g = _group(doc, model, "warm", "aw_reload")
        if g:
            m = g["median"]
            reloads.append([
                model, f"{g['ok']}/{g['runs']}", _f(m.get("first_load_s"), ".3f"),
                _f(m.get("reload_s"), ".3f"), _f(m.get("reload_speedup")),
                ", ".join(g["errors"]) or "",
            ])  # fmt: skip
    if reloads:
        headers = ["WeightCache reload", "ok", "first load s", "reload s", "speedup", "errors"]
        out += ("\n\n" if out else "") + _table(headers, reloads)
    nofile = [r for r in doc["runs"] if r["strategy"] == "aw_nofile64"]
    if nofile:
        out += ("\n\n" if out else "") + _table(
            ["ulimit -n 64", "ok", "GB/s", "+fds", "error"],
            [[r["model"], str(r.get("ok")), _f(r.get("gbps")), _f(r.get("max_fds_extra"), "g"),
              r.get("error", "")] for r in nofile],
        )  # fmt: skip
    return out


def targets_table(doc: Doc) -> str:
    rows = [[t["figure"], t["target"], t["measured"], t["verdict"]]
            for t in doc["summary"]["targets"]]  # fmt: skip
    return _table(["figure", "target", "measured", "verdict"], rows)


def information_table(doc: Doc) -> str:
    rows = [[t["figure"], t["measured"]] for t in information(doc)]
    return _table(["figure (no target)", "measured"], rows)


def _sections(doc: Doc, heading: str) -> list[str]:
    out = []
    for model in ("big", "small"):
        info = doc["models"].get(model)
        for condition in ("warm", "cold"):
            table = condition_table(doc, model, condition)
            if table and info:
                title = (f"{model} ({info['tensors']} tensors, "
                         f"{info['blob_bytes'] / 2**30:.2f} GiB), {condition}")  # fmt: skip
                out.append(f"{heading} {title}\n\n{table}")
    if lim := limits_table(doc):
        out.append(f"{heading} machine limits (medians)\n\n{lim}")
    if chk := checks_table(doc):
        out.append(f"{heading} cancel, reload and open-file checks (warm, medians)\n\n{chk}")
    out.append(f"{heading} Verdicts against the targets\n\n{targets_table(doc)}")
    out.append(
        f"{heading} Against the machine's raw limits (information, not targets)\n\n"
        f"{information_table(doc)}"
    )
    return out


def terminal_table(doc: Doc) -> str:
    """Everything a person wants at the end of a run, as plain pipe tables."""
    return "\n\n".join(_sections(doc, "==")) + "\n"


def markdown(doc: Doc, chart: str | None = None) -> str:
    m = doc["machine"]
    facts = (
        f"- date: {m['date']}; elapsed: {doc['elapsed_s'] / 60:.1f} min; "
        f"runs: {len(doc['runs'])}\n"
        f"- command: `{doc['command']}`\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, kernel "
        f"{m['kernel']}, THP `{m['thp_enabled']}` / defrag `{m['thp_defrag']}`; load average "
        f"{m.get('loadavg_start', '?')} at start, {m.get('loadavg', '?')} at end\n"
        f"- software: Python {m['python']}, mlx {m['mlx']}, numpy {m['numpy']}, "
        f"asyncweights {m['asyncweights']} at `{m['commit']}`\n"
        "- every figure is the median over runs (each a fresh process); ratios are ratios of "
        "median GB/s in the same cache state; peak RSS is VmHWM (interpreter and imports "
        "included)"
    )
    parts = [facts]
    if chart:
        parts.append(f"![throughput by strategy and condition]({chart})")
    parts += _sections(doc, "####")
    return "\n\n".join(parts) + "\n"


def write_markdown(doc: Doc, path: Path) -> str:
    """Write the report beside the chart; return its text (chart linked by file name)."""
    text = "### Benchmark report\n\n" + markdown(doc, "throughput.png")
    path.write_text(text)
    return text


def write_readme_results(readme: Path, report: str, chart: Path) -> None:
    """Replace the text between the results markers of ``readme`` with this report."""
    text = readme.read_text()
    rel = chart.relative_to(readme.parent) if chart.is_relative_to(readme.parent) else chart
    body = re.sub(r"\]\(throughput\.png\)", f"]({rel})", report)
    start, end = text.index(_START) + len(_START), text.index(_END)
    readme.write_text(text[:start] + "\n" + body + text[end:])


# -- chart -------------------------------------------------------------------------------------


def write_chart(doc: Doc, path: Path) -> Path:
    """Bars of median GB/s (min-max whiskers) per strategy, one panel per model and condition,
    with the fresh-memory and reused-memory raw reads drawn as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, c) for m in ("big", "small") for c in ("warm", "cold")
              if any(_group(doc, m, c, s) for s in LOADERS)]  # fmt: skip
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(12, 2.6 * max(1, len(panels))))
    axes_list = list(axes) if len(panels) > 1 else [axes]
    for ax, (model, condition) in zip(axes_list, panels, strict=False):
        names, med, lo, hi, colors = [], [], [], [], []
        for s in LOADERS:
            g = _group(doc, model, condition, s)
            if g and "gbps" in g["median"]:
                names.append(s)
                med.append(g["median"]["gbps"])
                lo.append(g["median"]["gbps"] - g["min"]["gbps"])
                hi.append(g["max"]["gbps"] - g["median"]["gbps"])
                colors.append("tab:blue" if s.startswith("aw_") else "tab:gray")
        ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=3)
        ax.invert_yaxis()
        top = max(med + [h + m for h, m in zip(hi, med, strict=True)], default=1.0)
        for limit, style, label in (
            ("raw2_fresh", "--", "raw read into fresh memory, 2 threads"),
            ("raw2", ":", "raw read into reused memory, 2 threads"),
        ):
            v = _med(doc, model, condition, limit, "gbps")
            if v is None:
                continue
            if v <= 2.5 * top:
                ax.axvline(v, color="tab:red", linestyle=style, label=f"{label}: {v:.2f} GB/s")
                top = max(top, v)
            else:
                ax.plot([], [], " ", label=f"{label}: {v:.1f} GB/s (off scale)")
        ax.set_xlim(0, top * 1.1)
        ax.set_title(f"{model}, {condition}", fontsize=10, loc="left")
        ax.set_xlabel("GB/s (median of runs; whiskers min-max)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"asyncweights benchmark, {doc['machine']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
