"""The threaded extraction pipeline writes exactly what the simple path writes, and fails cleanly."""

from __future__ import annotations

import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kvcore import storage, tensorfile
from kvcore.errors import KvcoreError, UsageError
from kvcore.extract import Extractor, extract_sequences, run_meta
from kvcore.model import load_model
from kvcore.tensorfile import canonicalize_header


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
            (self.run_dir / storage.part_file(layer, self.shard)).parent.mkdir(parents=True, exist_ok=True)
            storage.write_parquet(table, self.run_dir / storage.part_file(layer, self.shard))
        path = self.run_dir / f"kv/{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=storage.safetensors_metadata(self.meta, self.seq_ids, lengths))
        canonicalize_header(path)  # what kvcore always did after save_file: a deterministic header


def split_safetensors(path):
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def shard_sequences(shard: int, n: int = 5):
    """Shard 0: equal lengths (the vectorised path); the others: ragged prompts (the per-sequence path).
    Shard 2's third batch is narrower than the first, whose host slot it reuses (stale values must go)."""
    g = torch.Generator().manual_seed(shard)
    lengths = [[11] * n, [11 - (i % 4) * 2 for i in range(n)], [11, 4, 6, 3, 2]][shard]
    return {shard * n + i: torch.randint(5, 90, (length,), generator=g).tolist() for i, length in enumerate(lengths)}


@pytest.mark.parametrize("arch,streamed", [("gpt2", True), ("llama", True), ("llama", False)])
def test_threaded_writer_equals_the_simple_path(tiny_models, tmp_path, monkeypatch, arch, streamed):
    """streamed: the shard's sequences known up front, safetensors rows written as batches come
    (what extraction does); buffered: tensors held until close (callers that know no plan)."""
    monkeypatch.setattr(storage, "ROW_GROUP_ROWS", 7)  # row groups that straddle batches
    model, tokenizer, device = load_model(tiny_models[arch], "cpu", "float32")
    meta = run_meta(model, arch, "random", 11)
    for shard in range(3):
        seqs = shard_sequences(shard)
        plan = {s: len(t) for s, t in seqs.items()} if streamed else None
        fast = storage.ShardWriter(tmp_path / "fast", shard, meta, workers=3, max_pending=1, seq_lengths=plan)
        extract_sequences(model, tokenizer, seqs, fast, 2, 3, device)  # batch 2 does not divide 5
        assert not fast.tensors if streamed else fast.tensors  # streamed: nothing held for close()
        manifest = fast.close()
        assert manifest["n_tokens"] == sum(len(s) for s in seqs.values())
        ref = SimpleWriter(tmp_path / "ref", shard, meta)
        extract_sequences(model, tokenizer, seqs, ref, 2, 3, device)
        ref.close()
        name = storage.shard_name(shard)
        got, want = ((tmp_path / f"{r}/kv/{name}.safetensors").read_bytes() for r in ("fast", "ref"))
        assert got == want
        header, data = split_safetensors(tmp_path / f"fast/kv/{name}.safetensors")
        assert len(header) == 1 + 2 * meta["num_layers"] and data.count(0) < len(data) // 2  # real, not zeros
        for layer in range(meta["num_layers"]):
            got, want = (pq.ParquetFile(tmp_path / r / storage.part_file(layer, shard)) for r in ("fast", "ref"))
            assert got.read().equals(want.read())
            assert got.schema_arrow.equals(storage.kv_schema(meta["head_dim"]))
            sizes = [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in (got.metadata, want.metadata)]
            assert sizes[0] == sizes[1] and len(sizes[0]) > 2
            group = got.metadata.row_group(0)  # min/max where filters use them, not on the vectors
            stats = {group.column(i).path_in_schema: group.column(i).is_stats_set for i in range(group.num_columns)}
            assert stats == {"seq_id": True, "pos": True, "token_id": True, "head": True, "key.list.element": False,
                             "value.list.element": False, "key_norm": True, "value_norm": True}
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
    want_norms = np.linalg.norm(v.astype(np.float64).transpose(0, 2, 1, 3), axis=-1).reshape(-1)
    np.testing.assert_allclose(rows["value_norm"], want_norms, rtol=1e-6)


TEXTS = ["The quick brown fox jumps over the lazy dog."] * 7


# 4 batches x 2 layers: Parquet encoding fails on the first or a late call; a safetensors row write
# (4 batches x 2 layers x key/value) fails on the first or the last
@pytest.mark.parametrize("site,fail_on", [("parquet", 1), ("parquet", 6), ("safetensors", 1), ("safetensors", 16)])
def test_a_failing_writer_fails_the_job_and_leaves_nothing_complete(tiny_models, tmp_path, monkeypatch, site,
                                                                     fail_on):
    calls = []
    owner, attr = (storage, "layer_table") if site == "parquet" else (tensorfile.TensorFileWriter, "write")
    real = getattr(owner, attr)

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, broken)
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
    assert len(calls) >= fail_on
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


