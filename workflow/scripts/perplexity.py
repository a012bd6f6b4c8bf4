from pathlib import Path

from kvcore.jobs import run_job
from kvcore.perplexity import run_perplexity

run_job(snakemake.log[0], lambda: run_perplexity(
    Path(snakemake.input.model).parent, snakemake.input.text, snakemake.wildcards.method,
    snakemake.params.spec, snakemake.params.settings, snakemake.output.result))
