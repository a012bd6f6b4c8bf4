"""Each verb is one SQL query over the views, plus the range checks that make a bad
coordinate a one-line usage error instead of an empty result.

A verb returns a `Query`; `Run` executes it, the CLI prints or exports it, `--show-sql`
prints it, so every path runs the same SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcore.errors import UsageError
from kvcore.query.discover import RunFiles
from kvcore.query.views import kv_parts_sql, layer_view, literal, norm_rows_sql, seq_view, tokens_sql, vector_type

VERBS = ("info", "coordinate", "list_tokens", "token_search", "layer_summary", "head_summary", "token_summary",
         "search_norm", "nearest")
KINDS = ("key", "value")
METRICS = ("cosine", "l2")


@dataclass(frozen=True)
class Query:
    sql: str
    params: list = field(default_factory=list)
    vertical: bool = False  # one record with long vectors: print field per line

    def limited(self, n: int) -> "Query":
        # The inner ORDER BY is kept: DuckDB turns ORDER BY + LIMIT into a top-N.
        return Query(f"SELECT * FROM (\n{self.sql}\n) LIMIT {int(n)}", self.params, self.vertical)


# ---- range checks -----------------------------------------------------------------

def _ranges(runs: list[RunFiles], key: str) -> str:
    spans = {r.name: f"0..{int(r.meta[key]) - 1}" for r in runs}
    if len(set(spans.values())) == 1:
        return next(iter(spans.values()))
    return ", ".join(f"{v} ({k})" for k, v in spans.items())


def _check_stored(runs: list[RunFiles], what: str, index: int) -> None:
    """A layer or head the model has but the extraction left out of Parquet: say so, not an empty result."""
    if not any(index in r.parquet_items(what) for r in runs):
        stored = "; ".join(f"{_spans(r.parquet_items(what))}" + (f" ({r.name})" if len(runs) > 1 else "")
                           for r in runs)
        noun = {"layers": "layer", "heads": "KV head"}[what]
        raise UsageError(f"{noun} {index} has no Parquet rows: this run stored {what} {stored} "
                         f"(extract.parquet_{what}); its safetensors hold every {noun}")


def check_layer(runs: list[RunFiles], layer: int) -> None:
    if not any(0 <= layer < int(r.meta["num_layers"]) for r in runs):
        raise UsageError(f"layer {layer} out of range: valid layers {_ranges(runs, 'num_layers')}")
    _check_stored(runs, "layers", layer)


def check_head(runs: list[RunFiles], head: int) -> None:
    if any(0 <= head < int(r.meta["num_kv_heads"]) for r in runs):
        return _check_stored(runs, "heads", head)
    gqa = [r for r in runs if int(r.meta.get("num_heads") or 0) > int(r.meta["num_kv_heads"])]
    hint = ""
    if gqa:
        r = gqa[0]
        group = int(r.meta["num_heads"]) // int(r.meta["num_kv_heads"])
        hint = (f"; heads are KV heads: {r.name} has {r.meta['num_heads']} query heads sharing "
                f"{r.meta['num_kv_heads']} KV heads, query head h reads KV head h // {group}")
    raise UsageError(f"head {head} out of range: valid KV heads {_ranges(runs, 'num_kv_heads')}{hint}")


def _spans(ids: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0..2, 5..6'."""
    out, start = [], None
    for i, s in enumerate(ids):
        if start is None:
            start = s
        if i + 1 == len(ids) or ids[i + 1] != s + 1:
            out.append(f"{start}..{s}" if s != start else f"{s}")
            start = None
    return ", ".join(out) if len(out) <= 6 else ", ".join(out[:6]) + ", ..."


def check_seq(runs: list[RunFiles], seq: int) -> None:
    if not any(seq in r.seq_lengths for r in runs):
        valid = "; ".join(f"{_spans(list(r.seq_lengths))}" + (f" ({r.name})" if len(runs) > 1 else "")
                          for r in runs)
        raise UsageError(f"seq {seq} not found: valid seq ids {valid} (complete shards only)")


def check_position(runs: list[RunFiles], seq: int, pos: int) -> None:
    check_seq(runs, seq)
    lengths = {r.name: r.seq_lengths[seq] for r in runs if seq in r.seq_lengths}
    if not any(0 <= pos < n for n in lengths.values()):
        valid = ", ".join(f"0..{n - 1}" + (f" ({k})" if len(lengths) > 1 else "") for k, n in lengths.items())
        raise UsageError(f"token {pos} out of range for seq {seq}: valid positions {valid}")


def check_coordinate(runs: list[RunFiles], layer: int, head: int, token: int, seq: int) -> None:
    check_layer(runs, layer)
    check_head(runs, head)
    check_position(runs, seq, token)


