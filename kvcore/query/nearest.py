"""Nearest neighbours in one (layer, KV head) on vectors loaded once (`Run.nearest`).

A search is decode-bound: DuckDB's brute force (`verbs.nearest`, what `kvcore query --nearest`
runs once and exits) decodes the layer's vectors and joins token text on every search.
`Run.nearest` reads only what ranking needs of a (layer, head, key|value) — seq_id, pos,
token_id, the stored norm and the vector, straight from the layer's Parquet files
(`verbs.nearest_candidates`) — into one float32 matrix, ranks with one matrix-vector product,
and joins token text for the k results only. Exact, the same ranking (score, then seq_id,
pos); later searches in that (layer, head) skip the read (benchmarks/query_bench.py).
"""

from __future__ import annotations

import numpy as np

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


class RunCandidates:
    """One run's vectors of a (layer, KV head, kind), from a `verbs.nearest_candidates` table."""

    def __init__(self, table):
        self.x = matrix(table.column("vector"))
        self.norms = np.linalg.norm(self.x, axis=1)
        self.seq_id, self.pos, self.token_id, self.stored_norm = (
            table.column(c).to_numpy() for c in ("seq_id", "pos", "token_id", "norm"))

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

    def __init__(self, tables: dict[tuple[str, str], object]):
        self.runs = {name: RunCandidates(t) for name, t in sorted(tables.items()) if t.num_rows}

    def nearest(self, seq: int, pos: int, k: int, metric: str, layer: int, head: int, by: str, token_text):
        """The k nearest to (seq, pos) in each run as a pyarrow Table, the columns of `verbs.nearest`;
        `token_text(models, datasets, seq_ids, positions)` gives the results' token text."""
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
                            ("pos", c.pos[best]), ("token_id", c.token_id[best]), (score_name, scores),
                            (f"{by}_norm", c.stored_norm[best])):
                rows[name] += list(v)
        if rows["model"]:
            rows["token"] = token_text(rows["model"], rows["dataset"], rows["seq_id"], rows["pos"])
        return pa.table({c: pa.array(v, types[c]) for c, v in rows.items()})
