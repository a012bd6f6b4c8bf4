from kvcore.jobs import run_job
from kvcore.model import load_tokenizer
from kvcore.tokens import write_tokens

p = snakemake.params
run_job(snakemake.log[0], lambda: write_tokens(
    snakemake.input.text, load_tokenizer(snakemake.input.model), snakemake.output.tokens,
    p.seq_len, p.n_sequences, p.mode))
