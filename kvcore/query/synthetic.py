"""A synthetic run directory with kvcore's own writer, for benchmarks and tests.

Same layout as an extraction (kv/part-S.safetensors in bfloat16, shards/layer=L/part-S.parquet via
`layer_table` + `write_parquet`, shards/kv-S.json manifests, tokens.parquet; `finalize_run` compacts
the parts into kv/layer=L/data.parquet and writes metadata.json), but random vectors, so a 20M-row
run takes minutes and no model. Values are bfloat16, as a model run in bf16 caches them; each
(layer, head) gets its own scale so norms differ the way they do in real caches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvcore.atomic import atomic_path, write_json
from kvcore.storage import (METADATA_KEYS, finalize_run, layer_table, part_file, safetensors_metadata, shard_name,
                            write_parquet)
from kvcore.tokens import write_tokens_table


def _bf16(x: np.ndarray) -> np.ndarray:
    return (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def scale(layer: int, head: int) -> float:
    return 0.05 + 0.1 * ((layer * 7 + head * 3) % 11)


def write_synthetic_run(run_dir: str | Path, *, num_layers: int = 30, num_kv_heads: int = 3, num_heads: int = 9,
                        head_dim: int = 64, n_sequences: int = 16, seq_len: int = 128, shard_size: int = 8,
                        vocab: int = 4096, seed: int = 0, model: str = "synthetic", dataset: str = "random",
                        progress=None, finalize: bool = True) -> dict:
    """Returns metadata.json's contents, or with `finalize` False (a run still extracting: shard
    parts and manifests, no layer files, no metadata.json) the number of shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from kvcore.tensorfile import TensorFileWriter

    run_dir = Path(run_dir)
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, vocab, size=(n_sequences, seq_len), dtype=np.int32)
    words = np.array([f"w{i}" for i in range(vocab)], dtype=object)
    with atomic_path(run_dir / "tokens.parquet") as tmp:
        write_tokens_table(pa.table({
            "seq_id": np.repeat(np.arange(n_sequences, dtype=np.int32), seq_len),
            "pos": np.tile(np.arange(seq_len, dtype=np.int32), n_sequences),
            "token_id": token_ids.reshape(-1),
            "token": pa.array(words[token_ids.reshape(-1)], pa.string()),
            "doc_id": np.repeat(np.arange(n_sequences, dtype=np.int32), seq_len)}), tmp)
    meta = {"model": model, "dataset": dataset, "num_layers": num_layers, "num_kv_heads": num_kv_heads,
            "num_heads": num_heads, "head_dim": head_dim, "seq_len": seq_len, "dtype": "bfloat16"}
    scales = np.array([[scale(layer, h) for h in range(num_kv_heads)] for layer in range(num_layers)], np.float32)
    n_shards = -(-n_sequences // shard_size)
    for shard in range(n_shards):
        seq_ids = list(range(shard * shard_size, min((shard + 1) * shard_size, n_sequences)))
        ids = [token_ids[s].tolist() for s in seq_ids]
        shape = (len(seq_ids), num_kv_heads, seq_len, head_dim)
        rows = 0
        specs = {f"layer_{layer}_{kind}": ("bfloat16", shape) for layer in range(num_layers)
                 for kind in ("key", "value")}
        tensors = f"kv/{shard_name(shard)}.safetensors"
        with atomic_path(run_dir / tensors) as tensor_tmp:
            out = TensorFileWriter(tensor_tmp, specs, safetensors_metadata(meta, seq_ids, [seq_len] * len(seq_ids)))
            try:
                for layer in range(num_layers):
                    s = scales[layer][None, :, None, None]
                    keys = _bf16(rng.standard_normal(shape, dtype=np.float32) * s)
                    values = _bf16(rng.standard_normal(shape, dtype=np.float32) * s)
                    for kind, x in (("key", keys), ("value", values)):  # a bf16 is the top half of its float32
                        bits = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
                        out.write(f"layer_{layer}_{kind}", 0, torch.from_numpy(bits).view(torch.bfloat16))
                    table = layer_table(keys, values, seq_ids, ids)
                    rows = table.num_rows
                    with atomic_path(run_dir / part_file(layer, shard)) as tmp:
                        write_parquet(table, tmp)
            except BaseException:
                out.abort()
                raise
            out.close()
        with atomic_path(run_dir / "shards" / f"predictions-{shard:05d}.parquet") as tmp:
            pq.write_table(pa.table({"seq_id": pa.array(seq_ids, pa.int32()), "rank": pa.array([0] * len(seq_ids),
                           pa.int16()), "token_id": pa.array([0] * len(seq_ids), pa.int32()),
                           "token": pa.array(["w0"] * len(seq_ids)), "probability": pa.array([1.0] * len(seq_ids),
                           pa.float32()), "logit": pa.array([0.0] * len(seq_ids), pa.float32())}), tmp)
        write_json(run_dir / "shards" / f"kv-{shard:05d}.json", {
            "shard": shard, "seq_ids": seq_ids, "seq_lengths": [seq_len] * len(seq_ids),
            "n_tokens": seq_len * len(seq_ids), "n_rows_per_layer": rows,
            "files": [part_file(i, shard) for i in range(num_layers)] + [tensors],
            **{k: meta[k] for k in METADATA_KEYS}})
        if progress:
            progress(shard + 1, n_shards)
    return finalize_run(run_dir, n_shards) if finalize else {"n_shards": n_shards}


def manifest_files(run_dir: str | Path) -> list[Path]:
    """Every Parquet file that complete shards list (what the query views read)."""
    run_dir = Path(run_dir)
    out = []
    for p in sorted((run_dir / "shards").glob("kv-*.json")):
        out += [run_dir / f for f in json.loads(p.read_text())["files"] if f.endswith(".parquet")]
    return out
