from pathlib import Path

from kvcore.jobs import run_job
from kvcore.stats import write_stats

i = snakemake.input
run_job(snakemake.log[0], lambda: write_stats(list(i.shards), Path(snakemake.output.tables[0]).parent,
                                              metadata=i.metadata, threads=snakemake.threads,
                                              device=snakemake.params.device))
