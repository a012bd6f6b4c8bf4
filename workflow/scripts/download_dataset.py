from kvcore.jobs import run_job
from kvcore.jobs.data import download_dataset

run_job(snakemake.log[0], lambda: download_dataset(snakemake.wildcards.dataset, snakemake.params.spec,
                                                   snakemake.output.text))
