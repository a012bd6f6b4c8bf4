"""Nearest neighbours in one (layer, KV head) on vectors loaded once (`Run.nearest`).

A search is decode-bound: DuckDB's brute force (`verbs.nearest`, what `kvcore query --nearest`
runs once and exits) decodes the layer's vectors from Parquet, every head's, on every search
(about 12 ns per float). `Run.nearest` loads one (layer, head, key|value) once and ranks it in
numpy with one matrix-vector product, joining token text for the k results only. It reads the
vectors from the shards' safetensors where they equal the Parquet's (`tensor_candidates`: a
memory-mapped read of exactly that head, bf16 widened as the Parquet writer does), else only
the columns ranking needs from the layer's Parquet files (`verbs.nearest_candidates`). Exact,
the same ranking (score, then seq_id, pos) as the SQL verb (tests/test_query.py).
"""

from __future__ import annotations

import functools
import json
import mmap
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvcore.query.discover import RunFiles
from kvcore.query.remote import is_remote
from kvcore.storage import float32_rows, vector_norms

TENSOR_DTYPES = {"BF16": (np.uint16, True), "F16": (np.float16, False), "F32": (np.float32, False)}


def matrix(vectors) -> np.ndarray:
    """A pyarrow FixedSizeList<float> column as one contiguous float32 [n, dim] matrix."""
    flat = vectors.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, np.float32).reshape(len(vectors), vectors.type.list_size)


def best_first(rank_by: np.ndarray, seq_ids: np.ndarray, pos: np.ndarray, me: int, n: int) -> np.ndarray:
    """Indices of the n lowest `rank_by` but `me`, ordered by (rank_by, seq_id, pos): what
    ORDER BY score, seq_id, pos LIMIT n gives, ties at the cut included."""
    cut = np.partition(rank_by, n)[n] if n < len(rank_by) else np.inf  # the (n+1)-th lowest, `me` counted
    pool = np.flatnonzero(rank_by <= cut)
    pool = pool[pool != me]
    return pool[np.lexsort((pos[pool], seq_ids[pool], rank_by[pool]))[:n]]


