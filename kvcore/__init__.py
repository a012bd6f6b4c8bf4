"""kvcore: extract, store, query, compress and evaluate language-model KV caches."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module defining it; imported on first use so that `import kvcore` (and the
# CLI) does not pull in torch or duckdb
_LAZY = {
    "Extractor": "kvcore.extract",
    "open_run": "kvcore.query",
    "load_cache": "kvcore.evaluation.stored",
    "validate_cache": "kvcore.evaluation.stored",
    "LoadedCache": "kvcore.evaluation.stored",
    "compressed_cache": "kvcore.evaluation.generation",
    "apply": "kvcore.evaluation.generation",
    "score_continuation": "kvcore.evaluation.score",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvcore' has no attribute {name!r}")
