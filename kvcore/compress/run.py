"""Compress a whole extracted run: its shards merged along the sequence axis, one output.

The workflow's `compress` job: `compress/{method}.safetensors` is the compressed form of
every extracted sequence of the run, and `compress/{method}.json` its metrics.

Eviction needs to know which tokens matter, and attention-based scorers (kvzip, h2o,
snapkv) need the model for that: the caller passes the keep masks (`select`), which
kvcore.evaluation.extracted chooses through the evaluation's one context-compression
path; the stored form then holds the *extracted* K/V at the kept positions, bit for bit.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from kvcore.atomic import write_json
from kvcore.compress import parse_method
from kvcore.errors import KvcoreError, UsageError


def merge_shards(paths: list[str | Path], out_path: Path) -> None:
    """One extracted-format safetensors holding every shard's sequences (right-padded)."""
    import torch
    from safetensors import safe_open

    from kvcore.tensorfile import save_tensors

    tensors: dict[str, list] = {}
    seq_ids, lengths, meta = [], [], {}
    for path in paths:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                seq_ids += json.loads(meta.get("seq_ids", "[]"))
                lengths += json.loads(meta.get("seq_lengths", "[]"))
                for name in f.keys():
                    tensors.setdefault(name, []).append(f.get_tensor(name))
        except Exception as exc:
            raise KvcoreError(f"{path}: not a readable extracted shard ({exc})") from None
    width = max(t.shape[2] for parts in tensors.values() for t in parts)
    merged = {name: torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2])) for t in parts])
              for name, parts in tensors.items()}
    save_tensors(merged, out_path, metadata={**meta, "seq_ids": json.dumps(seq_ids),
                                               "seq_lengths": json.dumps(lengths), "seq_len": str(width)})


def compress_run(shards: list[str | Path], out_safetensors, out_json, name: str, spec: dict,
                 device: str | None = None, *, select=None) -> dict:
    """Compress the run's shards with one method into out_safetensors and write its metrics.

    An evict method needs `select(merged_path) -> (masks, extra metrics)`: per layer the keep
    mask of every sequence (kvcore.evaluation.extracted chooses them with the model).
    `device` is where the compression itself runs (default CPU)."""
    from kvcore.compress.files import compress_file

    method = parse_method(name, spec)
    if method.needs_scores and select is None:
        raise UsageError(f"method {name!r} (family {method.family}) scores tokens with the model: "
                         "pass the model directory and tokens.parquet")
    with tempfile.TemporaryDirectory(dir=Path(out_safetensors).parent) as work:
        merged = Path(work) / "merged.safetensors"
        merge_shards(shards, merged)
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