def _need_tokens(runs: list[RunFiles]) -> None:
    if not any(r.tokens for r in runs):
        raise UsageError("this run has no tokens.parquet, so token text is unknown; re-run the tokenize step")


# ---- verbs --------------------------------------------------------------------------

def info(runs: list[RunFiles]) -> Query:
    return Query("SELECT * FROM runs ORDER BY model, dataset", vertical=len(runs) == 1)


def coordinate(runs: list[RunFiles], layer: int, head: int, token: int, seq: int = 0) -> Query:
    check_coordinate(runs, layer, head, token, seq)
    # The one file of that layer and sequence, listed in the query: a view per sequence would be
    # bound (each of its files opened) the first time a sequence is asked for. The token text is
    # filtered to that one position in tokens.parquet itself, so its row-group statistics skip the
    # rest whatever join order DuckDB picks.
    return Query(f"""WITH hit AS (
  SELECT * FROM ({kv_parts_sql(runs, layer, seq)})
  WHERE head = ? AND seq_id = ? AND pos = ?
)
SELECT h.model, h.dataset, h.layer, h.head, h.seq_id, h.pos, h.token_id, t.token, h.key_norm, h.value_norm,
       h.key, h.value
FROM hit h
LEFT JOIN (SELECT model, dataset, token FROM tokens WHERE seq_id = ? AND pos = ?) t
  ON t.model = h.model AND t.dataset = h.dataset
ORDER BY h.model, h.dataset""", [head, seq, token, seq, token], vertical=True)


def list_tokens(runs: list[RunFiles], seq: int | None = None) -> Query:
    _need_tokens(runs)
    where, params = "", []
    if seq is not None:
        check_seq(runs, seq)
        where, params = "\nWHERE seq_id = ?", [seq]
    return Query(f"SELECT model, dataset, seq_id, pos, token_id, token, doc_id\nFROM tokens{where}\n"
                 "ORDER BY model, dataset, seq_id, pos", params)


def _filters(runs, layer: int | None, head: int | None, alias: str = "") -> tuple[str, str, list]:
    """(view, extra WHERE terms, parameters): one layer reads its own view, not all of kv."""
    source, sql, params = "kv", "", []
    if layer is not None:
        check_layer(runs, layer)
        source = layer_view(layer)
    if head is not None:
        check_head(runs, head)
        sql, params = sql + f" AND {alias}head = ?", params + [head]
    return source, sql, params


def token_search(runs: list[RunFiles], text: str, layer: int | None = None, head: int | None = None) -> Query:
    """Where a token occurs (text matched ignoring case and surrounding spaces), with its K/V norms."""
    _need_tokens(runs)
    if not text.strip():
        raise UsageError("--token-search needs some text, e.g. --token-search fox")
    source, extra, params = _filters(runs, layer, head, "k.")
    # Find the positions in the small tokens table first, then fetch only their kv rows.
    return Query(f"""WITH hits AS (
  SELECT model, dataset, seq_id, pos, token FROM tokens WHERE lower(trim(token)) = lower(trim(?))
)
SELECT k.model, k.dataset, k.seq_id, k.pos, k.token_id, h.token, k.layer, k.head, k.key_norm, k.value_norm
FROM {source} k
JOIN hits h ON k.model = h.model AND k.dataset = h.dataset AND k.seq_id = h.seq_id AND k.pos = h.pos
WHERE true{extra}
ORDER BY k.model, k.dataset, k.seq_id, k.pos, k.layer, k.head""", [text] + params)


def stats_columns(dim: int | None = None) -> str:
    """Norm statistics and element statistics of key and value vectors.

    Element variance comes from the stored norms (sum of squares = norm^2). With one head_dim
    the element sum is a dot product with ones, which DuckDB computes several times faster
    than list_sum; min/max need list_min/list_max.
    """
    cols = ["count(*) AS n_vectors"]
    for kind in KINDS:
        n = kind + "_norm"
        total = (f"sum(array_inner_product({kind}, repeat([1::FLOAT], {dim})::FLOAT[{dim}]))" if dim
                 else f"sum(list_sum({kind}))")
        count = f"(count(*) * {dim})" if dim else f"sum(len({kind}))"
        cols += [f"avg({n}) AS {n}_mean", f"stddev_pop({n}) AS {n}_std", f"min({n}) AS {n}_min",
                 f"max({n}) AS {n}_max", f"{total} / {count} AS {kind}_mean",
                 f"sqrt(greatest(sum({n}::DOUBLE * {n}) / {count} - pow({total} / {count}, 2), 0)) AS {kind}_std",
                 f"min(list_min({kind})) AS {kind}_min", f"max(list_max({kind})) AS {kind}_max"]
    return ",\n       ".join(cols)


