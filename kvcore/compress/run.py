"""Compress a whole extracted run: its shards merged along the sequence axis, one output.

The workflow's `compress` job: `compress/{method}.safetensors` is the compressed form of
every extracted sequence of the run, and `compress/{method}.json` its metrics.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kvcore.atomic import write_json
from kvcore.compress import parse_method
from kvcore.compress.files import compress_file
from kvcore.errors import KvcoreError


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
                 device: str | None = None) -> dict:
    method = parse_method(name, spec)
    with tempfile.TemporaryDirectory(dir=Path(out_safetensors).parent) as work:
        merged = Path(work) / "merged.safetensors"
        merge_shards(shards, merged)
        metrics = compress_file(merged, out_safetensors, method, device=device)
    write_json(out_json, metrics)
    return metrics
