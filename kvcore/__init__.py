"""kvcore: extract, store, query, compress and evaluate language-model KV caches."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Extractor", "open_run", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import kvcore` (and the CLI) does not pull in torch or duckdb.
    if name == "Extractor":
        from kvcore.extract import Extractor

        return Extractor
    if name == "open_run":
        from kvcore.query import open_run

        return open_run
    raise AttributeError(f"module 'kvcore' has no attribute {name!r}")
