"""`open_run(path)`: a run (or a results/ grid) as a read-only DuckDB connection with views.

    run = kvcore.open_run("results/smollm2-135m/enwiki-sample")
    run.coordinate(5, 2, 17)                    # pandas DataFrame
    run.search_norm(0.5, 1.0, "key", arrow=True)  # pyarrow Table
    run.sql("SELECT layer, avg(key_norm) FROM kv GROUP BY layer")
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

from kvcore.query import verbs
from kvcore.query.discover import RunFiles, load_runs
from kvcore.query.limits import QueryGuard, check_threads, check_timeout, memory_limit_bytes
from kvcore.query.remote import as_path, filesystems
from kvcore.query.nearest import Candidates, RunCandidates, TokenIndex, tensor_candidates
from kvcore.query.sandbox import QueryError, connect, statements, translate
from kvcore.query.verbs import Query
from kvcore.query.views import LAZY_VIEW, lazy_view_sql, view_statements

# (layer, head, kind) candidate sets kept: for 222k 64-dim vectors ~3 MB (maps of the safetensors, ids,
# norms), or ~57 MB where the vectors came from Parquet
NEAREST_CACHED = 4


class Result:
    """The rows of one read-only query, to fetch; it runs no further SQL (unlike a DuckDB relation)."""

    def __init__(self, relation, guard, translate_error):
        self._relation, self._guard, self._translate = relation, guard, translate_error

    @property
    def columns(self) -> list[str]:
        return self._relation.columns

    @property
    def types(self) -> list:
        return self._relation.types

    def _fetch(self, how):
        import duckdb

        try:
            with self._guard():
                return how(self._relation)
        except duckdb.Error as exc:
            raise self._translate(exc) from None

    def fetchall(self) -> list[tuple]:
        return self._fetch(lambda r: r.fetchall())

    def fetchone(self) -> tuple | None:
        return self._fetch(lambda r: r.fetchone())

    def df(self):
        return self._fetch(lambda r: r.df())

    def arrow(self):
        return self._fetch(lambda r: r.to_arrow_table())


class Run:
    """The views of one run or of every run under a directory, queried with SQL.

    Verb methods return a pandas DataFrame, or a pyarrow Table with `arrow=True`. Each query
    is bounded: `timeout` seconds (default 300), `memory_limit` ('4GB', '25%'; default half the
    RAM, spilling to a private temporary directory), `threads` (at most the cores).
    """

    def __init__(self, path: str | Path, model: str | None = None, dataset: str | None = None,
                 threads: int | None = None, timeout: float | None = None, memory_limit: str | int | None = None):
        self.threads, timeout_s = check_threads(threads), check_timeout(timeout)
        memory = memory_limit_bytes(memory_limit)
        self.path = as_path(path)
        self.runs: list[RunFiles] = load_runs(path, model, dataset)
        views = view_statements(self.runs)
        self.views = [name for name, _ in views]
        files = [f for r in self.runs for f in r.all_files]
        self._spill = Path(tempfile.mkdtemp(prefix="kvcore-query-spill-"))
        # A Run that is never closed (a notebook, a failed constructor) still removes its spill
        # directory when it is collected or the interpreter exits.
        self._remove_spill = weakref.finalize(self, shutil.rmtree, self._spill, ignore_errors=True)
        try:
            self._con = connect(files, views, threads=self.threads, memory_limit=memory, temp_directory=self._spill,
                                filesystems=filesystems(r.path for r in self.runs))
        except BaseException:
            self._remove_spill()
            raise
        self._guard = QueryGuard(self._con.interrupt, timeout_s)
        # by_layer.kv_{L} / by_seq.kv_{S} are created when a query first names them: creating
        # a view binds it, and binding all of them would slow every `kvcore query` start.
        self._created: set[str] = set()
        self._column_cache: dict[str, list[str]] = {}
        self._candidates: dict[tuple, Candidates] = {}  # see nearest()
        self._tokens: dict[tuple[str, str], TokenIndex] = {}  # each run's tokens, read by its first nearest()

    # ---- raw SQL ----------------------------------------------------------------------

    def execute(self, query: str | Query, params: list | None = None) -> Result:
        """Run read-only SQL; returns a Result over the last statement's rows (fetched on demand)."""
        return Result(self._run(query, params, lazy=True), self._guard, lambda exc: self._translate(exc, query))

    def _translate(self, exc: Exception, query: str | Query) -> QueryError:
        """DuckDB's error as one QueryError line, naming the columns of the views the query reads."""
        sql = query.sql if isinstance(query, Query) else query
        return translate(exc, self.views, self._columns_named_in(sql))

    def _run(self, query: str | Query, params: list | None, lazy: bool):
        import duckdb

        if isinstance(query, Query):
            query, params = query.sql, query.params
        parts = statements(query)
        if params and len(parts) > 1:
            raise QueryError("parameters need a single SQL statement")
        try:
            with self._guard():
                self._create_named_views(query)
                for part in parts[:-1]:
                    self._con.execute(part)
                if lazy:
                    return self._con.sql(parts[-1], params=params or None)
                # The DB-API path binds the query once; a relation binds it twice, which costs
                # milliseconds per query when a view lists hundreds of files (point lookups).
                return self._con.execute(parts[-1], params or [])
        except duckdb.Error as exc:
            raise self._translate(exc, query) from None

    def _create_named_views(self, sql: str) -> None:
        for schema, number in set(LAZY_VIEW.findall(sql)):
            name = f"{schema.lower()}.kv_{int(number)}"
            if name not in self._created:
                view_sql = lazy_view_sql(self.runs, schema, int(number))
                if view_sql:  # else DuckDB reports the missing view
                    self._con.execute(f"CREATE VIEW {name} AS {view_sql}")
                self._created.add(name)

    def columns(self, view: str) -> list[str]:
        """Column names of a view."""
        if view not in self._column_cache:
            with self._guard():
                self._column_cache[view] = [c[0] for c in self._con.execute(f"DESCRIBE {view}").fetchall()]
        return self._column_cache[view]

    def _columns_named_in(self, sql: str) -> dict[str, list[str]]:
        words = set(re.findall(r"\w+", sql.lower()))
        return {v: self.columns(v) for v in self.views if v in words}

    def sql(self, query: str | Query, params: list | None = None):
        """Result as a pandas DataFrame."""
        return self._fetch(query, params, lambda res: res.df())

    def arrow(self, query: str | Query, params: list | None = None):
        """Result as a pyarrow Table."""
        return self._fetch(query, params, lambda res: res.to_arrow_table())

    def reader(self, query: str | Query, params: list | None = None, batch_rows: int = 65536):
        """Result as a pyarrow RecordBatchReader, streamed (for exports of any size).

        The time limit covers the reading too: it starts with the first batch.
        """
        import pyarrow as pa

        source = self._fetch(query, params, lambda rel: rel.to_arrow_reader(batch_rows), lazy=True)

        def batches():
            import duckdb

            try:
                with self._guard():
                    yield from source
            except duckdb.Error as exc:  # errors can surface while rows are produced
                raise self._translate(exc, query) from None

        return pa.RecordBatchReader.from_batches(source.schema, batches())

    def _fetch(self, query, params, how, lazy: bool = False):
        import duckdb

        try:
            with self._guard():
                result = self._run(query, params, lazy)
                with warnings.catch_warnings():
                    # "extra copy" on DB-API Arrow results: small next to binding twice (see _run)
                    warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")
                    return how(result)
        except duckdb.Error as exc:  # errors can surface while rows are produced
            raise self._translate(exc, query) from None

    def explain(self, query: str | Query, params: list | None = None, analyze: bool = True) -> str:
        """DuckDB's plan (with rows, files and row groups scanned when `analyze`)."""
        if isinstance(query, Query):
            query, params = query.sql, query.params
        prefix = "EXPLAIN ANALYZE " if analyze else "EXPLAIN "
        rows = self._run(prefix + query, params, lazy=False).fetchall()
        return "\n".join(r[-1] for r in rows)

    def profile(self, query: str | Query, params: list | None = None) -> dict:
        """EXPLAIN ANALYZE as JSON: the operator tree with rows and row groups scanned."""
        if isinstance(query, Query):
            query, params = query.sql, query.params
        return json.loads(self._run("EXPLAIN (ANALYZE, FORMAT json) " + query, params, lazy=False).fetchall()[0][1])

    def scans(self, query: str | Query, params: list | None = None) -> list[dict]:
        """What each Parquet scan of the query touched: files, row groups, rows, bytes (EXPLAIN ANALYZE)."""
        found = []

        def walk(node):
            if node.get("type") == "TABLE_SCAN":
                info = node.get("extra_info", {})
                files = str(info.get("Scanning Files", "")).split("/")
                found.append({"function": info.get("Function"), "projections": info.get("Projections", []),
                              "files_scanned": int(files[0]) if len(files) == 2 else None,
                              "files_total": int(files[1]) if len(files) == 2 else None,
                              "files_read": int(info.get("Total Files Read", 0)),
                              # DuckDB shortens long lists with "..."
                              "filenames": [f.strip() for f in str(info.get("Filename(s)", "")).split(",")
                                            if f.strip() not in ("", "...")],
                              "row_groups_scanned": node.get("row_groups_scanned"),
                              "row_groups_total": node.get("total_row_groups_to_scan"),
                              "rows_out": node.get("rows_scanned")})
            for child in node.get("children", []):
                walk(child)

        for op in self.profile(query, params)["operator"]:
            walk(op)
        return found

    # ---- verbs --------------------------------------------------------------------------

    def _verb(self, name: str, *args, arrow: bool = False, **kwargs):
        query = getattr(verbs, name)(self.runs, *args, **kwargs)
        return self.arrow(query) if arrow else self.sql(query)

    def query(self, verb: str, *args, **kwargs) -> Query:
        """The Query (SQL and parameters) a verb runs, e.g. run.query("coordinate", 5, 2, 17)."""
        if verb not in verbs.VERBS:
            raise QueryError(f"unknown verb {verb!r}; verbs: {', '.join(verbs.VERBS)}")
        return getattr(verbs, verb)(self.runs, *args, **kwargs)

    def info(self, *, arrow: bool = False):
        """One row per run: shape, sizes, views present."""
        return self._verb("info", arrow=arrow)

    def coordinate(self, layer: int, head: int, token: int, seq: int = 0, *, arrow: bool = False):
        """Key and value vectors and norms at (layer, KV head, token position) of one sequence."""
        return self._verb("coordinate", layer, head, token, seq, arrow=arrow)

    def list_tokens(self, seq: int | None = None, *, arrow: bool = False):
        return self._verb("list_tokens", seq, arrow=arrow)

    def token_search(self, text: str, layer: int | None = None, head: int | None = None, *, arrow: bool = False):
        """Every (position, layer, head) where a token's text matches, with K/V norms."""
        return self._verb("token_search", text, layer, head, arrow=arrow)

    def layer_summary(self, layer: int, *, arrow: bool = False):
        return self._verb("layer_summary", layer, arrow=arrow)

    def head_summary(self, layer: int, head: int, *, arrow: bool = False):
        return self._verb("head_summary", layer, head, arrow=arrow)

    def token_summary(self, token: int, seq: int = 0, *, arrow: bool = False):
        return self._verb("token_summary", token, seq, arrow=arrow)

    def search_norm(self, low: float, high: float, kind: str = "key", layer: int | None = None,
                    head: int | None = None, *, arrow: bool = False):
        return self._verb("search_norm", low, high, kind, layer, head, arrow=arrow)

    def nearest(self, layer: int, head: int, token: int, k: int = 10, seq: int = 0, by: str = "key",
                metric: str = "cosine", *, arrow: bool = False):
        """The `nearest` verb's rows, ranked in numpy on the (layer, head)'s vectors
        (kvcore/query/nearest.py): the last NEAREST_CACHED (layer, head, kind) stay at hand while
        the Run is open."""
        verbs.check_nearest(self.runs, layer, head, token, k, seq, by, metric)
        key = (layer, head, by)
        found = self._candidates.pop(key, None)
        if found is None:
            found = Candidates({(r.model, r.dataset): self._load_candidates(r, layer, head, by)
                                for r in self.runs if r.layer_files(layer)})
        self._candidates[key] = found  # the most recently used last
        while len(self._candidates) > NEAREST_CACHED:
            self._candidates.pop(next(iter(self._candidates)))

        def tokens_of(models, datasets, seq_ids, positions):
            token_ids, tokens = [None] * len(models), [None] * len(models)
            for name in dict.fromkeys(zip(models, datasets)):
                if name not in self._tokens:
                    self._tokens[name] = TokenIndex(self.arrow(verbs.run_tokens(*name)))
                at = [i for i, n in enumerate(zip(models, datasets)) if n == name]
                ids, text = self._tokens[name].lookup([seq_ids[i] for i in at], [positions[i] for i in at])
                for i, a, b in zip(at, ids, text):
                    token_ids[i], tokens[i] = a, b
            return token_ids, tokens

        table = found.nearest(seq, token, k, metric, layer, head, by, tokens_of)
        return table if arrow else table.to_pandas()

    def _load_candidates(self, run: RunFiles, layer: int, head: int, by: str) -> RunCandidates:
        """A run's (layer, head) vectors: from its safetensors where they equal its Parquet rows, else
        the Parquet columns ranking needs (kvcore/query/nearest.py)."""
        found = tensor_candidates(run, layer, head, by)
        if found is not None:
            return RunCandidates(found, threads=self.threads)
        return RunCandidates(table=self.arrow(verbs.nearest_candidates(run, layer, head, by)), threads=self.threads)

    # ---- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        self._con.close()
        self._remove_spill()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(r.name for r in self.runs[:3]) + (", ..." if len(self.runs) > 3 else "")
        return f"<kvcore Run {self.path} ({len(self.runs)} run(s): {names}); views: {', '.join(self.views)}>"


def open_run(path: str | Path, model: str | None = None, dataset: str | None = None,
             threads: int | None = None, timeout: float | None = None, memory_limit: str | int | None = None) -> Run:
    """Open a run directory, or a directory of runs (results/), for read-only queries; also a bucket
    prefix, s3://BUCKET/PREFIX (kvcore.query.remote: endpoint and credentials from the AWS_* variables)."""
    return Run(path, model=model, dataset=dataset, threads=threads, timeout=timeout, memory_limit=memory_limit)
