"""Run a Query and send its rows where the user asked: stdout (table/json/csv) or a file."""

from __future__ import annotations

import codecs
import io
import sys

from kvcore.query import output
from kvcore.query.verbs import Query

NESTED = ("list", "array", "struct", "map", "union")


def flat(run, query: Query) -> Query:
    """The query with nested columns (vectors, structs) as text, for CSV.

    Only the last statement is kept: earlier ones are SELECTs (the guard allows nothing
    else) whose results would be dropped anyway.
    """
    from kvcore.query.sandbox import statements

    last = statements(query.sql)[-1]
    if last.lstrip().upper().startswith("EXPLAIN"):
        return Query(last, query.params, query.vertical)
    rel = run.execute(last, query.params)
    exprs = []
    for name, type_ in zip(rel.columns, rel.types):
        quoted = '"' + name.replace('"', '""') + '"'
        exprs.append(f"CAST({quoted} AS VARCHAR) AS {quoted}" if type_.id in NESTED else quoted)
    return Query(f"SELECT {', '.join(exprs)} FROM (\n{last}\n)", query.params, query.vertical)


class _TextSink(io.RawIOBase):
    """Lets pyarrow's CSV writer (bytes) write to sys.stdout (text), whatever that is now."""

    def __init__(self, stream):
        self.stream, self.decoder = stream, codecs.getincrementaldecoder("utf-8")()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.stream.write(self.decoder.decode(bytes(data)))
        return len(data)


def head(reader, n: int):
    """The first n rows of a RecordBatchReader as a Table, and whether more rows followed."""
    import pyarrow as pa

    batches, rows = [], 0
    for batch in reader:
        batches.append(batch)
        rows += batch.num_rows
        if rows > n:
            break
    table = pa.Table.from_batches(batches, schema=reader.schema)
    return table.slice(0, n), table.num_rows > n


def has_long_vectors(table) -> bool:
    """Whether some cell holds a list too long for a table cell (a K/V vector, say)."""
    return any(isinstance(v, list) and len(v) > output.VECTOR_PREVIEW + 1
               for row in table.to_pylist() for v in row.values())


def show(run, query: Query, fmt: str, limit: int | None, stream=None) -> int:
    """Print the result; returns the number of rows printed."""
    stream = stream or sys.stdout
    if fmt == "json":
        return output.write_json(run.reader(query), stream)
    if fmt == "csv":
        return output.write_csv(run.reader(flat(run, query)), _TextSink(stream))
    cap = limit if limit is not None else output.TABLE_ROWS
    select = single_select(query.sql)
    if select:  # LIMIT in SQL lets DuckDB stop early (top-N for ORDER BY)
        table = run.arrow(Query(select, query.params).limited(cap + 1))
        table, more = table.slice(0, cap), table.num_rows > cap
    else:
        table, more = head(run.reader(query), cap)
    if query.vertical or (table.num_rows == 1 and has_long_vectors(table)):
        text = output.render_vertical(table)
        if more:
            text += "\n(more records exist: raise --limit)"
    else:
        text = output.render_table(table, more and limit is None)
    stream.write(text + "\n")
    return table.num_rows


def single_select(sql: str) -> str | None:
    """The statement without its ';' when `sql` is one SELECT (so it can be wrapped), else None."""
    from kvcore.query.sandbox import statements

    parts = statements(sql)
    if len(parts) == 1 and not parts[0].lstrip().upper().startswith("EXPLAIN"):
        return parts[0]
    return None


def export(run, query: Query, path: str, fmt: str) -> int:
    q = flat(run, query) if fmt == "csv" else query
    return output.export(run.reader(q), path, fmt)
