from kvcore.jobs import run_job
from kvcore.jobs.report import run_report

i = snakemake.input
run_job(snakemake.log[0], lambda: run_report(snakemake.output.md, snakemake.params.methods, i.results, i.tasks))
