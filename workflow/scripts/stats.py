from kvcore.jobs import run_job
from kvcore.jobs.stats import stats

i = snakemake.input
run_job(snakemake.log[0], lambda: stats(i.shards, i.metadata, snakemake.output.tables, snakemake.threads,
                                        snakemake.params.device))
