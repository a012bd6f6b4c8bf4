"""Find the runs under a path and the files of each that a query may read.

A run directory is what `kvcore extract` writes (kvcore/storage.py). Only shards whose
manifest (`shards/kv-*.json`, written last) exists are read, so a query during an
extraction sees complete shards only, never a half-written Parquet file; once metadata.json
exists (written after the layer files), the compacted layer files it lists are read instead,
and a norm search reads the run's norm files (`norm_files`; a run finalized before them is
searched in its layer files).
A run in a bucket (s3://BUCKET/PREFIX) is read by the same code through a UPath
(kvcore.query.remote).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from kvcore.errors import KvcoreError, KvcoreWarning, UsageError, one_line
from kvcore.query.remote import as_path, is_remote, reading

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
    tensor_files: dict[int, Path] = field(default_factory=dict)  # shard -> the safetensors its manifest lists
    tokens: Path | None = None
    predictions: list[Path] = field(default_factory=list)
    stats: list[Path] = field(default_factory=list)
    compress: list[Path] = field(default_factory=list)
    ppl: list[Path] = field(default_factory=list)
    result_keys: dict[Path, set[str]] = field(default_factory=dict)  # compress/ and ppl/ JSON -> its keys
    norm_files: dict[str, Path] = field(default_factory=dict)  # "key"/"value" -> rows sorted by that norm

    @property
    def all_files(self) -> list[Path]:
        extra = [self.tokens] if self.tokens else []
        return self.kv_files + list(self.norm_files.values()) + extra + self.predictions + self.stats + \
            self.compress + self.ppl

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
    root = as_path(path)
    if not root.exists():
        if is_remote(root):
            raise UsageError(f"{root}: no such bucket, or no object under this prefix (give the prefix of a run, "
                             "s3://BUCKET/PREFIX/results/MODEL/DATASET, or one above it)")
        raise UsageError(f"{root}: no such directory (give a run directory such as results/MODEL/DATASET, "
                         "or results/ for every run)")
    if not root.is_dir():
        raise UsageError(f"{root} is a file; give a run directory (results/MODEL/DATASET) or results/")
    if is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in root.walk() if is_remote(root) else os.walk(root):
        here = dirpath if is_remote(root) else Path(dirpath)
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


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from a run file; anything else (unreadable, a list, ...) is one error line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KvcoreError(f"{path}: unreadable {what} ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise KvcoreError(f"{path}: the {what} is a JSON {type(data).__name__}, expected an object; "
                          "re-extract this run")
    return data


def confined(run_dir: Path, entry: str | Path) -> Path:
    """`run_dir / entry` if it stays inside the run, else an error naming it.

    The sandbox lets DuckDB read exactly the files listed, so a listed path that leaves the
    run (`..`, an absolute path, a link to elsewhere) would open files outside it.
    """
    root, entry = run_dir.resolve(), str(entry)  # str: a bucket's relative paths are UPaths
    path = root / entry  # as it is inside the run: a link keeps its own name (ppl/{method}.json)
    if Path(entry).is_absolute() or ".." in Path(entry).parts:
        raise KvcoreError(f"{run_dir}: {entry} leaves the run directory; refusing to read it")
    real = path.resolve()
    if not real.is_relative_to(root):
        raise KvcoreError(f"{path} is a link to {real}, outside the run directory {root}; refusing to read it")
    return path


def _manifest_files(manifest_path: Path, m: dict) -> list[str]:
    fields = {"shard": int, "seq_ids": list, "seq_lengths": list, "files": list}
    bad = [k for k, kind in fields.items() if not isinstance(m.get(k), kind) or isinstance(m.get(k), bool)]
    if bad or len(m["seq_ids"]) != len(m["seq_lengths"]) or not all(isinstance(f, str) for f in m["files"]):
        raise KvcoreError(f"{manifest_path}: not a shard manifest (needs shard, seq_ids, seq_lengths and files "
                          f"of the right types{'; bad: ' + ', '.join(bad) if bad else ''}); re-extract this shard")
    return m["files"]


def _listed_file(path: Path, rel: str, lister: str) -> Path:
    f = confined(path, rel)
    if rel.endswith(".parquet") and not f.is_file():
        raise KvcoreError(f"{path}: {lister} lists {rel}, which is missing; re-extract it")
    return f


def _string_list(where: Path, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(f, str) and f.endswith(".parquet") for f in value):
        raise KvcoreError(f"{where}: 'files' must be a list of Parquet paths; re-extract this run")
    return value


def _norm_files(path: Path, meta_path: Path, value) -> dict[str, Path]:
    """metadata.json's `norm_files` ({"key": "norms/key.parquet", "value": ...}), each file there:
    a search would otherwise miss rows, so a wrong entry is an error, not a guess."""
    if value is None:  # finalized before the norm files were written: searches read the layer files
        return {}
    if not isinstance(value, dict) or not all(k in ("key", "value") and isinstance(v, str) and v.endswith(".parquet")
                                              for k, v in value.items()):
        raise KvcoreError(f"{meta_path}: 'norm_files' must map key and value to Parquet paths; re-extract this run, "
                          "or delete the key to search the layer files")
    return {kind: _listed_file(path, rel, "metadata.json") for kind, rel in value.items()}


def _check_complete(path: Path, meta: dict, manifests: list[dict]) -> None:
    """A finalized run must still have every shard metadata.json counted."""
    listed = meta.get("shards")
    have = {m["shard"] for m in manifests}
    missing = sorted(set(listed) - have) if isinstance(listed, list) else []
    n_seq = sum(len(m["seq_ids"]) for m in manifests)
    if missing or (isinstance(meta.get("n_sequences"), int) and meta["n_sequences"] != n_seq):
        names = ", ".join(f"shards/kv-{s:05d}.json" for s in missing if isinstance(s, int)) or "unknown"
        raise KvcoreError(f"{path}: metadata.json counts {meta.get('n_sequences')} sequences in "
                          f"{meta.get('n_shards')} shards, but only {n_seq} sequences in {len(manifests)} shard "
                          f"manifests remain (missing: {names}); re-extract this run")


def _result_files(path: Path, pattern: str, what: str, keys: dict[Path, set[str]]) -> list[Path]:
    """The JSON results (ppl/, compress/) that parse, each one's keys added to `keys` (the view
    needs them); one broken file must not hide the rest."""
    good = []
    for p in sorted(path.glob(pattern)):
        if not p.is_file() or p.name.startswith("."):
            continue
        inside = confined(path, p.relative_to(path))
        try:
            data = json.loads(inside.read_text())
        except (OSError, ValueError) as exc:
            data, why = None, one_line(exc)
        else:
            why = "not a JSON object"
        if isinstance(data, dict):
            good.append(inside)
            keys[inside] = set(data)
        else:
            warnings.warn(f"{p}: unreadable {what} left out of the views ({why})", KvcoreWarning, stacklevel=2)
    return good


def load_run(path: Path) -> RunFiles:
    """The complete part of one run directory."""
    manifest_paths = sorted((path / "shards").glob("kv-*.json"))
    manifests = [_read_json(confined(path, p.relative_to(path)), "shard manifest") for p in manifest_paths]
    meta_path = next((p for p in (path / "metadata.json", path / "kv" / "metadata.json") if p.is_file()), None)
    meta = _read_json(confined(path, meta_path.relative_to(path)), "metadata.json") if meta_path else {}
    if not manifests:
        raise KvcoreError(f"{path}: no complete shard yet (shards/kv-*.json missing); wait for the extraction "
                          "to finish a shard")
    files_of = [_manifest_files(mp, m) for mp, m in zip(manifest_paths, manifests)]
    if meta_path:
        _check_complete(path, meta, manifests)
    first = manifests[0]
    meta = {**{k: first.get(k) for k in ("model", "dataset", "parquet", *SHAPE_KEYS)}, **meta}
    missing = [k for k in ("num_layers", "num_kv_heads", "head_dim") if not isinstance(meta.get(k), int)]
    if missing:
        raise KvcoreError(f"{path}: shard manifest lacks {', '.join(missing)}; re-extract this run")
    kv_files, seq_lengths, seq_shard, shard_files, tensor_files, norm_files = [], {}, {}, {}, {}, {}
    # Finalized: metadata.json lists the compacted layer files, one per layer for every shard
    # (the shards' parts are gone); before that each complete shard's manifest lists its parts.
    layer_files = meta.get("files") if meta_path else None
    if layer_files is not None:
        kv_files = [_listed_file(path, rel, "metadata.json") for rel in _string_list(meta_path, layer_files)]
        norm_files = _norm_files(path, meta_path, meta.get("norm_files"))
    for m, rels in zip(manifests, files_of):
        for rel in rels:
            confined(path, rel)  # a listed path that leaves the run is refused, read or not
        if layer_files is None:
            shard_files[m["shard"]] = [_listed_file(path, rel, f"shard {m['shard']}") for rel in rels
                                       if rel.endswith(".parquet")]
            kv_files += shard_files[m["shard"]]
        else:
            shard_files[m["shard"]] = kv_files
        tensor_files.update((m["shard"], confined(path, rel)) for rel in rels if rel.endswith(".safetensors"))
        seq_lengths.update(zip(m["seq_ids"], m["seq_lengths"]))
        seq_shard.update((s, m["shard"]) for s in m["seq_ids"])
    n_rows = sum(m.get("n_rows_per_layer", 0) * sum(rel.endswith(".parquet") for rel in rels)
                 for m, rels in zip(manifests, files_of))  # only the layers with Parquet files (extract.parquet_layers)
    preds = [path / "predictions.parquet"] if meta_path and (path / "predictions.parquet").is_file() else \
        [p for m in manifests if (p := path / "shards" / f"predictions-{m['shard']:05d}.parquet").is_file()]
    tokens = path / "tokens.parquet"

    def files(pattern: str) -> list[Path]:
        return [confined(path, p.relative_to(path)) for p in sorted(path.glob(pattern))
                if p.is_file() and not p.name.startswith(".")]

    result_keys: dict[Path, set[str]] = {}
    compress = _result_files(path, "compress/*.json", "compress result", result_keys)
    ppl = _result_files(path, "ppl/*.json", "perplexity result", result_keys)
    return RunFiles(path=path.resolve(), model=str(meta.get("model") or path.parent.name),
                    dataset=str(meta.get("dataset") or path.name), meta=meta, finalized=meta_path is not None,
                    seq_lengths=dict(sorted(seq_lengths.items())), n_shards=len(manifests), n_kv_rows=n_rows,
                    kv_files=kv_files, seq_shard=seq_shard, shard_files=shard_files, tensor_files=tensor_files,
                    tokens=confined(path, "tokens.parquet") if tokens.is_file() else None,
                    predictions=[confined(path, p.relative_to(path)) for p in preds],
                    stats=files("stats/*.parquet"), compress=compress, ppl=ppl, result_keys=result_keys,
                    norm_files=norm_files)


def load_runs(path: str | Path, model: str | None = None, dataset: str | None = None) -> list[RunFiles]:
    with reading(path):
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
