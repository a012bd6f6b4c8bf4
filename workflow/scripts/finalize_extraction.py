from pathlib import Path

from kvcore.jobs import run_job
from kvcore.storage import finalize_run

run_job(snakemake.log[0], lambda: finalize_run(Path(snakemake.output.metadata).parent,
                                               len(snakemake.input.manifests)))
