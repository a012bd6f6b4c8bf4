from kvcore.jobs import run_job
from kvcore.jobs.report import grid_report

i, o = snakemake.input, snakemake.output
run_job(snakemake.log[0], lambda: grid_report(i.reports, i.results, i.tasks, snakemake.params.methods, o.md,
                                              o.summary, o.summary_html))
