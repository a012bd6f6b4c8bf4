from kvcore.jobs import run_job
from kvcore.jobs.data import download_model

run_job(snakemake.log[0], lambda: download_model(snakemake.wildcards.model, snakemake.params.spec,
                                                 snakemake.output.model))
