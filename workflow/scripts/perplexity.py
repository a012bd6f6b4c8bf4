from kvcore.jobs import run_job
from kvcore.jobs.perplexity import run_perplexity

i, p, w = snakemake.input, snakemake.params, snakemake.wildcards
run_job(snakemake.log[0], lambda: run_perplexity(i.model, i.text, w.method, p.spec, p.settings, snakemake.output.result,
                                                 baseline=i.baseline[0] if i.baseline else None),
        p.settings.get("device", "auto"), snakemake.threads)
