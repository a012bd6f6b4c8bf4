"""The views a query sees, as SQL over the run's files read in place (no import step).

  kv                one row per (model, dataset, layer, seq_id, pos, head): token text joined,
                    key/value as FLOAT[head_dim] arrays, their L2 norms
  kv_rows           the same rows without `token`: scans that need no text skip the join
                    (DuckDB 2.0 keeps kv's join once a query reads any column, `token` or not)
  tokens            seq_id, pos, token_id, token, doc_id
  predictions       next-token top-k of each sequence
  stats             stats/*.parquet unioned by column name (stats_file names the file)
  stats_{name}      one view per stats/{name}.parquet (stats_heads, stats_layers, ...)
  compress_metrics  compress/{method}.json, one row per method
  ppl               ppl/{method}.json, one row per method
  runs              one row per run: shape, sizes, which views it has
  by_layer.kv_{L}   the kv rows of layer L (same columns as kv), reading only that layer's files
  by_seq.kv_{S}     the kv rows of sequence S, reading only the shard that holds it
                    DuckDB binds (and opens) every file a view lists on every query, a cost
                    that grows with the run; these narrower views keep verbs that know their
                    layer or sequence from paying it. Created on first use.

Every view has `model` and `dataset` columns, so the same SQL works on one run or on a
whole results/ grid.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from kvcore.query.discover import RunFiles

VIEW_NAMES = ("kv", "kv_rows", "tokens", "predictions", "stats", "compress_metrics", "ppl", "runs")


def literal(value) -> str:
    """A Python value as a SQL literal (paths and names come from the file system)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "NULL"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return "'" + str(value).replace("'", "''") + "'"


def _files(paths: list[Path]) -> str:
    return literal([str(p) for p in paths])


def _run_columns(run: RunFiles) -> str:
    return f"{literal(run.model)} AS model, {literal(run.dataset)} AS dataset"


def _complete_seqs(run: RunFiles) -> str:
    """A filter keeping the sequences of complete shards (tokens.parquet covers them all)."""
    if run.finalized:
        return ""
    return f" WHERE seq_id IN ({', '.join(map(str, run.seq_lengths)) or 'NULL'})"


def vector_type(runs: list[RunFiles]) -> str:
    """FLOAT[d] when every run has one head_dim (array functions need it), else FLOAT[]."""
    dims = {int(r.meta["head_dim"]) for r in runs}
    return f"FLOAT[{dims.pop()}]" if len(dims) == 1 else "FLOAT[]"


def kv_parts_sql(runs: list[RunFiles], layer: int | None = None, seq: int | None = None) -> str:
    """The kv rows of every run (or of one layer, one sequence, or both) without token text."""
    vec = vector_type(runs)
    parts = []
    for r in runs:
        files = r.layer_files(layer) if layer is not None else r.kv_files
        if seq is not None:
            in_shard = set(r.seq_files(seq))
            files = [f for f in files if f in in_shard]
        if not files:
            continue
        if layer is not None:
            source, layer_col = f"read_parquet({_files(files)})", f"{layer}::INTEGER AS layer"
        else:  # the layer comes from the hive partition, as plain duckdb reads it
            source = f"read_parquet({_files(files)}, hive_partitioning = true, hive_types = {{'layer': 'INTEGER'}})"
            layer_col = "layer"
        parts.append(f"SELECT {_run_columns(r)}, {layer_col}, seq_id, pos, head, token_id, key_norm, value_norm, "
                     f"CAST(key AS {vec}) AS key, CAST(value AS {vec}) AS value FROM {source}")
    if not parts:  # no file can hold a row (DuckDB's read_parquet([]) is an error): the same columns, no rows
        return ("SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS dataset, NULL::INTEGER AS layer, "
                "NULL::INTEGER AS seq_id, NULL::INTEGER AS pos, NULL::SMALLINT AS head, NULL::INTEGER AS token_id, "
                f"NULL::FLOAT AS key_norm, NULL::FLOAT AS value_norm, NULL::{vec} AS key, NULL::{vec} AS value "
                "WHERE false")
    return "\nUNION ALL\n".join(parts)


def layer_view(layer: int) -> str:
    return f"by_layer.kv_{layer}"


def seq_view(seq: int) -> str:
    return f"by_seq.kv_{seq}"


