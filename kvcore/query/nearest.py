"""Nearest neighbours in one (layer, KV head) on vectors kept at hand (`Run.nearest`).

A search is decode-bound: DuckDB's brute force (`verbs.nearest`, what `kvcore query --nearest`
runs once and exits) decodes the layer's vectors from Parquet, every head's, on every search
(about 12 ns per float). `Run.nearest` keeps one (layer, head, key|value) at hand and ranks it in
numpy, joining token text for the k results only. It maps the vectors in the shards' safetensors
where they equal the Parquet's (`tensor_candidates`: exactly that head's rows, bf16 widened as the
Parquet writer does, block by block as they are scored), else reads only the columns ranking
needs from the layer's Parquet files (`verbs.nearest_candidates`). Exact, the same ranking
(score, then seq_id, pos) as the SQL verb (tests/test_query.py)."""

from __future__ import annotations

import functools
import json
import mmap
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


# Rows scored at a time: widened to float32, normed and scored while they are in the CPU's cache,
# so a search reads each stored vector once (a first search used to widen a (layer, head) into a
# new 57 MB matrix, then read it again for the norms and again for the scores).
BLOCK_ROWS = 4096


@dataclass
class Block:
    """Candidate rows [start, stop): float32 `rows` (from Parquet), or sequences of a shard's
    mapped safetensors tensor `src` [n_seq, n_kv, width, dim], widened on demand."""

    start: int
    stop: int
    rows: np.ndarray | None = None
    src: np.ndarray | None = None
    bf16: bool = False
    lengths: tuple = ()
    head: int = 0

    def float32(self, buffer: np.ndarray) -> np.ndarray:
        """The block's rows as float32 [stop - start, dim], widened into `buffer` where needed."""
        if self.rows is not None:
            return self.rows
        return float32_rows(self.src, self.bf16, list(self.lengths), [self.head], out=buffer[:self.stop - self.start])


