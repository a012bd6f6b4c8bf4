from pathlib import Path

from kvcore.jobs import run_job
from kvcore.plots import write_plots

out = Path(snakemake.output[0]).parent
# plots_cache has neither results nor methods: it draws the statistics only
run_job(snakemake.log[0], lambda: write_plots(out.parent, out, names=[Path(p).stem for p in snakemake.output],
                                              methods=snakemake.params.get("methods"),
                                              results=snakemake.input.get("results", [])))
