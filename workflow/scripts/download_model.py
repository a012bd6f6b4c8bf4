from pathlib import Path

from kvcore.jobs import run_job
from kvcore.sources import prepare_model

out = Path(snakemake.output.manifest).parent
run_job(snakemake.log[0], lambda: prepare_model(snakemake.wildcards.model, snakemake.params.spec, out))
