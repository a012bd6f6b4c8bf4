from pathlib import Path

from kvcore.jobs import run_job
from kvcore.report import write_run_report

out, i = Path(snakemake.output.md), snakemake.input
run_job(snakemake.log[0], lambda: write_run_report(out.parent, out, methods=snakemake.params.methods,
                                                   results=list(i.results), tasks=list(i.tasks)))