LAZY_VIEW = re.compile(r"\b(by_layer|by_seq)\.kv_(\d+)\b", re.IGNORECASE)


def lazy_view_sql(runs: list[RunFiles], schema: str, number: int) -> str | None:
    """SELECT of by_layer.kv_{number} / by_seq.kv_{number}, or None when no run has it."""
    schema = schema.lower()
    if schema == "by_layer" and any(r.layer_files(number) for r in runs):
        return kv_sql(runs, layer=number)
    if schema == "by_seq" and any(r.seq_files(number) for r in runs):
        return kv_sql(runs, seq=number)
    return None


def kv_sql(runs: list[RunFiles], layer: int | None = None, seq: int | None = None,
           parts: str | None = None) -> str:
    """kv: the rows of `parts` (a view's name; default the rows of kv_parts_sql) with token text."""
    # Grouping tokens by their key lets DuckDB prove the join adds no rows, so a query that
    # reads no kv column (count(*)) drops the join (join elimination).
    return f"""
SELECT p.model, p.dataset, p.layer, p.seq_id, p.pos, p.head, p.token_id, t.token,
       p.key_norm, p.value_norm, p.key, p.value
FROM {parts or f"({kv_parts_sql(runs, layer, seq)})"} p
LEFT JOIN (SELECT model, dataset, seq_id, pos, any_value(token) AS token FROM tokens GROUP BY ALL) t
  ON p.model = t.model AND p.dataset = t.dataset AND p.seq_id = t.seq_id AND p.pos = t.pos"""


def norm_rows_sql(run: RunFiles, kind: str, layer: int | None = None) -> str:
    """model, dataset, layer, head, seq_id, pos, token_id, key_norm, value_norm of a run's rows
    (or one layer's), for a search on `kind`'s norm: from the run's norm file sorted by it, whose
    row-group statistics let DuckDB skip all but the groups that can hold a hit; a run without
    one (not finalized, or finalized before them) from its layer files."""
    columns = "layer, head, seq_id, pos, token_id, key_norm, value_norm"
    if kind not in run.norm_files:
        return f"SELECT model, dataset, {columns} FROM ({kv_parts_sql([run], layer)})"
    where = "" if layer is None else f" WHERE layer = {int(layer)}"
    return (f"SELECT {_run_columns(run)}, CAST(layer AS INTEGER) AS layer, head, seq_id, pos, token_id, key_norm, "
            f"value_norm FROM read_parquet({literal(str(run.norm_files[kind]))}){where}")


def tokens_sql(runs: list[RunFiles]) -> str:
    parts = []
    for r in runs:
        if r.tokens:
            parts.append(f"SELECT {_run_columns(r)}, seq_id, pos, token_id, token, doc_id "
                         f"FROM read_parquet({literal(str(r.tokens))}){_complete_seqs(r)}")
    if not parts:  # kv still joins it; an empty typed view keeps `token` a (NULL) column
        return ("SELECT NULL::VARCHAR AS model, NULL::VARCHAR AS dataset, NULL::INTEGER AS seq_id, "
                "NULL::INTEGER AS pos, NULL::INTEGER AS token_id, NULL::VARCHAR AS token, "
                "NULL::INTEGER AS doc_id WHERE false")
    return "\nUNION ALL\n".join(parts)


def _by_name(selects: list[str]) -> str | None:
    return "\nUNION ALL BY NAME\n".join(selects) if selects else None


def predictions_sql(runs: list[RunFiles]) -> str | None:
    return _by_name([f"SELECT {_run_columns(r)}, * FROM read_parquet({_files(r.predictions)})"
                     for r in runs if r.predictions])


def stats_sql(runs: list[RunFiles]) -> str | None:
    # Files may differ in columns (per layer, per head, ...): union by name, say which file.
    return _by_name([f"SELECT {_run_columns(r)}, parse_filename(filename, true) AS stats_file, * EXCLUDE (filename) "
                     f"FROM read_parquet({_files(r.stats)}, union_by_name = true, filename = true)"
                     for r in runs if r.stats])


def stats_view_name(path: Path) -> str:
    return "stats_" + re.sub(r"\W", "_", path.stem).lower()


