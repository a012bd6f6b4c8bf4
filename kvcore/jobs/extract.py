"""The extract rules' jobs: tokenize a dataset, extract one shard's KV cache, merge the shards' metadata."""

from __future__ import annotations

from pathlib import Path


def tokenize(text_parquet, model_dir, tokens_parquet, seq_len: int, n_sequences: int, mode: str) -> None:
    from kvcore.model import load_tokenizer
    from kvcore.tokens import write_tokens

    write_tokens(text_parquet, load_tokenizer(model_dir), tokens_parquet, seq_len, n_sequences, mode)


def extract(model_dir, tokens_parquet, manifest, shard: str, model: str, dataset: str, settings: dict) -> None:
    """Shard `shard` of a run, written beside its manifest (results/{model}/{dataset}/shards/kv-{shard}.json);
    `settings`: the rule's params (config `extract:`)."""
    from kvcore.extract import extract_shard

    s = settings
    extract_shard(model_dir, tokens_parquet, Path(manifest).parent.parent, int(shard), s["shard_size"],
                  s["batch_size"], s["device"], s["dtype"], s["top_k"], model, dataset,
                  parquet_layers=s["parquet_layers"], parquet_heads=s["parquet_heads"], parts=s["parts"],
                  storage_dtype=s["storage_dtype"])


def finalize_extraction(manifests, predictions, metadata, predictions_out) -> None:
    from kvcore.storage import finalize_shards

    finalize_shards(list(manifests), list(predictions), metadata, predictions_out)
