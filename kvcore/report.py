"""Markdown reports: one per run (plots, statistics, compression and perplexity tables) and one
across the grid, plus `results/summary.parquet` (every ppl + compress result of every run).

Results are read as DESIGN.md lays them out: {run}/ppl/{method}.json joined on the method name with
{run}/compress/{method}.json. A ppl file is one record, a record whose `protocols` maps each protocol
to its full record (kvcore.evaluation.perplexity: one row per protocol is reported), or a list of records.
Missing stages are left out, never an error: a report can be written after extraction alone.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from kvcore.compress.bits import LABEL as BITS_LABEL
from kvcore.errors import KvcoreError

CAPTIONS = {
    "layer_statistics": "Per layer: sparsity (entries below 1% of the head's RMS), key–value correlation, "
                        "std, mean magnitude, excess kurtosis and outlier-channel ratio of keys and values.",
    "head_sparsity": "Sparsity of keys and values per layer and KV head (threshold relative to each head's "
                     "own RMS, so massive activations elsewhere do not decide it).",
    "pruning_heatmap_by_layer_head": "Pruning potential per layer and KV head, 1 − mean‖v‖ ÷ the largest head's "
                                     "mean‖v‖; boxed cells carry the measured perplexity change of pruning runs.",
    "layer_pruning_potential": "Pruning potential per layer from the statistics, with the measured perplexity "
                               "change of single-layer pruning runs on the right axis where configured.",
    "head_pruning_potential": "Pruning potential per KV-head index across layers, and the top (layer, head) "
                              "candidates.",
    "weight_magnitude_distribution": "Distribution of |K| and |V| entries on log axes, whole cache and "
                                     "first/middle/last layer, with the band of sparsity thresholds.",
    "channel_outliers": "Mean |x| per channel for keys and values in every layer: keys concentrate in a few "
                        "outlier channels (why keys are quantized per channel), values do not.",
    "key_norm_by_position": "Key and value norms against token position: attention sinks stand out at the "
                            "first positions, RoPE and depth shape the rest.",
    "cross_layer_similarity": "Mean cosine similarity of the same token's keys (values) between every pair of "
                              "layers, and between neighbouring layers.",
    "compression_tradeoff": "Perplexity change against bits per element for every method: colour = family, "
                            "marker = protocol, hollow = failed the threshold; lines join each family's best points.",
    "attention_sinks": "Mean attention each key position receives per layer, and the share on position 0.",
    "task_accuracy": "Task accuracy (needle / QA) against keep ratio for each method.",
}
PLOT_ORDER = ("layer_statistics", "head_sparsity", "weight_magnitude_distribution", "channel_outliers",
              "key_norm_by_position", "cross_layer_similarity", "pruning_heatmap_by_layer_head",
              "layer_pruning_potential", "head_pruning_potential", "compression_tradeoff", "attention_sinks",
              "task_accuracy")
TITLES = {n: n.replace("_", " ").capitalize().replace("Kv", "KV") for n in PLOT_ORDER}

SUMMARY_COLUMNS = (
    ("model", "string"), ("dataset", "string"), ("method", "string"), ("family", "string"), ("protocol", "string"),
    ("bits_per_element", "float64"), ("compression_ratio", "float64"), ("original_size_bytes", "int64"),
    ("compressed_size_bytes", "int64"), ("rmse", "float64"), ("snr_db", "float64"), ("cosine_similarity", "float64"),
    ("max_error", "float64"), ("quality_level", "string"), ("compress_passed", "bool_"),
    ("processing_time_ms", "float64"), ("baseline_perplexity", "float64"), ("compressed_perplexity", "float64"),
    ("delta", "float64"), ("delta_percent", "float64"), ("passed", "bool_"), ("threshold", "float64"),
    ("max_length", "int64"), ("stride", "int64"), ("n_tokens", "int64"), ("dtype", "string"),
    ("seconds", "float64"), ("tokens_per_second", "float64"), ("latency_ratio", "float64"),
)
# Sizes and errors of the stored cache come from the compress job; bits per element and the
# ratio from the perplexity record when there is one, so a row shows the bits of what it measured
# (both follow kvcore.compress.bits's one convention).
_COMPRESS_FIRST = ("original_size_bytes", "compressed_size_bytes", "rmse", "snr_db", "cosine_similarity",
                   "max_error", "quality_level", "processing_time_ms")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KvcoreError(f"{path}: not a readable JSON result ({exc})") from None


def collect_results(paths, methods: dict | None = None) -> list[dict]:
    """One record per (method, protocol) with perplexity results, plus one per method with compression
    metrics only, from exactly these result files of one run (`{run}/ppl/{method}.json` and
    `{run}/compress/{method}.json`, the rule's inputs; a file not named is never read). Fields: those
    of SUMMARY_COLUMNS (None where unknown), `params` (the method's parameters: from the JSON's
    `params`, else the config `methods` entry), `compress_passed`."""
    if isinstance(paths, (str, Path)):  # the old run-directory form: it read stale files
        raise TypeError("collect_results takes the run's result files (ppl/*.json, compress/*.json), "
                        "not a directory")
    paths = [Path(p) for p in paths]
    methods = methods or {}
    compress = {p.stem: _load(p) for p in paths if p.parent.name == "compress"}
    records, seen = [], set()
    for path in (p for p in paths if p.parent.name == "ppl"):
        data = _load(path)
        if isinstance(data, dict) and isinstance(data.get("protocols"), dict) and data["protocols"]:
            items = [{"spec": data.get("spec"), **rec} for rec in data["protocols"].values()]
        else:
            items = data if isinstance(data, list) else [data]
        for item in items:
            records.append(_record(item.get("method") or path.stem, item, compress.get(path.stem, {}), methods))
            seen.add(path.stem)
    for stem, c in compress.items():
        if stem not in seen:
            records.append(_record(c.get("method") or stem, {}, c, methods))
    return records


def _record(method: str, ppl: dict, comp: dict, methods: dict) -> dict:
    spec = dict(methods.get(method) or {})
    rec = {name: None for name, _ in SUMMARY_COLUMNS}
    for key in rec:
        first, second = (comp, ppl) if key in _COMPRESS_FIRST else (ppl, comp)
        rec[key] = first.get(key, second.get(key))
    stored = dict(ppl.get("spec") or {})  # the parsed spec kvcore.evaluation.perplexity writes
    rec["method"] = method
    rec["family"] = (ppl.get("family") or stored.get("family") or comp.get("family") or spec.get("family")
                     or ("none" if method == "baseline" else None))
    rec["passed"] = ppl.get("passed")
    rec["compress_passed"] = comp.get("passed")
    rec["has_compress_json"] = bool(comp)
    rec["compression_ratio_vs_fp16"] = comp.get("compression_ratio_vs_fp16")  # compression table only
    for source in (stored, spec):
        source.pop("family", None)
    rec["params"] = ppl.get("params") or comp.get("params") or stored or spec or None
    return rec


def results_by_run(paths) -> dict[Path, list[Path]]:
    """Result files grouped by their run directory ({run}/ppl/x.json -> {run}), in the given order."""
    runs: dict[Path, list[Path]] = {}
    for p in map(Path, paths):
        runs.setdefault(p.parent.parent, []).append(p)
    return runs


def run_labels(paths) -> dict[str, list[Path]]:
    """"model · dataset" -> that run's result files, for the comparison tables."""
    return {f"{run.parent.name} · {run.name}": files for run, files in results_by_run(paths).items()}


def summary_table(results, methods: dict | None = None):
    """pyarrow Table of every record of these result files (schema SUMMARY_COLUMNS, possibly empty)."""
    import pyarrow as pa

    rows = []
    for run, paths in results_by_run(results).items():
        for rec in collect_results(paths, methods):
            rec.update(model=run.parent.name, dataset=run.name)
            rows.append(rec)
    schema = pa.schema([(name, getattr(pa, typ)()) for name, typ in SUMMARY_COLUMNS])
    cols = {}
    for name, typ in SUMMARY_COLUMNS:
        values = [_coerce(r.get(name), typ) for r in rows]
        cols[name] = pa.array(values, type=schema.field(name).type)
    return pa.table(cols, schema=schema)


def _coerce(v, typ: str):
    if v is None:
        return None
    try:
        if typ == "float64":
            return float(v)
        if typ == "int64":
            return int(v)
        if typ == "bool_":
            return bool(v)
    except (TypeError, ValueError):
        return None
    return str(v)


def write_summary(results, out_parquet: str | Path, methods: dict | None = None, out_html: str | Path | None = None
                  ) -> Path:
    """Write `summary.parquet`: one row per (model, dataset, method, protocol) of these result files
    (and, with `out_html`, the same rows as an HTML table, for `snakemake --report`)."""
    import pyarrow.parquet as pq

    from kvcore.atomic import atomic_path, write_text

    table = summary_table(results, methods)
    with atomic_path(out_parquet) as tmp:
        pq.write_table(table, tmp)
    if out_html is not None:
        rows = table.to_pandas().to_html(index=False, na_rep="–", border=0)
        write_text(out_html, html_page("Summary of every result", [f"<p>{table.num_rows} rows of "
                                                                    f"summary.parquet</p>", rows]))
    return Path(out_parquet)


# ---------------------------------------------------------------- markdown helpers

def _fmt(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "✅" if v else "❌"
    if isinstance(v, float):
        return format(v, spec)
    return str(v).replace("|", "\\|")


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v.replace("|", "\\|") for v in row) + " |"
              for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list]) -> str:
    """The rows of `md_table` as an HTML table (the cells' text as md_table shows it)."""
    def cell(tag, v):
        text = v if isinstance(v, str) else _fmt(v).replace("\\|", "|")
        return f"<{tag}>{html.escape(text)}</{tag}>"

    lines = ["<table>", "<tr>" + "".join(cell("th", h) for h in header) + "</tr>"]
    lines += ["<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows]
    return "\n".join(lines + ["</table>"])


def html_page(title: str, parts: list[str]) -> str:
    """A self-contained HTML page: the title, then `parts` (HTML) in order."""
    style = ("body{font-family:sans-serif} table{border-collapse:collapse} "
             "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right} th{background:#eee}")
    return "\n".join(["<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
                      f"<style>{style}</style></head><body>", f"<h1>{html.escape(title)}</h1>", *parts,
                      "</body></html>", ""])


def _rel(target: Path, out_md: Path) -> str:
    return Path(os.path.relpath(target, out_md.parent)).as_posix()


def _ppl_rows(records):
    rows = []
    for r in sorted((r for r in records if r.get("compressed_perplexity") is not None or r.get("delta") is not None),
                    key=lambda r: (r["family"] != "none", r.get("family") or "", r["method"], r.get("protocol") or "")):
        rows.append([r["method"], r.get("family") or "–", r.get("protocol") or "–", _fmt(r.get("bits_per_element"), ".3g"),
                     _fmt(r.get("compression_ratio"), ".3g"), _fmt(r.get("baseline_perplexity"), ".3f"),
                     _fmt(r.get("compressed_perplexity"), ".3f"), _fmt(r.get("delta"), "+.3f"),
                     _fmt(r.get("delta_percent"), "+.2f"), _fmt(r.get("passed")),
                     _fmt(r.get("tokens_per_second"), ".4g"), _fmt(r.get("latency_ratio"), ".3g")])
    return rows


PPL_HEADER = ["method", "family", "protocol", BITS_LABEL, "ratio", "baseline ppl", "ppl", "Δ", "Δ %", "passed",
              "tokens/s", "latency ×"]
COMPRESS_HEADER = ["method", "family", BITS_LABEL, "ratio", "ratio vs fp16", "bytes written", "RMSE", "SNR dB",
                   "cosine", "max error", "quality", "passed"]


def _compress_row(c: dict, passed) -> list:
    """One compression table row from a compress/{method}.json (or a record holding its fields)."""
    return [c["method"], c.get("family") or "–", _fmt(c.get("bits_per_element"), ".3g"),
            _fmt(c.get("compression_ratio"), ".3g"), _fmt(c.get("compression_ratio_vs_fp16"), ".3g"),
            _fmt(None if c.get("compressed_size_bytes") is None else f"{int(c['compressed_size_bytes']):,}"),
            _fmt(c.get("rmse"), ".3g"), _fmt(c.get("snr_db"), ".1f"), _fmt(c.get("cosine_similarity"), ".5f"),
            _fmt(c.get("max_error"), ".3g"), _fmt(c.get("quality_level")), _fmt(passed)]


def _compress_rows(records):
    seen, rows = set(), []
    for r in sorted(records, key=lambda r: (r.get("family") or "", r["method"])):
        if r["method"] in seen or not r.get("has_compress_json"):
            continue
        seen.add(r["method"])
        rows.append(_compress_row(r, r.get("compress_passed")))
    return rows


def _stats_section(run_dir: Path, stats_dir: Path | None) -> list[str]:
    from kvcore.stats import SPARSITY_REL, read_stats

    stats_dir = stats_dir or run_dir / "stats"
    if not (stats_dir / "heads.parquet").is_file():
        return []
    layers = read_stats(stats_dir)["layers"].to_pandas()
    k = layers[layers.kind == "key"].set_index("layer").sort_index()
    v = layers[layers.kind == "value"].set_index("layer").sort_index()
    rows = []
    for layer in k.index:
        a, b = k.loc[layer], v.loc[layer]
        rows.append([str(layer), f"{a['std']:.3g}", f"{b['std']:.3g}", f"{a['mean_abs']:.3g}", f"{b['mean_abs']:.3g}",
                     f"{100 * a['sparsity']:.2f}", f"{100 * b['sparsity']:.2f}", f"{a['kurtosis']:.3g}",
                     f"{b['kurtosis']:.3g}", f"{a['outlier_ratio']:.3g}", f"{b['outlier_ratio']:.3g}",
                     f"{a['kv_correlation']:+.3f}", f"{a['norm_mean']:.3g}", f"{b['norm_mean']:.3g}",
                     _fmt(float(a["cos_next_layer"]), "+.3f"), _fmt(float(b["cos_next_layer"]), "+.3f")])
    header = ["layer", "K std", "V std", "K mean\\|x\\|", "V mean\\|x\\|", "K sparsity %", "V sparsity %",
              "K kurtosis", "V kurtosis", "K outlier", "V outlier", "K–V corr", "mean ‖k‖", "mean ‖v‖",
              "K cos→L+1", "V cos→L+1"]
    return ["## Statistics per layer", "",
            f"Pooled over KV heads and tokens; per-head values in `{_rel(stats_dir, run_dir / 'x')}/heads.parquet`. "
            f"Sparsity: entries with |x| < {SPARSITY_REL:g} × the head's RMS. Kurtosis: excess (0 for a Gaussian). "
            "Outlier: largest ÷ median channel mean |x|. K–V corr: Pearson over (token, channel) entries. "
            "cos→L+1: mean cosine of the same token's vector in the next layer.", "",
            md_table(header, rows), ""]


def _run_meta_line(run_dir: Path) -> tuple[str, str]:
    path = run_dir / "metadata.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    model, dataset = meta.get("model") or run_dir.parent.name, meta.get("dataset") or run_dir.name
    if not meta:
        return f"{model} on {dataset}", "Not extracted yet (no metadata.json)."
    gqa = f" ({meta['num_heads']} query heads)" if meta.get("num_heads") not in (None, meta.get("num_kv_heads")) else ""
    line = (f"{meta.get('n_sequences', '?')} sequences, {meta.get('n_tokens', 0):,} tokens · "
            f"{meta.get('num_layers')} layers × {meta.get('num_kv_heads')} KV heads{gqa} × head_dim "
            f"{meta.get('head_dim')} · {meta.get('dtype')} · kvcore {meta.get('kvcore_version', '?')}")
    return f"{model} on {dataset}", line


def _tasks_section(files, out_md: Path) -> list[str]:
    """A table of these task results (results/{model}/tasks/{task}/{method}.json, one model's)."""
    files = [Path(f) for f in files]
    if not files:
        return []
    task_root = files[0].parent.parent
    rows, keys = [], []
    loaded = []
    for f in files:
        d = _load(f)
        flat = {k: v for k, v in (d.items() if isinstance(d, dict) else []) if isinstance(v, (int, float, str, bool))}
        loaded.append((f.parent.name, f.stem, flat))
        keys += [k for k in flat if k not in keys and k not in ("task", "method")]
    keys = keys[:8]
    for task, method, flat in loaded:
        rows.append([task, method] + [_fmt(flat.get(k)) for k in keys])
    return ["## Tasks", "", f"From `{_rel(task_root, out_md)}/`.", "", md_table(["task", "method"] + keys, rows), ""]


def write_run_report(run_dir: str | Path, out_md: str | Path | None = None, plots_dir: str | Path | None = None,
                     stats_dir: str | Path | None = None, methods: dict | None = None, results=(),
                     tasks=()) -> Path:
    """Write a run's report.md (default run_dir/report.md): plots with captions and relative links,
    perplexity and compression tables of the `results` files (collect_results), per-layer statistics,
    the model's `tasks` results (results/{model}/tasks/{task}/{method}.json).
    Sections without inputs are left out."""
    from kvcore.atomic import write_text

    run_dir = Path(run_dir)
    out_md = Path(out_md) if out_md is not None else run_dir / "report.md"
    plots_dir = Path(plots_dir) if plots_dir is not None else run_dir / "plots"
    title, meta_line = _run_meta_line(run_dir)
    records = collect_results(results, methods)
    lines = [f"# KV cache report: {title}", "", meta_line, ""]
    grid = run_dir.parent.parent / "report.md"
    lines += [f"[All runs]({_rel(grid, out_md)}) · data: `metadata.json`, `stats/*.parquet`, `ppl/*.json`, "
              "`compress/*.json`", ""]
    ppl = _ppl_rows(records)
    lines += ["## Perplexity", ""]
    lines += [md_table(PPL_HEADER, ppl), ""] if ppl else ["No perplexity results yet.", ""]
    comp = _compress_rows(records)
    lines += ["## Compression", ""]
    lines += [md_table(COMPRESS_HEADER, comp), ""] if comp else ["No compression methods configured.", ""]
    present = [n for n in PLOT_ORDER if (plots_dir / f"{n}.png").is_file()]
    if present:
        lines += ["## Plots", ""]
        for name in present:
            caption = CAPTIONS[name]
            if name == "compression_tradeoff" and not any(r.get("family") not in (None, "none") for r in records):
                caption += " No compression method is configured yet, so the plot says so."
            lines += [f"### {TITLES[name]}", "", caption, "",
                      f"![{name}]({_rel(plots_dir / f'{name}.png', out_md)})", ""]
    lines += _stats_section(run_dir, Path(stats_dir) if stats_dir else None)
    lines += _tasks_section(tasks, out_md)
    from kvcore.plots.pruning import FORMULA

    lines += ["## Definitions", "",
              f"- Pruning potential (a heuristic from the statistics): {FORMULA}. An attention head's output is a "
              "convex combination of its value vectors, so small values write little into the residual stream; "
              "it ignores the output projection and the attention pattern, so check it against measured pruning runs.",
              "- Δ % = (compressed − baseline perplexity) ÷ baseline × 100; `passed` = Δ below the threshold; "
              "latency × = time of the scored forward with the compressed cache ÷ the uncompressed one.",
              "- Protocols: `fake-quant` compresses every K/V on cache update; `prefill-compress` compresses the "
              "prefilled context once per window, then scores the stride tokens against it.", ""]
    write_text(out_md, "\n".join(lines))
    return out_md


def write_grid_report(runs, out_md: str | Path, results=(), methods: dict | None = None, tasks=()) -> Path:
    """Write results/report.md: the `runs` (run directories) side by side, every record of the
    `results` files (each in its run's ppl/ or compress/), links to the run reports, and the
    `tasks` results (results/{model}/tasks/{task}/{method}.json) per model."""
    from kvcore.atomic import write_text

    out_md = Path(out_md)
    runs, by_run = [Path(r) for r in runs], results_by_run(results)
    lines = ["# kvcore results across the grid", ""]
    if not runs:
        write_text(out_md, "\n".join(lines + ["No runs under this directory yet.", ""]))
        return out_md
    summary = out_md.parent / "summary.parquet"
    lines += [f"{len(runs)} run(s). Every result row is also in `{_rel(summary, out_md)}` "
              "(`SELECT * FROM 'results/summary.parquet'` in DuckDB).", "", "## Runs", ""]
    run_rows, all_rows = [], []
    for run in runs:
        records = collect_results(by_run.get(run, []), methods)
        meta_path = run / "metadata.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        base = next((r.get("baseline_perplexity") for r in records if r.get("baseline_perplexity") is not None), None)
        tried = [r for r in records if r.get("family") not in (None, "none") and r.get("passed") is not None]
        ok = [r for r in tried if r["passed"] and r.get("bits_per_element") is not None]
        best = min(ok, key=lambda r: (r["bits_per_element"], r.get("delta_percent") or 0)) if ok else None
        report = run / "report.md"
        link = f"[report]({_rel(report, out_md)})" if report.is_file() else "–"
        shape = (f"{meta['num_layers']}×{meta['num_kv_heads']}×{meta['head_dim']}" if meta else "–")
        run_rows.append([run.parent.name, run.name, _fmt(meta.get("n_sequences")),
                         _fmt(None if not meta else f"{meta.get('n_tokens', 0):,}"), shape, _fmt(meta.get("dtype")),
                         _fmt(base, ".3f"), f"{sum(1 for r in tried if r['passed'])}/{len(tried)}",
                         "–" if best is None else f"{best['method']} ({best['bits_per_element']:.3g} bits, "
                                                  f"{best.get('delta_percent') or 0:+.2f}%)", link])
        for row in _ppl_rows(records):
            all_rows.append([run.parent.name, run.name] + row)
    lines += [md_table(["model", "dataset", "sequences", "tokens", "layers×KV heads×dim", "dtype", "baseline ppl",
                        "passing", "fewest bits passing", "report"], run_rows), ""]
    lines += ["## Perplexity across the grid", ""]
    lines += [md_table(["model", "dataset"] + PPL_HEADER, all_rows), ""] if all_rows else ["No results yet.", ""]
    plots = [(run, run / "plots" / "compression_tradeoff.png") for run in runs]
    plots = [(r, p) for r, p in plots if p.is_file()]
    if plots:
        lines += ["## Compression trade-off per run", ""]
        for run, png in plots:
            lines += [f"### {run.parent.name} · {run.name}", "", f"![compression_tradeoff]({_rel(png, out_md)})", ""]
    by_model: dict[Path, list[Path]] = {}
    for f in map(Path, tasks):
        by_model.setdefault(f.parent.parent.parent, []).append(f)
    for model_dir in sorted(by_model):
        lines += _tasks_section(by_model[model_dir], out_md)
    write_text(out_md, "\n".join(lines))
    return out_md


# ---------------------------------------------------------------- the perplexity comparison table

PERPLEXITY_HEADER = ["method", "family", "protocol", BITS_LABEL, "ratio vs fp16", "perplexity", "Δ %",
                     "paired Δ % (95% CI)", "windows worse", "latency ×", "passed"]


def perplexity_rows(ppl_paths) -> tuple[str, list[list]]:
    """One row per (method, protocol) of one run's ppl/*.json, in the given order, and a line
    naming the shared protocol settings and the baseline perplexity."""
    rows, settings = [], None
    for path in map(Path, ppl_paths):
        data = _load(path)
        records = data.get("protocols") or {data.get("protocol"): data}
        family = (data.get("spec") or {}).get("family") or "none"
        for protocol, r in records.items():
            settings = settings or r
            if family == "none":
                continue
            paired = r.get("paired") or {}
            ci = paired.get("delta_percent_ci95")
            rows.append([data.get("method") or path.stem, family, protocol, _fmt(r.get("bits_per_element"), ".3g"),
                         _fmt(r.get("compression_ratio"), ".3g"), _fmt(r.get("compressed_perplexity"), ".3f"),
                         _fmt(r.get("delta_percent"), "+.2f"),
                         f"{ci[0]:+.2f} … {ci[1]:+.2f}" if ci else "–",
                         f"{paired.get('windows_worse', '–')}/{paired.get('n_windows', '–')}",
                         _fmt(r.get("latency_ratio"), ".3g"), _fmt(r.get("passed"))])
    if settings is None:
        return "no perplexity results", rows
    line = (f"{settings.get('n_tokens')} scored tokens in {settings.get('n_windows')} windows "
            f"({settings.get('layout')} layout, max_length {settings.get('max_length')}, stride "
            f"{settings.get('stride')}), {settings.get('dtype')}; baseline perplexity "
            f"{_fmt(settings.get('baseline_perplexity'), '.4f')}")
    return line, rows


def write_perplexity_table(runs: dict, out_md: str | Path, out_html: str | Path | None = None) -> Path:
    """results/perplexity.md: for each run ("model · dataset" -> its ppl JSON paths), the methods'
    perplexity under every protocol, with the paired per-window interval against the baseline."""
    return _write_run_tables(out_md, "Perplexity under compression",
                             "Δ % is the pooled change against the same job's baseline; the paired interval is "
                             "over the per-window differences of mean NLL; `passed`: Δ below the threshold. Ratios "
                             "count the stored form as if the cache were float16.",
                             runs, perplexity_rows, PERPLEXITY_HEADER, out_html)


def _write_run_tables(out_md, title: str, intro: str, runs: dict, rows_of, header: list[str], out_html=None) -> Path:
    """A markdown page: the title, the intro, then per run a heading, rows_of(paths)'s line and table
    (and, with `out_html`, the same page in HTML, for `snakemake --report`)."""
    from kvcore.atomic import write_text

    lines = [f"# {title}", "", intro, ""]
    parts = [f"<p>{html.escape(intro)}</p>"]
    for run, paths in runs.items():
        line, rows = rows_of(paths)
        lines += [f"## {run}", "", line, "", md_table(header, rows) if rows else "No methods.", ""]
        parts += [f"<h2>{html.escape(run)}</h2>", f"<p>{html.escape(line)}</p>",
                  html_table(header, rows) if rows else "<p>No methods.</p>"]
    write_text(out_md, "\n".join(lines))
    if out_html is not None:
        write_text(out_html, html_page(title, parts))
    return Path(out_md)


# ---------------------------------------------------------------- the compression comparison table


def compression_rows(metric_paths) -> tuple[str, list[list]]:
    """One row per compress/{method}.json of one run, in the given order, and a line naming
    what was compressed (sequences, tokens, the extracted dtype and its size on disk)."""
    rows, paths = [], [Path(p) for p in metric_paths]
    for path in paths:
        c = _load(path)
        rows.append(_compress_row({"method": path.stem, **c}, c.get("passed")))
    if not paths:
        return "no compression results", rows
    meta = _stored_metadata(paths[0].with_suffix(".safetensors"))
    line = (f"{len(json.loads(meta.get('seq_ids', '[]')))} sequences × {meta.get('seq_len', '?')} tokens, "
            f"{meta.get('num_layers', '?')} layers × {meta.get('num_kv_heads', '?')} KV heads × head_dim "
            f"{meta.get('head_dim', '?')}, extracted as {meta.get('dtype', '?')}: "
            f"{_load(paths[0]).get('original_size_bytes', 0):,} bytes")
    return line, rows


def _stored_metadata(path: Path) -> dict:
    """The string metadata of a compressed file: the extracted cache's (model, dtype, shape)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise KvcoreError(f"{path}: not a readable compressed file ({exc})") from None


def write_compression_table(runs: dict, out_md: str | Path, out_html: str | Path | None = None) -> Path:
    """results/compression.md: for each run ("model · dataset" -> its compress JSON paths), every
    method's stored size and reconstruction error, as the compress jobs measured them."""
    return _write_run_tables(out_md, "Compression of the extracted caches",
                             "Sizes are the bytes each compress job wrote (everything stored: codes, scales, zero "
                             "points, indices, masks, header); bits/elem counts full-precision parts as 16 bits and codes, "
                             "scales, zeros, indices and masks as stored (kvcore.compress.bits). `ratio` is "
                             "against the extracted file in its own dtype, `ratio vs fp16` against the same tensors "
                             "stored as float16. RMSE, SNR and cosine (mean over head_dim vectors; an evicted or "
                             "pruned vector counts 0) compare the decompressed cache with the extracted one.",
                             runs, compression_rows, COMPRESS_HEADER, out_html)
