from pathlib import Path

from kvcore.jobs import run_job
from kvcore.report import write_grid_report, write_summary

i, o, methods = snakemake.input, snakemake.output, snakemake.params.methods


def job():
    write_summary(list(i.results), o.summary, methods)
    write_grid_report([Path(r).parent for r in i.reports], o.md, list(i.results), methods, list(i.tasks))


run_job(snakemake.log[0], job)
