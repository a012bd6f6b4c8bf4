from pathlib import Path

from kvcore.jobs import run_job
from kvcore.sources import prepare_dataset

out = Path(snakemake.output.text).parent
run_job(snakemake.log[0], lambda: prepare_dataset(snakemake.wildcards.dataset, snakemake.params.spec, out))
