from kvcore.jobs import run_job
from kvcore.jobs.perplexity import run_perplexity_shard

i, p, w = snakemake.input, snakemake.params, snakemake.wildcards
run_job(snakemake.log[0], lambda: run_perplexity_shard(i.model, i.text, w.method, p.spec, p.settings, int(w.shard),
                                                       p.shards, snakemake.output.result),
        p.settings.get("device", "auto"), snakemake.threads)
