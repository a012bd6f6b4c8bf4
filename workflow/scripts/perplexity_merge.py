from kvcore.jobs import run_job
from kvcore.jobs.perplexity import merge_shard_files

# the merge loads no model: it runs on the CPU
run_job(snakemake.log[0], lambda: merge_shard_files(list(snakemake.input.shards), snakemake.output.result))