def sequence_blocks(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive sequences [a, b) of about BLOCK_ROWS rows each (at least one sequence)."""
    out, a, rows = [], 0, 0
    for i, n in enumerate(lengths):
        if i > a and rows + n > BLOCK_ROWS:
            out.append((a, i))
            a, rows = i, 0
        rows += n
    return out + [(a, len(lengths))] if lengths else out


def tensor_candidates(run: RunFiles, layer: int, head: int, by: str) -> dict | None:
    """{blocks, seq_id, pos} of one run's (layer, head): views of its shards' safetensors (mapped, read
    when scored), or None where they may differ from (or hold more than) its Parquet rows: float16
    storage, a kind, layer or head left out of Parquet, a run in a bucket, a shard without readable
    safetensors (the Parquet rows, which the query views read, are then read instead)."""
    parquet = run.meta.get("parquet") or {}
    if (is_remote(run.path) or parquet.get("storage_dtype", "float32") != "float32"
            or parquet.get("parts", "both") not in ("both", f"{by}s") or layer not in run.parquet_items("layers")
            or head not in run.parquet_items("heads") or run.tokens is None):
        return None
    shards = sorted(set(run.seq_shard.values()))
    if not shards or any(s not in run.tensor_files for s in shards):
        return None
    name, blocks, seq_ids, lengths = f"layer_{layer}_{by}", [], [], []
    for s in shards:
        path = run.tensor_files[s]
        try:
            stat = path.stat()
            base, header = _header(str(path), stat.st_mtime_ns, stat.st_size)
            info, meta = header[name], header["__metadata__"]
            shard_seqs, shard_lengths = json.loads(meta["seq_ids"]), json.loads(meta["seq_lengths"])
            dtype, bf16 = TENSOR_DTYPES[info["dtype"]]
            src = _mapped(path, dtype, base + info["data_offsets"][0], tuple(info["shape"]))
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return None
        if [run.seq_lengths.get(q) for q in shard_seqs] != shard_lengths or src.ndim != 4 or src.shape[1] <= head:
            return None  # not the sequences (or the shape) the Parquet rows hold
        for a, b in sequence_blocks(shard_lengths):
            start = blocks[-1].stop if blocks else 0
            blocks.append(Block(start, start + sum(shard_lengths[a:b]), src=src[a:b], bf16=bf16,
                                lengths=tuple(shard_lengths[a:b]), head=head))
            seq_ids += shard_seqs[a:b]
            lengths += shard_lengths[a:b]
    lengths = np.array(lengths)
    seq_id = np.repeat(np.array(seq_ids, np.int32), lengths)
    pos = (np.arange(len(seq_id)) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)
    return {"blocks": blocks, "seq_id": seq_id, "pos": pos}


class RunCandidates:
    """One run's vectors of a (layer, KV head, kind): from `tensor_candidates`, or from a
    `verbs.nearest_candidates` table (which also gives token_id and the stored norm)."""

    def __init__(self, found: dict | None = None, table=None, threads: int = 1):
        self.threads = threads  # blocks scored at once
        if found is not None:
            self.blocks, self.seq_id, self.pos = found["blocks"], found["seq_id"], found["pos"]
            self.token_id = self.stored_norm = None  # float32 storage: the stored norm is the one computed here
        else:
            x = matrix(table.column("vector"))
            x.flags.writeable = False
            self.blocks = [Block(a, min(a + BLOCK_ROWS, len(x)), rows=x[a:a + BLOCK_ROWS])
                           for a in range(0, len(x), BLOCK_ROWS)]
            self.seq_id, self.pos = table.column("seq_id").to_numpy(), table.column("pos").to_numpy()
            self.token_id, self.stored_norm = table.column("token_id").to_numpy(), table.column("norm").to_numpy()
        first = self.blocks[0] if self.blocks else Block(0, 0, rows=np.empty((0, 0), np.float32))
        self.dim = (first.rows if first.rows is not None else first.src).shape[-1]
        self.norms = None  # the candidates' L2 norms, computed by the first search

    def __len__(self) -> int:
        return len(self.seq_id)

    def vectors(self) -> np.ndarray:
        """Every candidate as one float32 [n, dim] matrix, in candidate order."""
        out = np.empty((len(self), self.dim), np.float32)
        for b in self.blocks:
            out[b.start:b.stop] = b.float32(out[b.start:b.stop])
        return out

    def top(self, seq: int, pos: int, k: int, metric: str):
        """(indices, scores, norms) of the k nearest to (seq, pos), best first; None when the run has
        no such position. One pass over the vectors, block by block."""
        me = np.flatnonzero((self.seq_id == seq) & (self.pos == pos))
        n = min(k, len(self) - 1)
        if not len(me) or n < 1:
            return None
        me = int(me[0])
        size = max(b.stop - b.start for b in self.blocks)
        home = self.blocks[int(np.searchsorted([b.stop for b in self.blocks], me, side="right"))]
        q = home.float32(np.empty((size, self.dim), np.float32))[me - home.start].copy()
        scores, first = np.empty(len(self), np.float32), self.norms is None
        norms = np.empty(len(self), np.float32) if first else self.norms
        buffers = threading.local()

        def score(b: Block) -> None:  # numpy leaves the GIL while it widens, norms and multiplies
            if not hasattr(buffers, "x"):
                buffers.x = np.empty((size, self.dim), np.float32)
            x = b.float32(buffers.x)
            if first:
                norms[b.start:b.stop] = vector_norms(x)
            if metric == "cosine":
                scores[b.start:b.stop] = x @ q
            else:
                diff = x - q
                scores[b.start:b.stop] = np.sqrt(np.einsum("ij,ij->i", diff, diff))

        with ThreadPoolExecutor(max(1, min(self.threads, len(self.blocks)))) as pool:
            list(pool.map(score, self.blocks))
        self.norms = norms  # kept only once every block's are in (an interrupted search keeps none)
        if metric == "cosine":
            with np.errstate(divide="ignore", invalid="ignore"):
                scores /= norms * norms[me]
            rank_by = np.where(np.isnan(scores), np.inf, -scores)  # best first; NaN (zero vector) last
        else:
            rank_by = scores
        best = best_first(rank_by, self.seq_id, self.pos, me, n)
        return best, scores[best], (norms if self.stored_norm is None else self.stored_norm)[best]


class TokenIndex:
    """One run's tokens (a `verbs.run_tokens` table), read once: token_id and text by (seq_id, pos).
    A search's k results look theirs up here in microseconds; a query per search cost it 5-12 ms."""

    def __init__(self, table):
        key = self.key_of(table.column("seq_id").to_numpy(), table.column("pos").to_numpy())
        order = np.argsort(key, kind="stable")
        self.key, self.token_id = key[order], table.column("token_id").to_numpy()[order]
        self.token = table.column("token").combine_chunks().take(order)

    @staticmethod
    def key_of(seq_ids, positions) -> np.ndarray:
        return np.asarray(seq_ids, np.int64) << 32 | np.asarray(positions, np.int64)

    def lookup(self, seq_ids, positions) -> tuple[list, list]:
        """(token_ids, tokens) of these positions, None where the run has no such token."""
        key = self.key_of(seq_ids, positions)
        if not len(self.key):
            return [None] * len(key), [None] * len(key)
        at = np.minimum(np.searchsorted(self.key, key), len(self.key) - 1)
        found = self.key[at] == key
        ids, text = self.token_id[at].tolist(), self.token.take(at).to_pylist()
        return [i if f else None for i, f in zip(ids, found)], [t if f else None for t, f in zip(text, found)]


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
            best, scores, norms = found
            n = len(best)
            for name, v in (("model", [model] * n), ("dataset", [dataset] * n), ("rank", np.arange(1, n + 1)),
                            ("layer", np.full(n, layer)), ("head", np.full(n, head)), ("seq_id", c.seq_id[best]),
                            ("pos", c.pos[best]), ("token_id", [None] * n if c.token_id is None else c.token_id[best]),
                            (score_name, scores), (f"{by}_norm", norms)):
                rows[name] += list(v)
        if rows["model"]:
            token_ids, rows["token"] = tokens_of(rows["model"], rows["dataset"], rows["seq_id"], rows["pos"])
            # read from the layer's Parquet where it was, else (safetensors) tokens.parquet's, the same ids
            rows["token_id"] = [t if t is not None else u for t, u in zip(rows["token_id"], token_ids)]
        return pa.table({c: pa.array(v, types[c]) for c, v in rows.items()})
