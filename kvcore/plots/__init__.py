"""The analysis plots of a run, one function per PNG; each returns the data it drew.

Stat plots take the statistics tables (`kvcore.stats.compute_stats` or `read_stats`);
result plots also take result records (`kvcore.report.collect_results`). `write_plots`
draws a whole set for a run directory; the workflow calls it twice, once for STAT_PLOTS
(inputs: stats/*.parquet) and once for RESULT_PLOTS (inputs: stats plus every
ppl/{method}.json and compress/{method}.json of the run), so that adding a method does not
redraw the cache plots.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# name -> "module:function" of kvcore.plots, imported when drawn: matplotlib takes a second to
# import, and the workflow reads these names while Snakemake builds its DAG
STAT_PLOTS = {
    "layer_statistics": "cache:plot_layer_statistics",
    "head_sparsity": "cache:plot_head_sparsity",
    "weight_magnitude_distribution": "cache:plot_weight_magnitude_distribution",
    "channel_outliers": "cache:plot_channel_outliers",
    "key_norm_by_position": "cache:plot_key_norm_by_position",
    "cross_layer_similarity": "cache:plot_cross_layer_similarity",
}
RESULT_PLOTS = {
    "pruning_heatmap_by_layer_head": "pruning:plot_pruning_heatmap",
    "layer_pruning_potential": "pruning:plot_layer_pruning_potential",
    "head_pruning_potential": "pruning:plot_head_pruning_potential",
    "compression_tradeoff": "results:plot_compression_tradeoff",
}
# Drawn only where their inputs exist (not fixed workflow outputs):
#   attention_sinks.png   from {run}/attention/sinks.parquet (layer, head, key_pos, attention)
#   task_accuracy.png     owned by the task-evaluation stage
OPTIONAL_PLOTS = ("attention_sinks", "task_accuracy")
ALL_PLOTS = {**STAT_PLOTS, **RESULT_PLOTS}
_FUNCTIONS = {spec.split(":")[1]: spec for spec in [*ALL_PLOTS.values(), "results:plot_attention_sinks"]}

__all__ = ["STAT_PLOTS", "RESULT_PLOTS", "ALL_PLOTS", "OPTIONAL_PLOTS", "write_plots", "plot_function", *_FUNCTIONS]


def _load(spec: str):
    module, function = spec.split(":")
    return getattr(importlib.import_module(f"kvcore.plots.{module}"), function)


def plot_function(name: str):
    """The function drawing plot `name` (of ALL_PLOTS, or attention_sinks)."""
    return _load(ALL_PLOTS.get(name) or _FUNCTIONS[f"plot_{name}"])


def __getattr__(name: str):  # the plot functions by their own names, imported on first use
    if name in _FUNCTIONS:
        return _load(_FUNCTIONS[name])
    raise AttributeError(f"module 'kvcore.plots' has no attribute {name!r}")


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None, names=None, stats_dir=None,
                methods: dict | None = None, results=()) -> dict:
    """Draw `names` into out_dir (default run_dir/plots). Default names: every plot in STAT_PLOTS and
    RESULT_PLOTS, plus attention_sinks when {run_dir}/attention/sinks.parquet exists ("attention_sinks"
    may also be named explicitly; it is skipped, not an error, while that file is absent).

    `results`: the run's ppl/compress JSON files the result plots read (`kvcore.report.collect_results`);
    `methods`: the config's `methods:` mapping, so result records know each method's family and
    parameters (pruned layers/heads) even where the result JSON does not say. Returns {name: data drawn}.
    """
    from kvcore.errors import UsageError
    from kvcore.report import collect_results
    from kvcore.stats import read_stats, stats_meta

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    sinks = run_dir / "attention" / "sinks.parquet"
    names = list(ALL_PLOTS) + ["attention_sinks"] if names is None else list(names)
    unknown = [n for n in names if n not in ALL_PLOTS and n != "attention_sinks"]
    if unknown:
        raise UsageError(f"unknown plot(s) {', '.join(unknown)}; valid: {', '.join(ALL_PLOTS)}")
    stats = read_stats(stats_dir or run_dir / "stats")
    meta = stats_meta(stats)
    records = collect_results(results, methods) if any(n in RESULT_PLOTS for n in names) else []
    out = {}
    for name in names:
        png = out_dir / f"{name}.png"
        if name == "attention_sinks":
            if sinks.is_file():
                import pyarrow.parquet as pq

                out[name] = plot_function(name)(pq.read_table(sinks), png, meta)
        elif name == "compression_tradeoff":
            out[name] = plot_function(name)(records, png, meta)
        elif name in RESULT_PLOTS:
            out[name] = plot_function(name)(stats, png, records)
        else:
            out[name] = plot_function(name)(stats, png)
    return out
