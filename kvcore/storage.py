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
PARQUET_COMPRESSION_LEVEL = None  # the codec's default
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
    When every sequence fills seq_len (the usual case) the rows are one transpose, no loop.
    """
    import pyarrow as pa

    n_seq, n_kv, width, dim = keys.shape
    lengths = [len(ids) for ids in token_ids]
    if n_seq and all(n == width for n in lengths):
        # [n_seq, n_kv, len, dim] -> [n_seq, len, n_kv, dim]: rows ordered (seq, pos, head); one copy each
        k = np.ascontiguousarray(keys.transpose(0, 2, 1, 3), dtype=np.float32).reshape(-1, dim)
        v = np.ascontiguousarray(values.transpose(0, 2, 1, 3), dtype=np.float32).reshape(-1, dim)
        seq = np.repeat(np.asarray(seq_ids, np.int32), width * n_kv)
        pos = np.tile(np.repeat(np.arange(width, dtype=np.int32), n_kv), n_seq)
        tok = np.repeat(np.asarray(token_ids, np.int32).reshape(-1), n_kv)
    else:
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
        seq, pos, tok = np.concatenate(seq_col), np.concatenate(pos_col), np.concatenate(tok_col)
    n_rows = k.shape[0]
    schema = kv_schema(dim)
    vec = schema.field("key").type
    return pa.table({
        "seq_id": seq,
        "pos": pos,
        "token_id": tok,
        "head": np.tile(np.arange(n_kv, dtype=np.int16), n_rows // n_kv),
        "key": pa.FixedSizeListArray.from_arrays(pa.array(k.reshape(-1)), type=vec),
        "value": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), type=vec),
        "key_norm": np.linalg.norm(k, axis=1).astype(np.float32, copy=False),
        "value_norm": np.linalg.norm(v, axis=1).astype(np.float32, copy=False),
    }, schema=schema)


def parquet_options() -> dict:
    """Writer options shared by every KV Parquet file (read at call time: tests patch them)."""
    return dict(compression=PARQUET_COMPRESSION, compression_level=PARQUET_COMPRESSION_LEVEL, write_statistics=True)


def write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, **parquet_options())


def safetensors_metadata(meta: dict, seq_ids: list[int], lengths: list[int]) -> dict[str, str]:
    out = {k: str(meta[k]) for k in METADATA_KEYS}
    out.update(seq_ids=json.dumps(seq_ids), seq_lengths=json.dumps(lengths), kvcore_version=__version__)
    return out


class _LayerFile:
    """One layer's Parquet file of a shard, appended batch by batch in seq_id order.

    Rows are held back until a whole row group (ROW_GROUP_ROWS) is ready, so the file's row
    groups are exactly those `write_parquet` would make from the shard's whole table.
    """

    def __init__(self, path: Path, schema):
        self.path, self.schema, self.writer, self.pending, self.rows = path, schema, None, [], 0

    def append(self, table, final: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if table is not None:
            self.pending.append(table)
            self.rows += table.num_rows
        n = sum(t.num_rows for t in self.pending)
        group = ROW_GROUP_ROWS
        cut = n if final else n // group * group
        if self.writer is None and (self.pending or final):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, self.schema, **parquet_options())
        if cut:
            whole = pa.concat_tables(self.pending)
            self.writer.write_table(whole.slice(0, cut), row_group_size=group)
            self.pending = [whole.slice(cut)] if cut < n else []
        if final and self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None


class ShardWriter:
    """Writes one shard: Parquet encoded per layer on a thread pool while the model runs on,
    safetensors and the shard manifest on `close()`; nothing is in place until all succeeded.

    `add` hands each layer of a batch to a worker (one ordered chain of work per layer file);
    at most `max_pending` batches are in flight, so Parquet work never piles up in memory.
    A worker's error is raised by the next `add` or by `close`, which then clean up (`abort`).
    """

    def __init__(self, run_dir: str | Path, shard: int, meta: dict, workers: int | None = None,
                 max_pending: int = 2):
        self.run_dir, self.shard, self.meta = Path(run_dir), shard, meta
        self.seq_ids: list[int] = []
        self.token_ids: list[list[int]] = []
        self.tensors: dict[str, list] = {}
        self.predictions: list = []
        n_layers = meta["num_layers"]
        self.workers = workers or max(1, min(n_layers, os.cpu_count() or 1, 16))
        self.max_pending = max(1, max_pending)
        self.staging = self.run_dir / ".staging" / shard_name(shard)
        self._files = [_LayerFile(self.staging / f"layer={i}" / f"{shard_name(shard)}.parquet",
                                  kv_schema(meta["head_dim"])) for i in range(n_layers)]
        self._last: list = [None] * n_layers  # the latest queued work of each layer file
        self._inflight: list[list] = []  # per batch, its layers' futures
        self._pool = None

    def _write_layer(self, layer: int, previous, keys, values, seq_ids, token_ids) -> None:
        if previous is not None:
            previous.result()  # this layer's earlier batches first (and stop if one failed)
        table = layer_table(keys.float().numpy(), values.float().numpy(), seq_ids, token_ids)
        self._files[layer].append(table)

    def add(self, seq_ids: list[int], token_ids: list[list[int]], layer_keys, layer_values, predictions) -> None:
        """One batch: per-layer torch tensors [batch, n_kv, seq, dim] in the model dtype."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"kvcore-{shard_name(self.shard)}")
        seq_ids, token_ids = list(seq_ids), [list(t) for t in token_ids]
        self.seq_ids += seq_ids
        self.token_ids += token_ids
        futures = []
        for i, (k, v) in enumerate(zip(layer_keys, layer_values)):
            k, v = k.cpu(), v.cpu()
            self.tensors.setdefault(f"layer_{i}_key", []).append(k)
            self.tensors.setdefault(f"layer_{i}_value", []).append(v)
            # FIFO pool: a layer's previous work was queued earlier, so waiting on it cannot deadlock
            self._last[i] = self._pool.submit(self._write_layer, i, self._last[i], k, v, seq_ids, token_ids)
            futures.append(self._last[i])
        self.predictions.append(predictions)
        self._inflight.append(futures)
        try:
            while len(self._inflight) > self.max_pending or any(f.done() and f.exception() for f in futures):
                for f in self._inflight.pop(0):
                    f.result()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop the workers and remove everything staged; nothing of the shard looks complete."""
        if self._pool is not None:
            for futures in self._inflight:
                for f in futures:
                    f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._inflight = []
        for f in self._files:
            f.abort()
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.staging.parent.rmdir()

    def close(self) -> dict:
        try:
            return self._close()
        except BaseException:
            self.abort()
            raise

    def _close(self) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        from kvcore.tensorfile import save_tensors

        if self._pool is None:
            raise KvcoreError(f"shard {self.shard}: nothing was added")
        name = shard_name(self.shard)
        kv_dir, shards_dir = self.run_dir / "kv", self.run_dir / "shards"
        lengths = [len(t) for t in self.token_ids]
        width = max(lengths)  # batches of prompts differ in length: right-pad with zeros
        tensors = {k: (torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2])) for t in v])
                       if len(v) > 1 or v[0].shape[2] != width else v[0]).contiguous()
                   for k, v in self.tensors.items()}
        self.tensors = {}
        # the last row groups of each layer file, in parallel, then wait for everything
        finals = [self._pool.submit(lambda f, prev: (prev is None or prev.result(), f.append(None, final=True)),
                                    f, prev) for f, prev in zip(self._files, self._last)]
        for futures in self._inflight:
            for f in futures:
                f.result()
        for f in finals:
            f.result()
        self._inflight = []
        self._pool.shutdown(wait=True)
        self._pool = None
        rows = sum(f.rows for f in self._files)
        try:
            # Everything is written; now move it into place, the shard manifest last.
            with atomic_path(kv_dir / f"{name}.safetensors") as tmp:
                save_tensors(tensors, tmp, metadata=safetensors_metadata(self.meta, self.seq_ids, lengths))
            with atomic_path(shards_dir / f"predictions-{self.shard:05d}.parquet") as tmp:
                pq.write_table(pa.concat_tables(self.predictions), tmp)
            for layer in range(self.meta["num_layers"]):
                (kv_dir / f"layer={layer}").mkdir(parents=True, exist_ok=True)
                os.replace(self._files[layer].path, kv_dir / f"layer={layer}" / f"{name}.parquet")
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.staging.parent.rmdir()  # .staging/ goes once no shard is being written
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
