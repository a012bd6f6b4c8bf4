"""Thin: one perplexity job, one shard of it (perplexity.shards > 1), or the merge of its shards."""

from kvcore.jobs import run_job
from kvcore.evaluation.perplexity import merge_shard_files, run_perplexity, run_perplexity_shard

i, p, w = snakemake.input, snakemake.params, snakemake.wildcards
out = snakemake.output.result
if "shards" in i.keys():  # the merge: no model, no GPU
    run_job(snakemake.log[0], lambda: merge_shard_files(list(i.shards), out))
elif "shard" in w.keys():
    run_job(snakemake.log[0], lambda: run_perplexity_shard(
        i.model, i.text, w.method, p.spec, p.settings, int(w.shard), p.shards, out),
        p.settings.get("device", "auto"))
else:
    run_job(snakemake.log[0], lambda: run_perplexity(i.model, i.text, w.method, p.spec, p.settings, out),
            p.settings.get("device", "auto"))
