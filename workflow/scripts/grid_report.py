from pathlib import Path

from kvcore.jobs import run_job
from kvcore.report import write_grid_report, write_summary


def job():
    results = Path(snakemake.output.md).parent
    write_summary(results, snakemake.output.summary, snakemake.params.methods)
    write_grid_report(results, snakemake.output.md, snakemake.params.methods)


run_job(snakemake.log[0], job)
