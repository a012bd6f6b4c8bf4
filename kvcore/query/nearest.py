"""Nearest neighbours in one (layer, KV head) on vectors loaded once (`Run.nearest`).

A search is decode-bound: DuckDB's brute force (`verbs.nearest`, what `kvcore query --nearest`
runs once and exits) decodes the layer's vectors from Parquet on every search. `Run.nearest`
loads the candidates of a (layer, head, key|value) once, through the same views, and ranks
them in numpy: exact, the same ranking (score, then seq_id, pos), an order of magnitude faster
from the second search on (benchmarks/query_bench.py).
"""

from __future__ import annotations

import numpy as np

OUTPUT_COLUMNS = ("model", "dataset", "rank", "layer", "head", "seq_id", "pos", "token_id", "token")


class Candidates:
    """Every vector of one (layer, KV head, kind) per run, from `verbs.nearest_candidates` rows."""

    def __init__(self, table):
        import pyarrow.compute as pc

        table = table.filter(pc.is_valid(table.column("vector")))  # a part not stored (extract.parts) is NULL
        runs = sorted(set(zip(table.column("model").to_pylist(), table.column("dataset").to_pylist())))
        self.runs = {}
        for model, dataset in runs:
            part = table if len(runs) == 1 else table.filter(
                pc.and_(pc.equal(table.column("model"), model), pc.equal(table.column("dataset"), dataset)))
            vectors = part.column("vector").combine_chunks()
            dim = vectors.type.list_size
            x = np.ascontiguousarray(vectors.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
            ids = {c: part.column(c).to_numpy() for c in ("seq_id", "pos", "token_id")}
            self.runs[(model, dataset)] = (x, np.linalg.norm(x, axis=1), ids, part.column("norm").to_numpy(),
                                           part.column("token").to_pylist())

    def nearest(self, seq: int, pos: int, k: int, metric: str, layer: int, head: int, by: str):
        """The k nearest to (seq, pos) in each run as a pyarrow Table, the columns of `verbs.nearest`."""
        import pyarrow as pa

        score_name = "cosine_similarity" if metric == "cosine" else "l2_distance"
        rows = {c: [] for c in (*OUTPUT_COLUMNS, score_name, f"{by}_norm")}
        for (model, dataset), (x, norms, ids, stored_norms, tokens) in self.runs.items():
            me = np.flatnonzero((ids["seq_id"] == seq) & (ids["pos"] == pos))
            if not len(me):
                continue  # this run has no such position
            q = x[me[0]]
            if metric == "cosine":
                with np.errstate(divide="ignore", invalid="ignore"):
                    scores = x @ q / (norms * norms[me[0]])
                rank_by = np.where(np.isnan(scores), np.inf, -scores)  # best first; NaN (zero vector) last
            else:
                scores = np.sqrt(np.einsum("ij,ij->i", x - q, x - q))
                rank_by = scores.copy()
            rank_by[me[0]] = np.inf  # the query itself is not its own neighbour
            n = min(k, len(x) - 1)
            if n < 1:
                continue
            best = np.argpartition(rank_by, n - 1)[:n]
            best = best[np.lexsort((ids["pos"][best], ids["seq_id"][best], rank_by[best]))]
            for rank, i in enumerate(best, 1):
                for c, v in (("model", model), ("dataset", dataset), ("rank", rank), ("layer", layer), ("head", head),
                             ("seq_id", ids["seq_id"][i]), ("pos", ids["pos"][i]), ("token_id", ids["token_id"][i]),
                             ("token", tokens[i]), (score_name, scores[i]), (f"{by}_norm", stored_norms[i])):
                    rows[c].append(v)
        types = {"model": pa.string(), "dataset": pa.string(), "rank": pa.int64(), "layer": pa.int32(),
                 "head": pa.int32(), "seq_id": pa.int32(), "pos": pa.int32(), "token_id": pa.int32(),
                 "token": pa.string(), score_name: pa.float32(), f"{by}_norm": pa.float32()}
        return pa.table({c: pa.array(v, types[c]) for c, v in rows.items()})
