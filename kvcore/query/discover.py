"""Find the runs under a path and the files of each that a query may read.

A run directory is what `kvcore extract` writes (kvcore/storage.py). Only shards whose
manifest (`shards/kv-*.json`, written last) exists are read, so a query during an
extraction sees complete shards only, never a half-written Parquet file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvcore.errors import KvcoreError, UsageError

SHAPE_KEYS = ("num_layers", "num_kv_heads", "num_heads", "head_dim", "seq_len", "dtype")


@dataclass
class RunFiles:
    """One run directory: its shape, its complete sequences and the files to read."""

    path: Path
    model: str
    dataset: str
    meta: dict
    finalized: bool  # metadata.json written: every shard is complete
    seq_lengths: dict[int, int]  # seq_id -> number of positions, complete shards only
    n_shards: int
    n_kv_rows: int
    kv_files: list[Path]
    seq_shard: dict[int, int] = field(default_factory=dict)  # seq_id -> shard holding it
    shard_files: dict[int, list[Path]] = field(default_factory=dict)  # shard -> its Parquet files
    tokens: Path | None = None
    predictions: list[Path] = field(default_factory=list)
    stats: list[Path] = field(default_factory=list)
    compress: list[Path] = field(default_factory=list)
    ppl: list[Path] = field(default_factory=list)

    @property
    def all_files(self) -> list[Path]:
        extra = [self.tokens] if self.tokens else []
        return self.kv_files + extra + self.predictions + self.stats + self.compress + self.ppl

    def parquet_items(self, what: str) -> list[int]:
        """The layers or KV heads (`what`) that have Parquet rows: all, unless the extraction chose."""
        n = int(self.meta["num_layers" if what == "layers" else "num_kv_heads"])
        chosen = (self.meta.get("parquet") or {}).get(what)
        return list(range(n)) if chosen is None else list(chosen)

    def layer_files(self, layer: int) -> list[Path]:
        return [f for f in self.kv_files if f.parent.name == f"layer={layer}"]

    def seq_files(self, seq: int) -> list[Path]:
        """The Parquet files (one per layer) of the shard that holds sequence `seq`."""
        return self.shard_files.get(self.seq_shard.get(seq), [])

    @property
    def name(self) -> str:
        return f"{self.model}/{self.dataset}"


def is_run_dir(path: Path) -> bool:
    return (path / "metadata.json").is_file() or (path / "kv" / "metadata.json").is_file() \
        or any((path / "shards").glob("kv-*.json"))


def find_runs(path: str | Path, max_depth: int = 4) -> list[Path]:
    """`path` itself when it is a run, else every run below it (results/{model}/{dataset})."""
    root = Path(path)
    if not root.exists():
        raise UsageError(f"{root}: no such directory (give a run directory such as results/MODEL/DATASET, "
                         "or results/ for every run)")
    if not root.is_dir():
        raise UsageError(f"{root} is a file; give a run directory (results/MODEL/DATASET) or results/")
    if is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames[:] = []  # a run's own subdirectories hold no runs
            continue
        # hidden dirs are staging/temporary outputs; kv/ holds partitions, not runs
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "kv") if depth < max_depth else []
    if not found:
        raise UsageError(f"{root} is not a run directory: no metadata.json or shards/kv-*.json in it or below it "
                         "(a run is what `kvcore extract` writes, e.g. results/MODEL/DATASET)")
    return found


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KvcoreError(f"{path}: unreadable ({exc})") from None


def load_run(path: Path) -> RunFiles:
    """The complete part of one run directory."""
    manifests = [_read_json(p) for p in sorted((path / "shards").glob("kv-*.json"))]
    meta_path = next((p for p in (path / "metadata.json", path / "kv" / "metadata.json") if p.is_file()), None)
    meta = _read_json(meta_path) if meta_path else {}
    if not manifests:
        raise KvcoreError(f"{path}: no complete shard yet (shards/kv-*.json missing); wait for the extraction "
                          "to finish a shard")
    first = manifests[0]
    meta = {**{k: first.get(k) for k in ("model", "dataset", "parquet", *SHAPE_KEYS)}, **meta}
    missing = [k for k in ("num_layers", "num_kv_heads", "head_dim") if meta.get(k) is None]
    if missing:
        raise KvcoreError(f"{path}: shard manifest lacks {', '.join(missing)}; re-extract this run")
    kv_files, seq_lengths, seq_shard, shard_files = [], {}, {}, {}
    for m in manifests:
        for rel in m["files"]:
            if rel.endswith(".parquet"):
                f = path / rel
                if not f.is_file():
                    raise KvcoreError(f"{path}: shard {m['shard']} lists {rel}, which is missing; re-extract it")
                kv_files.append(f.resolve())
                shard_files.setdefault(m["shard"], []).append(f.resolve())
        seq_lengths.update(zip(m["seq_ids"], m["seq_lengths"]))
        seq_shard.update((s, m["shard"]) for s in m["seq_ids"])
    n_rows = sum(m.get("n_rows_per_layer", 0) * sum(rel.endswith(".parquet") for rel in m["files"])
                 for m in manifests)  # only the layers with Parquet files (extract.parquet_layers)
    preds = [path / "predictions.parquet"] if meta_path and (path / "predictions.parquet").is_file() else \
        [p for m in manifests if (p := path / "shards" / f"predictions-{m['shard']:05d}.parquet").is_file()]
    tokens = path / "tokens.parquet"

    def files(pattern: str) -> list[Path]:
        return [p.resolve() for p in sorted(path.glob(pattern)) if p.is_file() and not p.name.startswith(".")]

    return RunFiles(path=path.resolve(), model=str(meta.get("model") or path.parent.name),
                    dataset=str(meta.get("dataset") or path.name), meta=meta, finalized=meta_path is not None,
                    seq_lengths=dict(sorted(seq_lengths.items())), n_shards=len(manifests), n_kv_rows=n_rows,
                    kv_files=kv_files, seq_shard=seq_shard, shard_files=shard_files, tokens=tokens.resolve() if tokens.is_file() else None,
                    predictions=[p.resolve() for p in preds], stats=files("stats/*.parquet"),
                    compress=files("compress/*.json"), ppl=files("ppl/*.json"))


def load_runs(path: str | Path, model: str | None = None, dataset: str | None = None) -> list[RunFiles]:
    runs = [load_run(p) for p in find_runs(path)]
    chosen = [r for r in runs if (model is None or r.model == model) and (dataset is None or r.dataset == dataset)]
    if not chosen:
        have = ", ".join(r.name for r in runs)
        raise UsageError(f"no run matches model={model or '*'} dataset={dataset or '*'} under {path}; "
                         f"runs there: {have}")
    seen: dict[str, Path] = {}
    for r in chosen:  # the views tell runs apart by (model, dataset) only
        if r.name in seen:
            raise UsageError(f"two runs are both {r.name}: {seen[r.name]} and {r.path}; "
                             "open one of them, or pick with --model/--dataset")
        seen[r.name] = r.path
    return chosen
