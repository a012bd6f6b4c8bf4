from kvcore.jobs import run_job
from kvcore.jobs.report import plots

# the cache plots draw the statistics only: neither methods nor results reach them
run_job(snakemake.log[0], lambda: plots(snakemake.output))