def _dim(runs: list[RunFiles]) -> int | None:
    vec = vector_type(runs)
    return int(vec[6:-1]) if vec != "FLOAT[]" else None


def layer_summary(runs: list[RunFiles], layer: int) -> Query:
    """Per KV head of one layer, plus an all-heads row (head NULL)."""
    check_layer(runs, layer)
    return Query(f"""SELECT model, dataset, layer, head,
       {stats_columns(_dim(runs))}
FROM {layer_view(layer)}
GROUP BY GROUPING SETS ((model, dataset, layer, head), (model, dataset, layer))
ORDER BY model, dataset, head NULLS LAST""")


def head_summary(runs: list[RunFiles], layer: int, head: int) -> Query:
    """One (layer, KV head): statistics, the query heads that read it, where its norms peak."""
    check_layer(runs, layer)
    check_head(runs, head)
    return Query(f"""WITH s AS (
  SELECT model, dataset, layer, head,
       {stats_columns(_dim(runs))},
       arg_max({{'seq_id': seq_id, 'pos': pos}}, key_norm) AS key_norm_argmax,
       arg_max({{'seq_id': seq_id, 'pos': pos}}, value_norm) AS value_norm_argmax
  FROM {layer_view(layer)}
  WHERE head = ?
  GROUP BY ALL
)
SELECT s.* EXCLUDE (key_norm_argmax, value_norm_argmax),
       CAST(range(s.head * (r.num_heads // r.num_kv_heads), (s.head + 1) * (r.num_heads // r.num_kv_heads))
            AS INTEGER[]) AS query_heads,
       s.key_norm_argmax.seq_id AS key_norm_max_seq_id, s.key_norm_argmax.pos AS key_norm_max_pos,
       tk.token AS key_norm_max_token,
       s.value_norm_argmax.seq_id AS value_norm_max_seq_id, s.value_norm_argmax.pos AS value_norm_max_pos,
       tv.token AS value_norm_max_token
FROM s
JOIN runs r ON r.model = s.model AND r.dataset = s.dataset
LEFT JOIN tokens tk ON tk.model = s.model AND tk.dataset = s.dataset
     AND tk.seq_id = s.key_norm_argmax.seq_id AND tk.pos = s.key_norm_argmax.pos
LEFT JOIN tokens tv ON tv.model = s.model AND tv.dataset = s.dataset
     AND tv.seq_id = s.value_norm_argmax.seq_id AND tv.pos = s.value_norm_argmax.pos
ORDER BY s.model, s.dataset""", [head], vertical=len(runs) == 1)


def token_summary(runs: list[RunFiles], token: int, seq: int = 0) -> Query:
    """One position across every layer and KV head: norms and element statistics."""
    check_position(runs, seq, token)
    cols = []
    for kind in KINDS:
        cols += [f"list_avg({kind}) AS {kind}_mean", f"list_aggregate({kind}, 'stddev_pop') AS {kind}_std",
                 f"list_min({kind}) AS {kind}_min", f"list_max({kind}) AS {kind}_max"]
    return Query(f"""SELECT model, dataset, seq_id, pos, token_id, token, layer, head, key_norm, value_norm,
       {', '.join(cols)}
FROM {seq_view(seq)}
WHERE seq_id = ? AND pos = ?
ORDER BY model, dataset, layer, head""", [seq, token])


def search_norm(runs: list[RunFiles], low: float, high: float, kind: str = "key", layer: int | None = None,
                head: int | None = None) -> Query:
    """Vectors whose L2 norm lies in [low, high]."""
    if kind not in KINDS:
        raise UsageError(f"norm kind must be key or value (got {kind!r})")
    if low > high:
        raise UsageError(f"empty norm range: low {low} is above high {high}")
    _, extra, params = _filters(runs, layer, head, "h.")
    # Each run's hits, then their token text from that run's tokens on (seq_id, pos) alone: kv's
    # token join groups the whole tokens table on each query, and integer join keys, not the
    # model and dataset strings too, take 4-9 % off a 2M-row search. The rows are sorted by the
    # run's place in (model, dataset) order, an integer, and get the two names after the sort:
    # sorting on them took 60 % of a search matching every row, carrying them 9 % (docs/query.md).
    in_order = sorted(runs, key=lambda r: (r.model, r.dataset))  # code-point order, as DuckDB sorts UTF-8
    per_run = "\nUNION ALL\n".join(f"""SELECT {i} AS run_order, h.layer, h.head, h.seq_id, h.pos, h.token_id, t.token,
       h.key_norm, h.value_norm
FROM ({norm_rows_sql(r, kind, layer)}) h
LEFT JOIN ({tokens_sql([r])}) t ON t.seq_id = h.seq_id AND t.pos = h.pos
WHERE h.{kind}_norm BETWEEN ? AND ?{extra}""" for i, r in enumerate(in_order))
    models, datasets = literal([r.model for r in in_order]), literal([r.dataset for r in in_order])
    return Query(f"""SELECT {models}[run_order + 1] AS model, {datasets}[run_order + 1] AS dataset,
       layer, head, seq_id, pos, token_id, token, key_norm, value_norm
FROM (SELECT * FROM ({per_run}) ORDER BY run_order, layer, seq_id, pos, head)""", ([low, high] + params) * len(runs))


