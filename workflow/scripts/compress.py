from kvcore.jobs import run_job
from kvcore.jobs.compress import compress

# packs on p.device without a GPU claim: rule compress holds no `gpu` resource
i, o, p = snakemake.input, snakemake.output, snakemake.params
run_job(snakemake.log[0], lambda: compress(i.shards, o.safetensors, o.metrics, snakemake.wildcards.method, p.spec,
                                           p.device), threads=snakemake.threads)
