from kvcore.jobs import run_job
from kvcore.sources import prepare_model

run_job(snakemake.log[0], lambda: prepare_model(snakemake.wildcards.model, snakemake.params.spec,
                                                snakemake.output.model))