def check_nearest(runs: list[RunFiles], layer: int, head: int, token: int, k: int, seq: int, by: str,
                  metric: str) -> None:
    check_coordinate(runs, layer, head, token, seq)
    if by not in KINDS:
        raise UsageError(f"--by must be key or value (got {by!r})")
    if metric not in METRICS:
        raise UsageError(f"--metric must be cosine or l2 (got {metric!r})")
    if k < 1:
        raise UsageError(f"--k must be at least 1 (got {k})")


def nearest_candidates(run: RunFiles, layer: int, head: int, by: str) -> Query:
    """What `Run.nearest` loads once of one run's (layer, KV head): the ids, the stored norm and the
    vector, straight from the layer's Parquet files (no `kv` view: no token join, no text)."""
    dim = int(run.meta["head_dim"])
    return Query(f"""SELECT seq_id, pos, token_id, {by}_norm AS norm, CAST({by} AS FLOAT[{dim}]) AS vector
FROM read_parquet({literal([str(f) for f in run.layer_files(layer)])})
WHERE head = ? AND {by} IS NOT NULL""", [head])


def run_tokens(model: str, dataset: str) -> Query:
    """One run's tokens, what `Run.nearest` looks its results' text up in (kvcore/query/nearest.py)."""
    return Query("SELECT seq_id, pos, token_id, token FROM tokens WHERE model = ? AND dataset = ?", [model, dataset])


def nearest(runs: list[RunFiles], layer: int, head: int, token: int, k: int = 10, seq: int = 0, by: str = "key",
            metric: str = "cosine") -> Query:
    """The k vectors of one (layer, KV head) closest to the one at (seq, token): exact, brute force.

    One search in DuckDB decodes the layer's vectors; `Run.nearest` loads them once and ranks
    in numpy (kvcore/query/nearest.py), the same answer (tests/test_query.py compares them)."""
    check_nearest(runs, layer, head, token, k, seq, by, metric)
    fn = "array" if vector_type(runs) != "FLOAT[]" else "list"  # array_* needs a fixed size
    name, score, best = (("cosine_similarity", f"{fn}_cosine_similarity(c.{by}, q.v)", "max_by") if metric == "cosine"
                         else ("l2_distance", f"{fn}_distance(c.{by}, q.v)", "min_by"))
    order = "DESC" if metric == "cosine" else "ASC"
    # max_by/min_by with a count keeps a k-heap per run: no sort of the whole (layer, head). The query
    # vector is read as `coordinate` reads it: from the one file of that layer and sequence.
    return Query(f"""WITH q AS (
  SELECT model, dataset, {by} AS v FROM ({kv_parts_sql(runs, layer, seq)}) WHERE head = ? AND seq_id = ? AND pos = ?
), top AS (
  SELECT c.model, c.dataset,
         unnest({best}({{'seq_id': c.seq_id, 'pos': c.pos, 'token_id': c.token_id, 'norm': c.{by}_norm,
                          'score': {score}}}, {score}, ?)) AS hit
  FROM {layer_view(layer)} c JOIN q ON c.model = q.model AND c.dataset = q.dataset
  WHERE c.head = ? AND NOT (c.seq_id = ? AND c.pos = ?)
  GROUP BY c.model, c.dataset
)
SELECT top.model, top.dataset,
       row_number() OVER (PARTITION BY top.model, top.dataset
                          ORDER BY hit.score {order}, hit.seq_id, hit.pos) AS rank,
       {layer} AS layer, {head} AS head, hit.seq_id AS seq_id, hit.pos AS pos, hit.token_id AS token_id, t.token,
       hit.score AS {name}, hit.norm AS {by}_norm
FROM top
LEFT JOIN tokens t ON t.model = top.model AND t.dataset = top.dataset AND t.seq_id = hit.seq_id AND t.pos = hit.pos
ORDER BY top.model, top.dataset, rank""", [head, seq, token, k, head, seq, token])
