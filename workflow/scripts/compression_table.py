from kvcore.jobs import run_job
from kvcore.report import write_compression_table

run_job(snakemake.log[0], lambda: write_compression_table(snakemake.params.runs, snakemake.output.md))
