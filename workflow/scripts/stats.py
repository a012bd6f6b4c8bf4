from pathlib import Path

from kvcore.jobs import run_job
from kvcore.stats import write_stats

run_job(snakemake.log[0], lambda: write_stats(Path(snakemake.input.metadata).parent,
                                              Path(snakemake.output.tables[0]).parent, threads=snakemake.threads))
