"""The stats rule's job: per layer/head/kind statistics of a run's extracted cache."""

from __future__ import annotations

from pathlib import Path


def stats(shards, metadata, tables, threads: int, device: str) -> None:
    """Every stats table of `tables` (results/{model}/{dataset}/stats/{table}.parquet) from exactly
    `shards`; the sums run on `device` ("auto": the GPU when there is one)."""
    from kvcore.stats import write_stats

    write_stats(list(shards), Path(tables[0]).parent, metadata=metadata, threads=threads, device=device)
