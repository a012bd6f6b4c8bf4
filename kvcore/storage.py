"""The on-disk form of an extracted KV cache (DESIGN.md, "KV tables" and "Safetensors").

A run directory holds, per shard of sequences:
  kv/layer={L}/part-{shard}.parquet   one row per (seq_id, pos, head), sorted that way
  kv/part-{shard}.safetensors         layer_{i}_key / layer_{i}_value [n_seq, n_kv, seq_len, head_dim]
  shards/kv-{shard}.json              written last: the shard is complete when this exists
  shards/predictions-{shard}.parquet  next-token top-k of each sequence
and, once every shard is done, metadata.json and predictions.parquet (`finalize_run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from kvcore import __version__
from kvcore.atomic import atomic_path, write_json
from kvcore.errors import KvcoreError

# Row groups of this many rows: small enough that a point lookup reads one group of one
# file, large enough that scans stay sequential (decided in benchmarks/, issue 9).
ROW_GROUP_ROWS = 32768
PARQUET_COMPRESSION = "zstd"
METADATA_KEYS = ("model", "dataset", "num_layers", "num_kv_heads", "num_heads", "head_dim", "seq_len", "dtype")


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}"


def kv_schema(head_dim: int):
    import pyarrow as pa

    vector = pa.list_(pa.float32(), head_dim)
    return pa.schema([("seq_id", pa.int32()), ("pos", pa.int32()), ("token_id", pa.int32()), ("head", pa.int16()),
                      ("key", vector), ("value", vector), ("key_norm", pa.float32()), ("value_norm", pa.float32())])


def layer_table(keys: np.ndarray, values: np.ndarray, seq_ids: list[int], token_ids: list[list[int]]):
    """Arrow rows for one layer of a shard; keys/values [n_seq, n_kv, seq_len, dim] float32.

    Sequences may be shorter than seq_len (prompts); only their real positions become rows.
    """
    import pyarrow as pa

    n_seq, n_kv, _, dim = keys.shape
    parts_k, parts_v, seq_col, pos_col, tok_col = [], [], [], [], []
    for i, ids in enumerate(token_ids):
        length = len(ids)
        # [n_kv, len, dim] -> [len, n_kv, dim]: rows ordered (pos, head) inside a sequence
        parts_k.append(keys[i, :, :length].transpose(1, 0, 2).reshape(-1, dim))
        parts_v.append(values[i, :, :length].transpose(1, 0, 2).reshape(-1, dim))
        seq_col.append(np.full(length * n_kv, seq_ids[i], np.int32))
        pos_col.append(np.repeat(np.arange(length, dtype=np.int32), n_kv))
        tok_col.append(np.repeat(np.asarray(ids, np.int32), n_kv))
    k = np.ascontiguousarray(np.concatenate(parts_k), dtype=np.float32)
    v = np.ascontiguousarray(np.concatenate(parts_v), dtype=np.float32)
    n_rows = k.shape[0]
    schema = kv_schema(dim)
    vec = schema.field("key").type
    return pa.table({
        "seq_id": np.concatenate(seq_col),
        "pos": np.concatenate(pos_col),
        "token_id": np.concatenate(tok_col),
        "head": np.tile(np.arange(n_kv, dtype=np.int16), n_rows // n_kv),
        "key": pa.FixedSizeListArray.from_arrays(pa.array(k.reshape(-1)), type=vec),
        "value": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), type=vec),
        "key_norm": np.linalg.norm(k, axis=1).astype(np.float32),
        "value_norm": np.linalg.norm(v, axis=1).astype(np.float32),
    }, schema=schema)


def write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression=PARQUET_COMPRESSION,
                   write_statistics=True)


def safetensors_metadata(meta: dict, seq_ids: list[int], lengths: list[int]) -> dict[str, str]:
    out = {k: str(meta[k]) for k in METADATA_KEYS}
    out.update(seq_ids=json.dumps(seq_ids), seq_lengths=json.dumps(lengths), kvcore_version=__version__)
    return out


class ShardWriter:
    """Collects one shard's per-batch caches and writes them atomically on `close()`."""

    def __init__(self, run_dir: str | Path, shard: int, meta: dict):
        self.run_dir, self.shard, self.meta = Path(run_dir), shard, meta
        self.seq_ids: list[int] = []
        self.token_ids: list[list[int]] = []
        self.keys: list[list[np.ndarray]] = [[] for _ in range(meta["num_layers"])]
        self.values: list[list[np.ndarray]] = [[] for _ in range(meta["num_layers"])]
        self.tensors: dict[str, list] = {}
        self.predictions: list = []

    def add(self, seq_ids: list[int], token_ids: list[list[int]], layer_keys, layer_values, predictions) -> None:
        """One batch: per-layer torch tensors [batch, n_kv, seq, dim] in the model dtype."""
        self.seq_ids += seq_ids
        self.token_ids += token_ids
        for i, (k, v) in enumerate(zip(layer_keys, layer_values)):
            self.tensors.setdefault(f"layer_{i}_key", []).append(k.cpu())
            self.tensors.setdefault(f"layer_{i}_value", []).append(v.cpu())
        self.predictions.append(predictions)

    def close(self) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        from safetensors.torch import save_file

        name = shard_name(self.shard)
        kv_dir, shards_dir = self.run_dir / "kv", self.run_dir / "shards"
        lengths = [len(t) for t in self.token_ids]
        width = max(lengths)  # batches of prompts differ in length: right-pad with zeros
        tensors = {k: torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2])) for t in v]).contiguous()
                   for k, v in self.tensors.items()}
        staging = self.run_dir / ".staging" / name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        rows = 0
        try:
            for layer in range(self.meta["num_layers"]):
                keys = tensors[f"layer_{layer}_key"].float().numpy()
                values = tensors[f"layer_{layer}_value"].float().numpy()
                table = layer_table(keys, values, self.seq_ids, self.token_ids)
                rows += table.num_rows
                (staging / f"layer={layer}").mkdir()
                write_parquet(table, staging / f"layer={layer}" / f"{name}.parquet")
            # Everything is written; now move it into place, the shard manifest last.
            with atomic_path(kv_dir / f"{name}.safetensors") as tmp:
                save_file(tensors, str(tmp), metadata=safetensors_metadata(self.meta, self.seq_ids, lengths))
            with atomic_path(shards_dir / f"predictions-{self.shard:05d}.parquet") as tmp:
                pq.write_table(pa.concat_tables(self.predictions), tmp)
            for layer in range(self.meta["num_layers"]):
                (kv_dir / f"layer={layer}").mkdir(parents=True, exist_ok=True)
                os.replace(staging / f"layer={layer}" / f"{name}.parquet", kv_dir / f"layer={layer}" / f"{name}.parquet")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                staging.parent.rmdir()  # .staging/ goes once no shard is being written
        manifest = {"shard": self.shard, "seq_ids": self.seq_ids, "seq_lengths": lengths,
                    "n_tokens": sum(lengths), "n_rows_per_layer": rows // self.meta["num_layers"],
                    "files": [f"kv/layer={i}/{name}.parquet" for i in range(self.meta["num_layers"])]
                    + [f"kv/{name}.safetensors"], **{k: self.meta[k] for k in METADATA_KEYS}}
        write_json(shards_dir / f"kv-{self.shard:05d}.json", manifest)
        return manifest


