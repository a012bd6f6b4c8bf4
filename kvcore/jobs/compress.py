"""The compress rules' jobs: a run's extracted cache compressed with one method, and its metrics."""

from __future__ import annotations

from pathlib import Path


def compress(shards, safetensors, metrics, method: str, spec: dict, device: str) -> dict:
    """compress/{method}.safetensors and .json of a method that needs no model (rule compress),
    packed on `device` ("auto": the GPU when there is one). Evict methods whose scorer reads
    only the cache (knorm, streamingllm, random) choose their tokens from the extracted keys."""
    from kvcore.evaluation.extracted import compress_extracted

    return compress_extracted(list(shards), safetensors, metrics, method, spec, device)


def compress_evict(shards, safetensors, metrics, method: str, spec: dict, model_dir, tokens, device: str,
                   dtype: str) -> dict:
    """The same for an evict method whose scorer reads attention: the model that was extracted,
    on the extraction's device and dtype, scores the tokens of tokens.parquet (rule compress_evict)."""
    from kvcore.evaluation.extracted import compress_extracted

    return compress_extracted(list(shards), safetensors, metrics, method, spec, device, model_dir=Path(model_dir),
                              tokens=tokens, model_device=device, model_dtype=dtype)
