"""The threaded extraction pipeline writes exactly what the simple path writes, and fails cleanly."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kvcore import storage
from kvcore.extract import Extractor, extract_sequences, run_meta
from kvcore.model import load_model


class SimpleWriter:
    """The reference: collect a shard, then one table per layer and one save_file, in the main thread."""

    def __init__(self, run_dir, shard, meta):
        self.run_dir, self.shard, self.meta = run_dir, shard, meta
        self.seq_ids, self.token_ids, self.tensors = [], [], {}

    def add(self, seq_ids, token_ids, layer_keys, layer_values, predictions):
        self.seq_ids += seq_ids
        self.token_ids += token_ids
        for i, (k, v) in enumerate(zip(layer_keys, layer_values)):
            self.tensors.setdefault(f"layer_{i}_key", []).append(k.cpu())
            self.tensors.setdefault(f"layer_{i}_value", []).append(v.cpu())

    def close(self):
        from safetensors.torch import save_file

        lengths = [len(t) for t in self.token_ids]
        width = max(lengths)
        tensors = {k: torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2])) for t in v]).contiguous()
                   for k, v in self.tensors.items()}
        name = storage.shard_name(self.shard)
        for layer in range(self.meta["num_layers"]):
            table = storage.layer_table(tensors[f"layer_{layer}_key"].float().numpy(),
                                        tensors[f"layer_{layer}_value"].float().numpy(), self.seq_ids, self.token_ids)
            (self.run_dir / f"kv/layer={layer}").mkdir(parents=True, exist_ok=True)
            storage.write_parquet(table, self.run_dir / f"kv/layer={layer}/{name}.parquet")
        save_file(tensors, str(self.run_dir / f"kv/{name}.safetensors"),
                  metadata=storage.safetensors_metadata(self.meta, self.seq_ids, lengths))


def split_safetensors(path):
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def shard_sequences(shard: int, n: int = 5):
    """Shard 0: equal lengths (the vectorised path); the others: ragged prompts (the per-sequence path)."""
    g = torch.Generator().manual_seed(shard)
    lengths = [11] * n if shard == 0 else [11 - (i % 4) * 2 for i in range(n)]
    return {shard * n + i: torch.randint(5, 90, (length,), generator=g).tolist() for i, length in enumerate(lengths)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_threaded_writer_equals_the_simple_path(tiny_models, tmp_path, monkeypatch, arch):
    monkeypatch.setattr(storage, "ROW_GROUP_ROWS", 7)  # row groups that straddle batches
    model, tokenizer, device = load_model(tiny_models[arch], "cpu", "float32")
    meta = run_meta(model, arch, "random", 11)
    for shard in range(3):
        seqs = shard_sequences(shard)
        fast = storage.ShardWriter(tmp_path / "fast", shard, meta, workers=3, max_pending=1)
        extract_sequences(model, tokenizer, seqs, fast, 2, 3, device)  # batch 2 does not divide 5
        manifest = fast.close()
        assert manifest["n_tokens"] == sum(len(s) for s in seqs.values())
        ref = SimpleWriter(tmp_path / "ref", shard, meta)
        extract_sequences(model, tokenizer, seqs, ref, 2, 3, device)
        ref.close()
        name = storage.shard_name(shard)
        # safetensors writes its metadata map in a random order (a Rust HashMap, even for two calls of
        # save_file in one process), so: the same header as JSON, then byte-identical tensor data
        got, want = (split_safetensors(tmp_path / f"{r}/kv/{name}.safetensors") for r in ("fast", "ref"))
        assert got[0] == want[0] and got[1] == want[1]
        for layer in range(meta["num_layers"]):
            got, want = (pq.ParquetFile(tmp_path / f"{r}/kv/layer={layer}/{name}.parquet") for r in ("fast", "ref"))
            assert got.read().equals(want.read())
            assert got.schema_arrow.equals(storage.kv_schema(meta["head_dim"]))
            sizes = [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in (got.metadata, want.metadata)]
            assert sizes[0] == sizes[1] and len(sizes[0]) > 2
    assert not (tmp_path / "fast/.staging").exists()


def test_uniform_layer_table_equals_the_per_sequence_rows():
    import numpy as np

    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 3, 4, 5, 8)).astype(np.float32)
    tokens = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    rows = storage.layer_table(k, v, [3, 4, 9], tokens).to_pydict()
    want = [(s, p, tokens[i][p], h, k[i, h, p].tolist()) for i, s in enumerate([3, 4, 9]) for p in range(5)
            for h in range(4)]
    assert list(zip(rows["seq_id"], rows["pos"], rows["token_id"], rows["head"], rows["key"])) == want
    np.testing.assert_array_equal(rows["value_norm"], np.linalg.norm(v.transpose(0, 2, 1, 3), axis=-1).reshape(-1))


TEXTS = ["The quick brown fox jumps over the lazy dog."] * 7


@pytest.mark.parametrize("fail_on", [1, 6])  # 4 batches x 2 layers: the first and a late one
def test_a_failing_writer_fails_the_job_and_leaves_nothing_complete(tiny_models, tmp_path, monkeypatch, fail_on):
    calls = []
    real = storage.layer_table

    def broken(*args):
        calls.append(1)
        if len(calls) == fail_on:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(storage, "layer_table", broken)
    ex = Extractor(tiny_models["llama"], device="cpu", dtype="float32")
    outcome = {}

    def job():
        try:
            ex.extract_to_run(TEXTS, tmp_path / "run", top_k=2, batch_size=2)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    t = threading.Thread(target=job, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the extraction hung after a writer failed"
    assert isinstance(outcome.get("error"), RuntimeError) and "disk on fire" in str(outcome["error"])
    run = tmp_path / "run"
    assert not list(run.glob("shards/kv-*.json")) and not (run / "metadata.json").exists()
    assert not list(run.glob("kv/**/*.parquet")) and not list(run.glob("kv/*.safetensors"))
    assert not (run / ".staging").exists()
    assert not [th for th in threading.enumerate() if th.name.startswith("kvcore-")]


def test_writer_keeps_at_most_max_pending_batches_in_flight(tmp_path):
    meta = {"model": "m", "dataset": "d", "num_layers": 2, "num_kv_heads": 2, "num_heads": 2, "head_dim": 4,
            "seq_len": 3, "dtype": "float32"}
    w = storage.ShardWriter(tmp_path, 0, meta, workers=2, max_pending=2)
    for b in range(5):
        keys = [torch.randn(1, 2, 3, 4) for _ in range(2)]
        w.add([b], [[1, 2, 3]], keys, keys, pa.table({"seq_id": pa.array([b], pa.int32())}))
        assert len(w._inflight) <= 2
    assert w.close()["n_rows_per_layer"] == 5 * 3 * 2