def test_streamed_writer_holds_a_bounded_number_of_batches(tmp_path):
    """Host memory does not grow with the shard: max_pending + 1 reused slots, nothing held."""
    meta = {"model": "m", "dataset": "d", "num_layers": 3, "num_kv_heads": 2, "num_heads": 2, "head_dim": 4,
            "seq_len": 3, "dtype": "float32"}
    n = 9
    w = storage.ShardWriter(tmp_path, 0, meta, workers=2, max_pending=2, seq_lengths={s: 3 for s in range(n)})
    keys = [[torch.randn(1, 2, 3, 4) for _ in range(3)] for _ in range(n)]
    for b in range(n):
        w.add([b], [[1, 2, 3]], keys[b], [k * 2 for k in keys[b]], pa.table({"seq_id": pa.array([b], pa.int32())}))
        assert len(w._inflight) <= 2 and len(w._slots) <= 3 and not w.tensors
    assert w.close()["n_rows_per_layer"] == n * 3 * 2
    from safetensors.torch import load_file

    got = load_file(tmp_path / "kv/part-00000.safetensors")
    for layer in range(3):
        want = torch.cat([keys[b][layer] for b in range(n)])
        assert torch.equal(got[f"layer_{layer}_key"], want) and torch.equal(got[f"layer_{layer}_value"], want * 2)


