from kvcore.jobs import run_job
from kvcore.jobs.compress import compress_evict

i, o, p = snakemake.input, snakemake.output, snakemake.params
run_job(snakemake.log[0], lambda: compress_evict(i.shards, o.safetensors, o.metrics, snakemake.wildcards.method,
                                                 p.spec, i.model, i.tokens, p.device, p.dtype), p.device,
        snakemake.threads)
