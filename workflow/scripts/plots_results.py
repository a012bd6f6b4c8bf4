from kvcore.jobs import run_job
from kvcore.jobs.report import plots

run_job(snakemake.log[0], lambda: plots(snakemake.output, snakemake.params.methods, snakemake.input.results))
