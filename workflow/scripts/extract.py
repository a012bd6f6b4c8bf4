from pathlib import Path

from kvcore.extract import extract_shard
from kvcore.jobs import run_job

p, w = snakemake.params, snakemake.wildcards
run_job(snakemake.log[0], lambda: extract_shard(
    snakemake.input.model, snakemake.input.tokens, Path(snakemake.output.manifest).parent.parent,
    int(w.shard), p.shard_size, p.batch_size, p.device, p.dtype, p.top_k, w.model, w.dataset,
    parquet_layers=p.parquet_layers, parquet_heads=p.parquet_heads, parts=p.parts, storage_dtype=p.storage_dtype),
    p.device)
