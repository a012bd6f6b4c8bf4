from kvcore.jobs import run_job
from kvcore.jobs.tasks import task_plot

run_job(snakemake.log[0], lambda: task_plot(snakemake.input.results, snakemake.output.png))
