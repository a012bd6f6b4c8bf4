from kvcore.jobs import run_job
from kvcore.report import write_perplexity_table

run_job(snakemake.log[0], lambda: write_perplexity_table(snakemake.params.runs, snakemake.output.md))
