"""Print query results (aligned table, JSON, CSV) and export them (CSV, Parquet) atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO

from kvcore.atomic import atomic_path

FORMATS = ("table", "json", "csv")
TABLE_ROWS = 50  # rows printed as a table unless --limit says otherwise
VECTOR_PREVIEW = 4  # vector elements shown in a table cell; vertical layout shows all


def _number(x: float) -> str:
    return f"{x:.6g}"


def cell(value) -> str:
    """One value as table text: 6 significant digits, vectors shortened to their first elements."""
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (list, tuple)):
        items = [cell(v) for v in value]
        if len(items) <= VECTOR_PREVIEW + 1:
            return "[" + ", ".join(items) + "]"
        return "[" + ", ".join(items[:VECTOR_PREVIEW]) + f", … ({len(items)} values)]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {cell(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        # Tokens often carry spaces or newlines; show control characters, keep the rest.
        return value.encode("unicode_escape").decode("ascii") if not value.isprintable() else value
    return str(value)


def _numeric(type_) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)


def render_table(table, more: bool = False) -> str:
    """Aligned columns, numbers right-aligned; `more` adds a line saying rows were cut."""
    names = table.column_names
    rows = table.to_pylist()
    cells = [[cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    right = [_numeric(table.schema.field(i).type) for i in range(len(names))]

    def line(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    out = [line(names), "  ".join("─" * w for w in widths)] + [line(c) for c in cells]
    count = f"({len(rows)} row{'s' if len(rows) != 1 else ''}"
    count += f" shown; more exist: --limit N to see more, --format csv or --export-csv for all)" if more else ")"
    return "\n".join(out + [count])


def render_vertical(table, width: int = 100) -> str:
    """One field per line, vectors in full: for single records such as --coordinate."""
    names = table.column_names
    pad = max(len(n) for n in names)
    out = []
    for i, row in enumerate(table.to_pylist()):
        if table.num_rows > 1:
            out.append(f"-[ record {i + 1} ]" + "-" * 20)
        for n in names:
            value = row[n]
            if isinstance(value, (list, tuple)) and len(value) > VECTOR_PREVIEW + 1:
                items = [f"{cell(v):>10}" for v in value]
                per_line = max(1, (width - pad - 3) // 11)
                chunks = [" ".join(items[j:j + per_line]) for j in range(0, len(items), per_line)]
                out.append(f"{n.ljust(pad)} : [{len(value)} values]")
                out += [" " * (pad + 3) + c for c in chunks]
            else:
                out.append(f"{n.ljust(pad)} : {cell(value)}")
    if table.num_rows == 0:
        out.append("(0 rows)")
    return "\n".join(out)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def write_json(reader, stream: IO[str]) -> int:
    """A JSON array, one record per line; NaN/inf become null. Streams batch by batch."""
    n = 0
    stream.write("[")
    for batch in reader:
        for rec in batch.to_pylist():
            stream.write(("\n" if n == 0 else ",\n") + json.dumps(_clean(rec), ensure_ascii=False, default=str))
            n += 1
    stream.write("\n]\n" if n else "]\n")
    return n


def _csv_writer(sink, schema):
    import pyarrow.csv as pcsv

    return pcsv.CSVWriter(sink, schema, write_options=pcsv.WriteOptions(quoting_style="needed"))


def write_csv(reader, sink) -> int:
    """CSV with a header; `reader` must have flat columns (see csv_query)."""
    n = 0
    with _csv_writer(sink, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            n += batch.num_rows
    return n


def export(reader, path: str | Path, fmt: str) -> int:
    """Stream `reader` into `path` (csv or parquet) under a temporary name, renamed when complete."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        if fmt == "csv":
            return write_csv(reader, str(tmp))
        n = 0
        with pq.ParquetWriter(str(tmp), reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
                n += batch.num_rows
        return n

