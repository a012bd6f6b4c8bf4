from kvcore.jobs import run_job
from kvcore.jobs.tasks import task

i, p, w = snakemake.input, snakemake.params, snakemake.wildcards
run_job(snakemake.log[0], lambda: task(i.model, w.task, p.task_spec, w.task_method, p.settings, snakemake.output.result,
                                       i.filler, p.methods),
        p.settings.get("device", "auto"), snakemake.threads)  # claims a free GPU, as extraction does
