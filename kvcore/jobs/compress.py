"""The compress rules' jobs: a run's extracted cache compressed with one method, and its metrics."""

from __future__ import annotations

from pathlib import Path


def compress(shards, safetensors, metrics, method: str, spec: dict) -> dict:
    """compress/{method}.safetensors and .json of a method that needs no model (rule compress)."""
    from kvcore.compress.run import compress_run

    return compress_run(list(shards), safetensors, metrics, method, spec)


def compress_evict(shards, safetensors, metrics, method: str, spec: dict, model_dir, tokens, device: str,
                   dtype: str) -> dict:
    """The same for an evict method: the model that was extracted, on the extraction's device and
    dtype, scores the tokens of tokens.parquet (rule compress_evict)."""
    from kvcore.evaluation.extracted import compress_extracted

    return compress_extracted(list(shards), safetensors, metrics, method, spec, model_dir=Path(model_dir),
                              tokens=tokens, model_device=device, model_dtype=dtype)
