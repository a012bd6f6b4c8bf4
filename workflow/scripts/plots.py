from pathlib import Path

from kvcore.jobs import run_job
from kvcore.plots import write_plots

out = Path(snakemake.output[0]).parent
run_job(snakemake.log[0], lambda: write_plots(out.parent, out, names=[Path(p).stem for p in snakemake.output],
                                              methods=snakemake.params.methods))
