from kvcore.compress.run import compress_run
from kvcore.jobs import run_job

o = snakemake.output
run_job(snakemake.log[0], lambda: compress_run(
    snakemake.input.shards, o.safetensors, o.metrics, snakemake.wildcards.method, snakemake.params.spec))
