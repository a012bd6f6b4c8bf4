from kvcore.jobs import run_job
from kvcore.jobs.extract import tokenize

i, p = snakemake.input, snakemake.params
run_job(snakemake.log[0], lambda: tokenize(i.text, i.model, snakemake.output.tokens, p.seq_len, p.n_sequences, p.mode))
