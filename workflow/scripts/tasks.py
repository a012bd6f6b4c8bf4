"""Thin: one task job (results/{model}/tasks/{task}/{method}.json) or its plot."""

import json
from pathlib import Path

from kvcore.jobs import run_job

if "png" in snakemake.output.keys():
    from kvcore.plots_tasks import plot_task_accuracy

    run_job(snakemake.log[0], lambda: plot_task_accuracy(
        [json.loads(Path(p).read_text()) for p in snakemake.input.results], snakemake.output.png))
else:
    from kvcore.tasks.evaluate import run_task

    w = snakemake.wildcards
    run_job(snakemake.log[0], lambda: run_task(
        snakemake.input.model, w.task, snakemake.params.task_spec, [w.task_method],
        snakemake.params.settings, {w.task_method: snakemake.output.result},
        filler_parquet=snakemake.input.filler or None, config_methods=snakemake.params.methods),
        snakemake.params.settings.get("device", "auto"))  # claims a free GPU, as extraction does
