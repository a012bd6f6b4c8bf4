from kvcore.jobs import run_job
from kvcore.report import run_labels, write_perplexity_table

run_job(snakemake.log[0], lambda: write_perplexity_table(run_labels(snakemake.input.ppl), snakemake.output.md))
