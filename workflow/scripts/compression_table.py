from kvcore.jobs import run_job
from kvcore.report import run_labels, write_compression_table

run_job(snakemake.log[0], lambda: write_compression_table(run_labels(snakemake.input.metrics),
                                                          snakemake.output.md))
