from kvcore.jobs import run_job
from kvcore.jobs.extract import finalize_extraction

i, o = snakemake.input, snakemake.output
run_job(snakemake.log[0], lambda: finalize_extraction(i.manifests, i.predictions, o.metadata, o.predictions))
