"""Compress a whole extracted run: its shards merged along the sequence axis, one output.

The workflow's `compress` job: `compress/{method}.safetensors` is the compressed form of
every extracted sequence of the run, and `compress/{method}.json` its metrics.

Eviction needs to know which tokens matter, and attention-based scorers (kvzip, h2o,
snapkv) need the model for that. So for family `evict` each extracted sequence's tokens
(tokens.parquet) are prefilled again, scored and selected exactly as the perplexity
protocol selects a context (`Evict.select_extracted`), each sequence at its own length
(padding is never kept); the stored form then holds the *extracted* K/V at the kept
positions, bit for bit. knorm, random and streamingllm go through the same path.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from kvcore.atomic import write_json
from kvcore.compress import parse_method
from kvcore.errors import KvcoreError, UsageError


def code_modules(method: str, spec: dict | None) -> list[str]:
    """The kvcore modules a method's compress job runs (for the workflow's code inputs), found
    without importing torch: kvcore.compress loads families lazily (and kvcore.eviction its
    scorers), so the imports of this module alone would miss them."""
    from kvcore.compress.presets import preset_spec

    if spec is None or "family" not in spec:
        spec = {**preset_spec(method), **(spec or {})}
    family = spec.get("family", "none")
    modules = ["kvcore.compress.run", f"kvcore.compress.{'identity' if family == 'none' else family}"]
    if family == "evict":
        from kvcore.eviction import SCORERS

        if spec.get("scorer") not in SCORERS:
            raise UsageError(f"method {method!r}: scorer must be one of {', '.join(SCORERS)} "
                             f"(got {spec.get('scorer')!r})")
        modules.append(f"kvcore.eviction.{spec['scorer']}")  # evict.py imports the prefill machinery
    return modules


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
                 device: str | None = None, *, model_dir=None, tokens=None, model_device: str = "auto",
                 model_dtype: str = "auto", options: dict | None = None) -> dict:
    """Compress the run's shards with one method into out_safetensors and write its metrics.

    Family `evict` needs `model_dir` (the model that was extracted) and `tokens`
    (tokens.parquet) to score the tokens; `model_device`/`model_dtype` are the extraction's
    settings and `options` the perplexity protocol's (seed, scorer options, global_scope).
    `device` is where the compression itself runs (default CPU)."""
    from kvcore.compress.files import compress_file

    method = parse_method(name, spec)
    if method.needs_scores and (model_dir is None or tokens is None):
        raise UsageError(f"method {name!r} (family {method.family}) scores tokens with the model: "
                         "pass the model directory and tokens.parquet")
    with tempfile.TemporaryDirectory(dir=Path(out_safetensors).parent) as work:
        merged = Path(work) / "merged.safetensors"
        merge_shards(shards, merged)
        extra, scores = {}, None
        if method.needs_scores:
            start = time.perf_counter()
            masks, n_tokens = method.select_extracted(merged, model_dir, tokens, device=model_device,
                                                      dtype=model_dtype, options=options)
            # the masks are final: Evict.select returns a bool mask as it is
            scores = lambda layer, k, v: masks[layer]  # noqa: E731
            kept = sum(int(m.sum()) for m in masks) / (n_tokens * masks[0].shape[1] * len(masks))
            extra = {"scorer": method.scorer, "scoring_time_ms": 1000 * (time.perf_counter() - start),
                     "kept_fraction": kept}
        metrics = compress_file(merged, out_safetensors, method, scores, device=device)
    metrics.update(extra)
    write_json(out_json, metrics)
    return metrics
