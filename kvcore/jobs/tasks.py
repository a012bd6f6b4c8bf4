"""The task rules' jobs: one method's needle / QA result, and a task's accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path


def task(model_dir, name: str, spec: dict, method: str, settings: dict, result, filler, config_methods: dict) -> None:
    """results/{model}/tasks/{name}/{method}.json (`filler`: the needle's filler corpus, or none)."""
    from kvcore.tasks.evaluate import run_task

    run_task(model_dir, name, spec, [method], settings, {method: result}, filler_parquet=filler or None,
             config_methods=config_methods)


def task_plot(results, png) -> None:
    from kvcore.plots_tasks import plot_task_accuracy

    plot_task_accuracy([json.loads(Path(p).read_text()) for p in results], png)
