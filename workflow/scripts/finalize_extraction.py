from kvcore.jobs import run_job
from kvcore.storage import finalize_shards

i, o = snakemake.input, snakemake.output
run_job(snakemake.log[0], lambda: finalize_shards(list(i.manifests), list(i.predictions), o.metadata, o.predictions))
