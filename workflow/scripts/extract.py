from kvcore.jobs import run_job
from kvcore.jobs.extract import extract

i, w, settings = snakemake.input, snakemake.wildcards, snakemake.params.settings
run_job(snakemake.log[0], lambda: extract(i.model, i.tokens, snakemake.output.manifest, w.shard, w.model, w.dataset,
                                          settings), settings["device"], snakemake.threads)
