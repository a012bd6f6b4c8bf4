from kvcore.jobs import run_job
from kvcore.jobs.report import perplexity_table

run_job(snakemake.log[0], lambda: perplexity_table(snakemake.input.ppl, snakemake.output.md,
                                                   snakemake.output.html))
