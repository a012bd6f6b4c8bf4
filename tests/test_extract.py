"""Extraction writes exactly the model's own cache, in both storage formats."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from kvcore.extract import Extractor, forward_cache
from kvcore.storage import kv_schema

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A key and a value are stored for every token.",
         "Compression keeps fewer bits per number, fewer numbers, or fewer tokens in the cache."]


@pytest.fixture
def run(tiny_model_dir, tmp_path):
    ex = Extractor(tiny_model_dir, device="cpu", dtype="float32")
    meta = ex.extract_to_run(TEXTS, tmp_path / "run", top_k=4, batch_size=2)
    return ex, meta, tmp_path / "run"


def own_cache(ex, text):
    ids = ex.tokenizer(text, add_special_tokens=False)["input_ids"]
    _, keys, values = forward_cache(ex.model, torch.tensor([ids]))
    return ids, keys, values


def test_parquet_rows_equal_the_models_cache(run):
    ex, meta, run_dir = run
    rng = np.random.default_rng(0)
    for seq_id, text in enumerate(TEXTS):
        ids, keys, values = own_cache(ex, text)
        for _ in range(5):
            layer = int(rng.integers(meta["num_layers"]))
            head = int(rng.integers(meta["num_kv_heads"]))
            pos = int(rng.integers(len(ids)))
            table = pq.read_table(run_dir / f"kv/layer={layer}", filters=[("seq_id", "=", seq_id),
                                                                           ("pos", "=", pos), ("head", "=", head)])
            assert table.num_rows == 1
            row = table.to_pylist()[0]
            want_k = keys[layer][0, head, pos].numpy()
            want_v = values[layer][0, head, pos].numpy()
            np.testing.assert_allclose(row["key"], want_k, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(row["value"], want_v, rtol=1e-5, atol=1e-6)
            assert row["token_id"] == ids[pos]
            assert row["key_norm"] == pytest.approx(float(np.linalg.norm(want_k)), rel=1e-5)
            assert row["value_norm"] == pytest.approx(float(np.linalg.norm(want_v)), rel=1e-5)


def test_safetensors_equal_parquet_and_rows_are_sorted(run):
    ex, meta, run_dir = run
    with safe_open(run_dir / "kv/part-00000.safetensors", "pt") as f:
        info = f.metadata()
        lengths = json.loads(info["seq_lengths"])
        assert json.loads(info["seq_ids"]) == [0, 1, 2]
        assert int(info["num_kv_heads"]) == meta["num_kv_heads"]
        for layer in range(meta["num_layers"]):
            k = f.get_tensor(f"layer_{layer}_key")
            assert k.shape == (3, meta["num_kv_heads"], max(lengths), meta["head_dim"])
            table = pq.read_table(run_dir / f"kv/layer={layer}/data.parquet")
            assert table.schema.equals(kv_schema(meta["head_dim"]))
            rows = table.to_pydict()
            order = list(zip(rows["seq_id"], rows["pos"], rows["head"]))
            assert order == sorted(order) and len(order) == sum(lengths) * meta["num_kv_heads"]
            got = np.asarray(rows["key"], dtype=np.float32)
            want = np.concatenate([k[s, :, :n].permute(1, 0, 2).reshape(-1, meta["head_dim"]).numpy()
                                   for s, n in enumerate(lengths)])
            np.testing.assert_array_equal(got, want)
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["n_sequences"] == 3 and metadata["n_tokens"] == sum(lengths)
    preds = pq.read_table(run_dir / "predictions.parquet").to_pydict()
    assert preds["seq_id"] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(a >= b for a, b in zip(preds["probability"][:3], preds["probability"][1:4]))


def test_gqa_query_head_reads_kv_head_h_div_group(tiny_models):
    """Rebuild layer 0's attention output from the stored K/V with the documented head mapping."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ex = Extractor(tiny_models["llama"], device="cpu", dtype="float32")
    cfg = ex.model.config
    n_heads, n_kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    assert n_kv < n_heads
    captured = {}
    attn = ex.model.model.layers[0].self_attn
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(hidden=kw["hidden_states"]), with_kwargs=True)
    h2 = attn.o_proj.register_forward_pre_hook(lambda m, a: captured.update(out=a[0]))
    ids, keys, values = own_cache(ex, TEXTS[2])
    h1.remove(), h2.remove()
    seq = len(ids)
    with torch.no_grad():
        q = attn.q_proj(captured["hidden"].clone()).view(1, seq, n_heads, dim).transpose(1, 2)
        cos, sin = ex.model.model.rotary_emb(q, torch.arange(seq)[None])
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    group = n_heads // n_kv
    causal = torch.ones(seq, seq).tril().bool()
    for h in range(n_heads):
        k, v = keys[0][0, h // group], values[0][0, h // group]
        scores = (q[0, h] @ k.T) / dim ** 0.5
        out = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
        torch.testing.assert_close(out, captured["out"][0, :, h * dim:(h + 1) * dim], rtol=1e-4, atol=1e-5)


def test_extraction_api_coordinate_stats_and_json(tiny_models):
    ex = Extractor(tiny_models["gpt2"], device="cpu", dtype="float32")
    result = ex.extract(TEXTS[0], top_k=3)
    ids, keys, _ = own_cache(ex, TEXTS[0])
    c = result.coordinate(1, 2, 3)
    np.testing.assert_allclose(c["key"], keys[1][0, 2, 3].numpy(), rtol=1e-6)
    assert c["key_norm"] == pytest.approx(float(keys[1][0, 2, 3].norm()), rel=1e-6)
    assert len(result.prediction["top_k"]) == 3 and result.prediction["token_id"] == result.prediction["top_k"][0]["token_id"]
    assert result.stats()["seq_len"] == len(ids)
    assert set(result.to_dict()["kv_cache"]) == {"layer_0", "layer_1"}
    from kvcore.errors import UsageError

    with pytest.raises(UsageError, match="out of range: layer 0..1"):
        result.coordinate(2, 0, 0)
    with pytest.raises(UsageError, match="too many for JSON"):
        result.to_dict(max_elements=10)


def test_cli_extract_writes_a_run_and_refuses_bad_input(tiny_models, tmp_path, capsys):
    from kvcore.cli import main

    out = tmp_path / "cli-run"
    assert main(["extract", "--model", str(tiny_models["gpt2"]), "--prompt", "Hello world", "--prompt", "Bye",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "metadata.json").read_text())["n_sequences"] == 2
    capsys.readouterr()
    assert main(["extract", "--model", str(tiny_models["gpt2"]), "--prompt", "x", "--out", str(out)]) == 2
    assert "already holds a complete run; pass --overwrite" in capsys.readouterr().err
    assert main(["extract", "--model", "no-such-model", "--prompt", "x", "--out", str(tmp_path / "o"),
                 "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'no-such-model'; valid prepared names:" in err