def shard_manifests(run_dir: str | Path) -> list[dict]:
    """Manifests of the complete shards of a run, in shard order."""
    paths = sorted((Path(run_dir) / "shards").glob("kv-*.json"))
    return [json.loads(p.read_text()) for p in paths]


def finalize_run(run_dir: str | Path, expected_shards: int | None = None) -> dict:
    """Write metadata.json and predictions.parquet once every shard is complete."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    manifests = shard_manifests(run_dir)
    if not manifests or (expected_shards is not None and len(manifests) != expected_shards):
        raise KvcoreError(f"{run_dir}: {len(manifests)} complete shards, expected {expected_shards}")
    first = manifests[0]
    meta = {k: first[k] for k in METADATA_KEYS}
    meta.update(n_shards=len(manifests), n_sequences=sum(len(m["seq_ids"]) for m in manifests),
                n_tokens=sum(m["n_tokens"] for m in manifests), kvcore_version=__version__,
                shards=[m["shard"] for m in manifests])
    tables = [pq.read_table(run_dir / "shards" / f"predictions-{m['shard']:05d}.parquet") for m in manifests]
    import pyarrow as pa

    with atomic_path(run_dir / "predictions.parquet") as tmp:
        pq.write_table(pa.concat_tables(tables), tmp)
    write_json(run_dir / "metadata.json", meta)
    return meta
