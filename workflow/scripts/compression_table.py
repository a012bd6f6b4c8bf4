from kvcore.jobs import run_job
from kvcore.jobs.report import compression_table

run_job(snakemake.log[0], lambda: compression_table(snakemake.input.metrics, snakemake.output.md,
                                                    snakemake.output.html))
