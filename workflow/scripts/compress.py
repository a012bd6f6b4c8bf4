from kvcore.jobs import run_job
from kvcore.jobs.compress import compress

i, o = snakemake.input, snakemake.output
run_job(snakemake.log[0], lambda: compress(i.shards, o.safetensors, o.metrics, snakemake.wildcards.method,
                                           snakemake.params.spec))