def stats_table_views(runs: list[RunFiles]) -> list[tuple[str, str]]:
    """stats_{name} for each stats/{name}.parquet: each file kept whole, with its own columns."""
    by_name: dict[str, list[str]] = {}
    for r in runs:
        for f in r.stats:
            by_name.setdefault(stats_view_name(f), []).append(
                f"SELECT {_run_columns(r)}, * FROM read_parquet({literal(str(f))})")
    return [(name, "\nUNION ALL BY NAME\n".join(parts)) for name, parts in sorted(by_name.items())]


SOURCE_FILE = "kvcore_source_file"  # read_json's file-name column in the ppl / compress_metrics views


def json_rows_sql(runs: list[RunFiles], attr: str) -> str | None:
    """compress/{method}.json or ppl/{method}.json: one row per file, `method` from its name."""
    selects = []
    for r in runs:
        files = getattr(r, attr)
        if not files:
            continue
        # The run's model/dataset and the file name's method win over the file's own keys: a
        # second `method` column would make UNION BY NAME across runs fail. The file name comes
        # in a column of our own name, so a JSON key `filename` is just a column.
        keys = set().union(*(r.result_keys[f] for f in files))
        own = sorted(keys & {"method", "model", "dataset"})
        rest = f", * EXCLUDE ({', '.join([SOURCE_FILE, *own])})" if keys - set(own) else ""
        selects.append(f"SELECT {_run_columns(r)}, parse_filename({SOURCE_FILE}, true) AS method{rest} "
                       f"FROM read_json({_files(files)}, union_by_name = true, filename = '{SOURCE_FILE}', "
                       "format = 'auto')")
    return _by_name(selects)


def present_views(run: RunFiles) -> list[str]:
    have = {"kv": True, "tokens": run.tokens is not None, "predictions": bool(run.predictions),
            "stats": bool(run.stats), "compress_metrics": bool(run.compress), "ppl": bool(run.ppl)}
    return [name for name, ok in have.items() if ok] + [stats_view_name(f) for f in run.stats]


RUNS_COLUMNS = ("model", "dataset", "path", "finalized", "n_shards", "n_sequences", "n_tokens", "n_kv_rows",
                "num_layers", "num_kv_heads", "num_heads", "head_dim", "seq_len", "dtype", "kv_bytes", "views")


def runs_sql(runs: list[RunFiles]) -> str:
    rows = []
    for r in runs:
        m = r.meta
        values = [r.model, r.dataset, str(r.path), r.finalized, r.n_shards, len(r.seq_lengths),
                  sum(r.seq_lengths.values()), r.n_kv_rows, int(m["num_layers"]), int(m["num_kv_heads"]),
                  int(m.get("num_heads") or m["num_kv_heads"]), int(m["head_dim"]),
                  int(m["seq_len"]) if m.get("seq_len") is not None else None, m.get("dtype"),
                  sum(f.stat().st_size for f in r.kv_files), present_views(r)]
        rows.append("(" + ", ".join(literal(v) for v in values) + ")")
    cast = {"n_shards": "INTEGER", "n_sequences": "INTEGER", "n_tokens": "BIGINT", "n_kv_rows": "BIGINT",
            "num_layers": "INTEGER", "num_kv_heads": "INTEGER", "num_heads": "INTEGER", "head_dim": "INTEGER",
            "seq_len": "INTEGER", "dtype": "VARCHAR", "kv_bytes": "BIGINT", "views": "VARCHAR[]"}
    cols = ", ".join(f"CAST({c} AS {cast[c]}) AS {c}" if c in cast else c for c in RUNS_COLUMNS)
    return f"SELECT {cols} FROM (VALUES {', '.join(rows)}) AS t({', '.join(RUNS_COLUMNS)})"


def view_statements(runs: list[RunFiles]) -> list[tuple[str, str]]:
    """(name, SELECT) for each view the runs support, in dependency order."""
    views = [("runs", runs_sql(runs)), ("tokens", tokens_sql(runs)), ("kv_rows", kv_parts_sql(runs)),
             ("kv", kv_sql(runs, parts="kv_rows")),
             ("predictions", predictions_sql(runs)), ("stats", stats_sql(runs)),
             ("compress_metrics", json_rows_sql(runs, "compress")), ("ppl", json_rows_sql(runs, "ppl"))]
    return [(name, sql) for name, sql in views if sql] + stats_table_views(runs)

