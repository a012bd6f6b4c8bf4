"""Compress a whole extracted run: its shards merged along the sequence axis, one output.

The workflow's `compress` job: `compress/{method}.safetensors` is the compressed form of
every extracted sequence of the run, and `compress/{method}.json` its metrics.

Eviction needs to know which tokens matter, and attention-based scorers (kvzip, h2o,
snapkv) need the model for that: the caller passes the keep masks (`select`), which
kvcore.evaluation.extracted chooses through the evaluation's one context-compression
path; the stored form then holds the *extracted* K/V at the kept positions, bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

from kvcore.atomic import write_json
from kvcore.compress import parse_method
from kvcore.compress.shards import MergedShards
from kvcore.errors import UsageError


def compress_run(shards: list[str | Path], out_safetensors, out_json, name: str, spec: dict,
                 device: str | None = None, *, select=None) -> dict:
    """Compress the run's shards with one method into out_safetensors and write its metrics.

    The shards are read as one merged file (`MergedShards`), one layer at a time. An evict
    method needs `select(merged) -> (masks, extra metrics)`: per layer the keep mask of every
    sequence (kvcore.evaluation.extracted chooses them). `device` is where the compression
    itself runs (default CPU; "auto": CUDA when there is a GPU)."""
    from kvcore.compress.files import compress_file

    method = parse_method(name, spec)
    if method.needs_scores and select is None:
        raise UsageError(f"method {name!r} (family {method.family}) scores tokens with the model: "
                         "pass the model directory and tokens.parquet")
    with MergedShards(shards) as merged:
        extra, scores = {}, None
        if method.needs_scores:
            start = time.perf_counter()
            masks, extra = select(merged)
            # the masks are final: Evict.select returns a bool mask as it is
            scores = lambda layer, k, v: masks[layer]  # noqa: E731
            extra = {"scorer": method.scorer, "scoring_time_ms": 1000 * (time.perf_counter() - start), **extra}
        metrics = compress_file(merged, out_safetensors, method, scores, device=device)
    metrics.update(extra)
    write_json(out_json, metrics)
    return metrics