@functools.lru_cache(maxsize=4096)
def _header(path: str, mtime_ns: int, size: int) -> tuple[int, dict]:
    """(where the data starts, the JSON header) of a safetensors file, kept per version of the file."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return 8 + n, json.loads(fh.read(n))


def _mapped(path, dtype, offset: int, shape: tuple) -> np.ndarray:
    """A read-only view of the file's bytes (np.memmap costs ~0.2 ms a file in Python)."""
    with open(path, "rb") as fh:
        buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(buffer, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def tensor_candidates(run: RunFiles, layer: int, head: int, by: str, threads: int = 1) -> dict | None:
    """{x, norms, seq_id, pos} of one run's (layer, head) from its shards' safetensors, or None where they
    may differ from (or hold more than) its Parquet rows: float16 storage, a kind, layer or head
    left out of Parquet, a run in a bucket, a shard without readable safetensors (the Parquet
    rows, which the query views read, are then read instead)."""
    parquet = run.meta.get("parquet") or {}
    if (is_remote(run.path) or parquet.get("storage_dtype", "float32") != "float32"
            or parquet.get("parts", "both") not in ("both", f"{by}s") or layer not in run.parquet_items("layers")
            or head not in run.parquet_items("heads") or run.tokens is None):
        return None
    shards = sorted(set(run.seq_shard.values()))
    if not shards or any(s not in run.tensor_files for s in shards):
        return None
    name, plans = f"layer_{layer}_{by}", []
    for s in shards:
        path = run.tensor_files[s]
        try:
            stat = path.stat()
            base, header = _header(str(path), stat.st_mtime_ns, stat.st_size)
            info, meta = header[name], header["__metadata__"]
            seq_ids, lengths = json.loads(meta["seq_ids"]), json.loads(meta["seq_lengths"])
            dtype, bf16 = TENSOR_DTYPES[info["dtype"]]
            src = _mapped(path, dtype, base + info["data_offsets"][0], tuple(info["shape"]))
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None
        if [run.seq_lengths.get(q) for q in seq_ids] != lengths or src.ndim != 4 or src.shape[1] <= head:
            return None  # not the sequences (or the shape) the Parquet rows hold
        plans.append((src, bf16, seq_ids, lengths))
    lengths = np.array([n for *_, ns in plans for n in ns])
    x = np.empty((int(lengths.sum()), plans[0][0].shape[3]), np.float32)
    norms = np.empty(len(x), np.float32)
    starts = np.cumsum([0] + [sum(ns) for *_, ns in plans])

    def shard(i: int) -> None:  # the Parquet writer's own widening, then the norms while in cache
        src, bf16, _, ns = plans[i]
        a, b = starts[i], starts[i + 1]
        norms[a:b] = vector_norms(float32_rows(src, bf16, ns, [head], out=x[a:b]))

    with ThreadPoolExecutor(max(1, threads)) as pool:  # numpy leaves the GIL while it copies
        list(pool.map(shard, range(len(plans))))
    seq_id = np.repeat(np.array([q for _, _, qs, _ in plans for q in qs], np.int32), lengths)
    pos = (np.arange(len(x)) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)
    return {"x": x, "norms": norms, "seq_id": seq_id, "pos": pos}


class RunCandidates:
    """One run's vectors of a (layer, KV head, kind): from `tensor_candidates`, or from a
    `verbs.nearest_candidates` table (which also gives token_id and the stored norm)."""

    def __init__(self, found: dict | None = None, table=None):
        if found is not None:
            self.x, self.norms, self.seq_id, self.pos = found["x"], found["norms"], found["seq_id"], found["pos"]
        else:
            self.x = matrix(table.column("vector"))
            self.norms = vector_norms(self.x)
            self.seq_id, self.pos = table.column("seq_id").to_numpy(), table.column("pos").to_numpy()
        # float32 storage (the safetensors path): the stored norm is this one, computed alike
        self.stored_norm = self.norms if table is None else table.column("norm").to_numpy()
        self.token_id = None if table is None else table.column("token_id").to_numpy()
        self.x.flags.writeable = False

    def __len__(self) -> int:
        return len(self.x)

    def top(self, seq: int, pos: int, k: int, metric: str):
        """(indices, scores) of the k nearest to (seq, pos), best first; None when the run has no such position."""
        me = np.flatnonzero((self.seq_id == seq) & (self.pos == pos))
        n = min(k, len(self.x) - 1)
        if not len(me) or n < 1:
            return None
        me, q = me[0], self.x[me[0]]
        if metric == "cosine":
            with np.errstate(divide="ignore", invalid="ignore"):
                scores = self.x @ q / (self.norms * self.norms[me])
            rank_by = np.where(np.isnan(scores), np.inf, -scores)  # best first; NaN (zero vector) last
        else:
            diff = self.x - q
            scores = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            rank_by = scores
        best = best_first(rank_by, self.seq_id, self.pos, me, n)
        return best, scores[best]


class Candidates:
    """Every vector of one (layer, KV head, kind) of each run: {(model, dataset): RunCandidates},
    in (model, dataset) order as the verb's SQL orders its rows."""

    def __init__(self, runs: dict[tuple[str, str], RunCandidates]):
        self.runs = {name: c for name, c in sorted(runs.items()) if len(c)}

    def nearest(self, seq: int, pos: int, k: int, metric: str, layer: int, head: int, by: str, tokens_of):
        """The k nearest to (seq, pos) in each run as a pyarrow Table, the columns of `verbs.nearest`;
        `tokens_of(models, datasets, seq_ids, positions)` gives the results' (token_ids, tokens)."""
        import pyarrow as pa

        score_name = "cosine_similarity" if metric == "cosine" else "l2_distance"
        types = {"model": pa.string(), "dataset": pa.string(), "rank": pa.int64(), "layer": pa.int32(),
                 "head": pa.int32(), "seq_id": pa.int32(), "pos": pa.int32(), "token_id": pa.int32(),
                 "token": pa.string(), score_name: pa.float32(), f"{by}_norm": pa.float32()}
        rows = {c: [] for c in types}
        for (model, dataset), c in self.runs.items():
            found = c.top(seq, pos, k, metric)
            if found is None:
                continue  # this run has no such position
            best, scores = found
            n = len(best)
            for name, v in (("model", [model] * n), ("dataset", [dataset] * n), ("rank", np.arange(1, n + 1)),
                            ("layer", np.full(n, layer)), ("head", np.full(n, head)), ("seq_id", c.seq_id[best]),
                            ("pos", c.pos[best]), ("token_id", [None] * n if c.token_id is None else c.token_id[best]),
                            (score_name, scores), (f"{by}_norm", c.stored_norm[best])):
                rows[name] += list(v)
        if rows["model"]:
            token_ids, rows["token"] = tokens_of(rows["model"], rows["dataset"], rows["seq_id"], rows["pos"])
            # read from the layer's Parquet where it was, else (safetensors) tokens.parquet's, the same ids
            rows["token_id"] = [t if t is not None else u for t, u in zip(rows["token_id"], token_ids)]
        return pa.table({c: pa.array(v, types[c]) for c, v in rows.items()})
