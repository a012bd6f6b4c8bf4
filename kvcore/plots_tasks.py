"""task_accuracy.png: a task's primary metric against the keep ratio, one line per method.

`results` are the documents of `results/{model}/tasks/{task}/{method}.json` (a list,
or a dict name -> document). Eviction methods are lines over their keep ratios; a
method evaluated once (quantization, pruning: keep_ratio null) is a marker at its
kv_bytes fraction; the uncompressed baseline is a dashed line. With several tasks in
`results` there is one panel per task.
"""

from __future__ import annotations

from pathlib import Path

from kvcore.errors import UsageError
from kvcore.plots._common import figure, save

METRIC_LABELS = {"accuracy": "accuracy (answer contained)", "f1": "F1", "rouge_l": "ROUGE-L",
                 "exact_match": "exact match"}


def plot_task_accuracy(results, out_png: str | Path) -> Path:
    docs = list(results.values()) if isinstance(results, dict) else list(results)
    if not docs:
        raise UsageError("plot_task_accuracy: no task results to plot")
    tasks: dict[str, list[dict]] = {}
    for doc in docs:
        tasks.setdefault(doc.get("task", "task"), []).append(doc)
    fig, axes = figure(1, len(tasks), size=(6.5 * len(tasks), 4.8))
    for ax, (task, group) in zip(axes[0], tasks.items()):
        metric = group[0].get("primary_metric", "accuracy")
        for doc in sorted(group, key=lambda d: d["method"]):
            rows = doc["results"]
            xs = [r["keep_ratio"] if r["keep_ratio"] is not None else r.get("kv_fraction") for r in rows]
            ys = [r.get(metric) for r in rows]
            pts = sorted((x, y) for x, y in zip(xs, ys) if x is not None and y is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=doc["method"])
        base = group[0].get("baseline", {}).get(metric)
        if base is not None:
            ax.axhline(base, color="black", linestyle="--", linewidth=1, label="uncompressed")
        ax.set_xlabel("keep ratio (fraction of context tokens kept)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_ylim(-0.03, 1.03)
        ax.invert_xaxis()
        n = group[0].get("n_examples")
        model = group[0].get("model", "")
        ax.set_title(f"{task} · {model}" + (f" ({n} examples)" if n else ""))
        ax.legend(loc="lower left")
    return save(fig, out_png)
