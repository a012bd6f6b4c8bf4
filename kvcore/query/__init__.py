"""SQL over extracted KV caches: DuckDB views over a run's Parquet files, read in place.

`open_run(path)` is the Python entry point; `kvcore query` (kvcore/cli/query.py) is the
command line. Both run the SQL built in `verbs`.
"""

from kvcore.query.run import Run, open_run
from kvcore.query.sandbox import QueryError
from kvcore.query.verbs import Query

__all__ = ["Run", "open_run", "Query", "QueryError"]