def test_streamed_writer_refuses_batches_off_its_plan(tmp_path):
    meta = {"model": "m", "dataset": "d", "num_layers": 1, "num_kv_heads": 1, "num_heads": 1, "head_dim": 2,
            "seq_len": 2, "dtype": "float32"}
    w = storage.ShardWriter(tmp_path, 0, meta, seq_lengths={0: 2, 1: 2})
    k = [torch.randn(1, 1, 2, 2)]
    with pytest.raises(KvcoreError, match="does not follow the planned sequences"):
        w.add([1], [[1, 2]], k, k, pa.table({"seq_id": pa.array([1], pa.int32())}))
    assert not (tmp_path / ".staging").exists()
    w = storage.ShardWriter(tmp_path, 0, meta, seq_lengths={0: 2, 1: 2})
    w.add([0], [[1, 2]], k, k, pa.table({"seq_id": pa.array([0], pa.int32())}))
    with pytest.raises(KvcoreError, match="1 of 2 planned sequences"):
        w.close()
    assert not list(tmp_path.rglob("*.safetensors")) and not (tmp_path / "shards").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_safetensors_bytes_equal_save_tensors(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    tensors = {f"layer_{i}_{kind}": torch.randn(3, 2, 5, 4, generator=g).to(dtype) for i in range(11)
               for kind in ("key", "value")}
    meta = {"model": "m\u00e9\t\"q", "seq_ids": "[0, 1, 2]", "a": "x" * 13}
    tensorfile.save_tensors(tensors, tmp_path / "a.safetensors", meta)
    w = tensorfile.TensorFileWriter(tmp_path / "b.safetensors",
                                    {k: (tensorfile.dtype_name(dtype), tuple(t.shape)) for k, t in tensors.items()},
                                    meta)
    for name in reversed(list(tensors)):  # any order of names and rows
        w.write(name, 2, tensors[name][2:])
        w.write(name, 0, tensors[name][:2])
    w.close()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    w = tensorfile.TensorFileWriter(tmp_path / "c.safetensors", {"t": ("float32", (2, 3))})
    w.write("t", 0, torch.ones(1, 3))
    with pytest.raises(KvcoreError, match="12 of 24 tensor bytes written"):
        w.close()


# --- what goes to Parquet ------------------------------------------------------------------------------

OPTION_TEXTS = ["The quick brown fox jumps over the lazy dog.", "A key and a value.", "Compression keeps fewer bits."]


@pytest.fixture(scope="module")
def default_run(tiny_models, tmp_path_factory):
    run = tmp_path_factory.mktemp("options") / "default"
    Extractor(tiny_models["llama"], device="cpu", dtype="float32").extract_to_run(OPTION_TEXTS, run, batch_size=2)
    return run


@pytest.mark.parametrize("options", [
    dict(parquet_layers=[1], parquet_heads=[1], parts="keys", storage_dtype="float16"),
    dict(parts="values"),
    dict(parquet_layers=[]),  # no Parquet at all: safetensors only (the benchmark's mode 2)
], ids=["keys-layer1-head1-fp16", "values", "safetensors-only"])
def test_parquet_options_choose_rows_and_columns(tiny_models, default_run, tmp_path, options):
    import duckdb
    import numpy as np
    import pandas as pd
    from safetensors.torch import load_file

    run = tmp_path / "run"
    meta = Extractor(tiny_models["llama"], device="cpu", dtype="float32").extract_to_run(
        OPTION_TEXTS, run, batch_size=2, **options)
    # the safetensors hold everything, whatever Parquet holds
    st = "kv/part-00000.safetensors"
    assert (run / st).read_bytes() == (default_run / st).read_bytes()
    assert meta["parquet"]["parts"] == options.get("parts", "both")
    layers = options.get("parquet_layers", [0, 1])
    assert sorted(p.parent.name for p in run.glob("kv/layer=*/*.parquet")) == [f"layer={i}" for i in layers]
    tensors = load_file(run / st)
    lengths = json.loads((run / "shards/kv-00000.json").read_text())["seq_lengths"]
    heads = options.get("parquet_heads", [0, 1])
    vec_type = pa.float16() if options.get("storage_dtype") == "float16" else pa.float32()
    for layer in layers:
        table = pq.read_table(run / f"kv/layer={layer}/data.parquet")
        assert table.schema.field("key").type.value_type == vec_type
        assert table.num_rows == sum(lengths) * len(heads)
        rows = table.to_pydict()
        assert set(rows["head"]) == set(heads)
        for kind in ("key", "value"):
            kept = options.get("parts", "both") in ("both", kind + "s")
            assert (table.column(kind).null_count == 0) if kept else (table.column(kind).null_count == table.num_rows)
            assert (table.column(kind + "_norm").null_count == 0) == kept
            if not kept:
                continue
            full = tensors[f"layer_{layer}_{kind}"]
            want = np.concatenate([full[s, heads, :n].permute(1, 0, 2).reshape(-1, full.shape[-1]).numpy()
                                   for s, n in enumerate(lengths)])
            got = np.asarray(rows[kind], dtype=np.float32)
            np.testing.assert_array_equal(got, want.astype(vec_type.to_pandas_dtype()).astype(np.float32))
            np.testing.assert_allclose(rows[kind + "_norm"], np.linalg.norm(want, axis=1), rtol=1e-6)
    if not layers:
        return
    # queryable: plain duckdb over the hive layout, and kvcore's own views
    layer, head = layers[-1], heads[-1]
    (hit,) = duckdb.sql(f"SELECT key, value, key_norm FROM read_parquet('{run}/kv/*/*.parquet', "
                        f"hive_partitioning=true) WHERE layer={layer} AND head={head} AND seq_id=1 AND pos=2"
                        ).fetchall()
    import kvcore

    got = kvcore.open_run(run).coordinate(layer, head, 2, seq=1).iloc[0]
    kept, dropped = ("value", "key") if options.get("parts") == "values" else ("key", "value")
    want = tensors[f"layer_{layer}_{kept}"][1, head, 2].numpy()
    np.testing.assert_allclose(hit[0 if kept == "key" else 1], want, rtol=1e-3, atol=1e-3)
    assert hit[1 if kept == "key" else 0] is None
    np.testing.assert_allclose(np.asarray(got[kept], np.float32), want, rtol=1e-3, atol=1e-3)
    assert got[f"{kept}_norm"] == pytest.approx(float(np.linalg.norm(want)), rel=1e-6)
    assert pd.isna(got[dropped]) and pd.isna(got[f"{dropped}_norm"])
    # what the extraction left out of Parquet is one clear error, not an empty result; row counts add up
    opened = kvcore.open_run(run)
    assert opened.sql("SELECT n_kv_rows FROM runs").iloc[0, 0] == sum(lengths) * len(heads) * len(layers)
    for left_out, fragment in (([i for i in (0, 1) if i not in layers], "layer {} has no Parquet rows"),
                               ([i for i in (0, 1) if i not in heads], "KV head {} has no Parquet rows")):
        for i in left_out:
            args = (i, head) if "layer" in fragment else (layer, i)
            with pytest.raises(UsageError, match=fragment.format(i)):
                opened.coordinate(*args, 2, seq=1)


def test_bad_parquet_options_are_one_line_before_any_output(tiny_models, tmp_path, capsys):
    from kvcore.cli import main

    with pytest.raises(UsageError, match="parts must be one of both, keys, values"):
        storage.ParquetSelection.of(parts="kv")
    ex = Extractor(tiny_models["llama"], device="cpu", dtype="float32")
    with pytest.raises(UsageError, match=r"parquet_layers: 5 out of range; the model has 2 layers \(valid 0..1\)"):
        ex.extract_to_run(OPTION_TEXTS, tmp_path / "run", parquet_layers=[0, 5])
    assert not (tmp_path / "run").exists()
    model = str(tiny_models["llama"])
    for args, fragment in ((["--parts", "kv"], "invalid choice: 'kv'"),
                           (["--parquet-layers", "a,1"], "comma-separated non-negative integers"),
                           (["--storage-dtype", "int8"], "invalid choice: 'int8'"),
                           (["--parquet-heads", "7"], "parquet_heads: 7 out of range; the model has 2 KV heads")):
        assert main(["extract", "--model", model, "--prompt", "x", "--out", str(tmp_path / "o"), "--device", "cpu",
                     *args]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # not progress bars
        assert len(lines) == 1 and lines[0].startswith("kvcore: error:") and fragment in lines[0], err
        assert not (tmp_path / "o").exists()


def test_bad_parquet_options_stop_the_config_check():
    import yaml

    from conftest import REPO
    from kvcore.config import explain

    config = yaml.safe_load((REPO / "configs/tiny-test.yaml").read_text())
    assert explain(config) is None
    for key, value, fragment in (("parts", "kv", "config: extract.parts must be one of both, keys, values"),
                                 ("storage_dtype", "int8", "config: extract.storage_dtype must be one of float32"),
                                 ("parquet_layers", [0, -1], "config: extract.parquet_layers.1: -1 is less than"),
                                 ("parquet_heads", [], "config: extract.parquet_heads"),
                                 ("parquet_layers", [1, 1], "config: extract.parquet_layers")):
        bad = {**config, "extract": {**config["extract"], key: value}}
        assert (explain(bad) or "").startswith(fragment), (key, explain(bad))
    ok = {**config, "extract": {**config["extract"], "parquet_layers": [0], "parts": "keys", "storage_dtype": "float16"}}
    assert explain(ok) is None


class Tee:
    """Hands the same batches (the same device tensors) to several writers."""

    def __init__(self, *writers):
        self.writers = writers

    def add(self, *args):
        for w in self.writers:
            w.add(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_streams_write_what_the_simple_path_writes(tiny_models, tmp_path, dtype):
    """Pinned slots filled on a second stream, read by the writer threads after the copy's event:
    the same bytes as .cpu() in the main thread, from the very same cache tensors."""
    model, tokenizer, device = load_model(tiny_models["llama"], "cuda", dtype)
    meta = run_meta(model, "llama", "random", 11)
    for shard in range(3):
        seqs = shard_sequences(shard)
        fast = storage.ShardWriter(tmp_path / "fast", shard, meta, workers=3, max_pending=1,
                                   seq_lengths={s: len(t) for s, t in seqs.items()})
        ref = SimpleWriter(tmp_path / "ref", shard, meta)
        extract_sequences(model, tokenizer, seqs, Tee(fast, ref), 2, 3, device)
        assert fast._copy_stream is not None and all(s.keys[0].is_pinned() for s in fast._slots)
        fast.close()
        ref.close()
        name = storage.shard_name(shard)
        got, want = ((tmp_path / f"{r}/kv/{name}.safetensors").read_bytes() for r in ("fast", "ref"))
        assert got == want
        for layer in range(meta["num_layers"]):
            got, want = (pq.read_table(tmp_path / r / storage.part_file(layer, shard)) for r in ("fast", "ref"))
            assert got.equals(want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lengths,heads", [([5, 5, 5], None), ([5, 2, 4], [1])])
def test_writer_rows_widen_as_torch_does(dtype, lengths, heads):
    """The writers reorder and widen host tensors with numpy (no torch thread pool): bit for bit
    what .float() and a transpose give, norms as float64 computes them."""
    import numpy as np

    x = (torch.randn(3, 2, 9, 8) * 100).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([float("inf"), -0.0, 1e-30]).to(dtype)
    part = x[:, :, :5]  # a slice of a wider slot, as the writer passes it
    table = storage.layer_table(part, part, [0, 1, 2], [list(range(n)) for n in lengths], heads=heads)
    got = np.asarray(table.column("key").combine_chunks().values).reshape(-1, 8)
    picked = heads or [0, 1]
    want = torch.cat([part[i, picked, :n].transpose(0, 1).reshape(-1, 8) for i, n in enumerate(lengths)]).float()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32))
    finite = np.isfinite(got).all(axis=1)
    norms = np.asarray(table.column("key_norm"))
    np.testing.assert_allclose(norms[finite], np.linalg.norm(got[finite].astype(np.float64), axis=1), rtol=1e-6)
    assert np.isinf(norms[~finite]).all()


def test_one_torch_thread_only_while_a_gpu_extraction_runs():
    """On a GPU the writers get the cores; the caller's torch threads come back, also after an error."""
    from kvcore.extract import host_threads_for_writers

    before = torch.get_num_threads()
    with host_threads_for_writers("cpu"):
        assert torch.get_num_threads() == before  # a CPU forward needs its threads
    with pytest.raises(RuntimeError, match="boom"), host_threads_for_writers("cuda:0"):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
