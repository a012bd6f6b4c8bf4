"""Tiny extracted runs for the query tests, and a numpy reading of them that shares no code
with kvcore.query: vectors straight from the safetensors, tokens from pyarrow."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A key and a value are stored for every token in every layer.",
    "Paris is the capital of France. The passkey is 12345. The fox is quick.",
    "Language models read text as tokens; each token becomes a vector.",
    "fox and the fox",
]


@dataclass
class Reference:
    """One run as numpy: keys[layer] / values[layer] are [n_seq, n_kv, seq_len, dim]."""

    path: Path
    model: str
    keys: list[np.ndarray]
    values: list[np.ndarray]
    seq_ids: list[int]
    lengths: list[int]
    tokens: dict[tuple[int, int], str]  # (seq_id, pos) -> token text
    token_ids: dict[tuple[int, int], int]
    num_heads: int

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_kv(self) -> int:
        return self.keys[0].shape[1]

    def vectors(self, kind: str, layer: int, head: int | None = None):
        """[(seq_id, pos, head, vector)] over real (unpadded) positions."""
        arr = (self.keys if kind == "key" else self.values)[layer]
        heads = range(self.num_kv) if head is None else [head]
        return [(s, p, h, arr[i, h, p]) for i, (s, n) in enumerate(zip(self.seq_ids, self.lengths))
                for p in range(n) for h in heads]

    def vector(self, kind: str, layer: int, head: int, seq: int, pos: int) -> np.ndarray:
        arr = (self.keys if kind == "key" else self.values)[layer]
        return arr[self.seq_ids.index(seq), head, pos]


def build_run(root: Path, model_dir: Path) -> Path:
    """results/{model}/text under root, extracted by kvcore from the model at model_dir."""
    from kvcore.extract import Extractor

    run_dir = root / "results" / Path(model_dir).name / "text"
    Extractor(model_dir, device="cpu", dtype="float32").extract_to_run(TEXTS, run_dir, dataset_name="text")
    return run_dir


def load_reference(run_dir: Path) -> Reference:
    import pyarrow.parquet as pq
    from safetensors import safe_open
    from safetensors.numpy import load_file

    shards = sorted((run_dir / "kv").glob("part-*.safetensors"))
    keys, values, seq_ids, lengths = None, None, [], []
    for shard in shards:
        tensors = load_file(str(shard))
        with safe_open(str(shard), "np") as f:
            meta = f.metadata()
        n_layers = int(meta["num_layers"])
        k = [tensors[f"layer_{i}_key"].astype(np.float32) for i in range(n_layers)]
        v = [tensors[f"layer_{i}_value"].astype(np.float32) for i in range(n_layers)]
        keys = k if keys is None else [np.concatenate([a, b]) for a, b in zip(keys, k)]
        values = v if values is None else [np.concatenate([a, b]) for a, b in zip(values, v)]
        seq_ids += json.loads(meta["seq_ids"])
        lengths += json.loads(meta["seq_lengths"])
    tok = pq.read_table(run_dir / "tokens.parquet").to_pylist()
    return Reference(path=run_dir, model=meta["model"], keys=keys, values=values, seq_ids=seq_ids, lengths=lengths,
                     tokens={(t["seq_id"], t["pos"]): t["token"] for t in tok},
                     token_ids={(t["seq_id"], t["pos"]): t["token_id"] for t in tok},
                     num_heads=int(meta["num_heads"]))
