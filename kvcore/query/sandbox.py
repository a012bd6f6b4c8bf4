"""A read-only DuckDB connection confined to a run's files.

Four locks, each DuckDB's own:
  * `allowed_paths` lists exactly the files the views read (as they are inside the run:
    kvcore.query.discover refuses links and manifest entries that lead out of it; s3://
    URLs for a run in a bucket, read through the fsspec `filesystems` given), and
    `enable_external_access = false` makes those the only files the engine opens: no
    /etc/passwd, no ATTACH, no extension downloads;
  * `lock_configuration` refuses the SET that would undo any of this;
  * only SELECT statements (and EXPLAIN of one) run, checked on DuckDB's own parse, so
    CREATE / INSERT / COPY never reach the in-memory catalog or a listed file (allowed_paths
    would let COPY TO write them); the connection itself never leaves kvcore.query.run;
  * threads, memory and spill space are bounded (kvcore.query.limits): spilling goes to a
    private temporary directory, never into the user's working directory.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from kvcore.errors import KvcoreError, one_line

_EXPLAIN = re.compile(r"^\s*EXPLAIN\s*(?:ANALY[SZ]E\b\s*)?(?:\([^)]*\)\s*)?", re.IGNORECASE)


class QueryError(KvcoreError):
    """A query that DuckDB (or the read-only guard) refused: exit code 1."""


def connect(files: list[Path], views: list[tuple[str, str]], *, threads: int, memory_limit: int,
            temp_directory: Path, filesystems: list = ()):
    import duckdb

    config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False, "threads": threads,
              "memory_limit": f"{memory_limit}B", "temp_directory": str(temp_directory)}
    con = duckdb.connect(":memory:", config=config)
    for fs in filesystems:  # before the locks below
        con.register_filesystem(fs)
    # Warm point lookups reuse the Parquet footers instead of re-reading them per query.
    con.execute("SET parquet_metadata_cache = true")
    con.execute("SET python_enable_replacements = false")  # SQL cannot reach Python variables
    con.execute("SET allowed_paths = ?", [sorted({str(f) for f in files})])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    for schema in ("by_layer", "by_seq"):  # narrower kv views, created on first use (see Run)
        con.execute(f"CREATE SCHEMA {schema}")
    for name, sql in views:
        try:
            con.execute(f"CREATE VIEW {name} AS {sql}")
        except duckdb.Error as exc:
            raise KvcoreError(f"could not open the {name} view: {one_line(exc)}") from None
    return con


def statements(sql: str) -> list[str]:
    """The SQL split into statements, each checked to be read-only; raises QueryError otherwise."""
    if not isinstance(sql, str):
        raise QueryError(f"SQL must be text (got {type(sql).__name__})")
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv or stdin bytes that are not UTF-8 arrive as surrogates
        raise QueryError(f"the SQL is not valid UTF-8 (at character {exc.start}); give it as UTF-8 text") from None
    return list(_checked_statements(sql))


@functools.lru_cache(maxsize=64)  # verb SQL lists files: up to ~100 kB a text
def _checked_statements(sql: str) -> tuple[str, ...]:
    """`statements` of text already known to be a str in UTF-8, kept per text: DuckDB's parse
    and the checks cost half a millisecond, which a verb asked again (new parameters, the same
    SQL) need not pay twice. A refused text raises each time (exceptions are not cached)."""
    import duckdb

    try:
        parsed = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None
    if not parsed:
        raise QueryError("no SQL statement given")
    for st in parsed:
        _check(st)
    return tuple(st.query.strip().rstrip(";").rstrip() for st in parsed)


def _check(st) -> None:
    import duckdb

    kind = st.type
    if kind == duckdb.StatementType.EXPLAIN:
        inner = _EXPLAIN.sub("", st.query, count=1)
        try:
            inner_parsed = duckdb.extract_statements(inner)
        except duckdb.Error:
            inner_parsed = []
        if len(inner_parsed) == 1 and inner_parsed[0].type == duckdb.StatementType.SELECT:
            return
        kind_name = inner_parsed[0].type.name if len(inner_parsed) == 1 else "an unrecognised statement"
        raise QueryError(f"read-only: EXPLAIN of {kind_name} refused; kvcore query runs SELECT statements "
                         "(and EXPLAIN of one) only")
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(f"read-only: {kind.name} statements are refused; kvcore query runs SELECT statements "
                         "(and EXPLAIN of one) only; write results with --export-csv or --export-parquet")


def translate(exc: Exception, views: list[str], columns: dict[str, list[str]] | None = None) -> QueryError:
    """DuckDB's message on one line, with a hint where the user can act on it.

    `columns`: the columns of the views the query names, listed when a column is unknown.
    """
    import duckdb

    msg = one_line(exc)
    if isinstance(exc, duckdb.BinderException) and "not found" in msg and columns:
        msg += " (" + "; ".join(f"{view} columns: {', '.join(cols)}" for view, cols in columns.items()) + ")"
    if isinstance(exc, duckdb.PermissionException):
        msg = (f"refused: {msg} (kvcore query is read-only and reads only the run's own files "
               "through the views)")
    elif isinstance(exc, duckdb.CatalogException) and "does not exist" in msg:
        msg = f"{msg} (views: {', '.join(views)})"
    return QueryError(msg)
