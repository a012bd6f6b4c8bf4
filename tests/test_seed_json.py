"""`kvcore extract --json-layout seed`: the seed extractor's JSON, read the way its query tool
read it (its lookups written anew here), the next-token temperature, --random-min/--random-max."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvcore.cli import main

TEXT = "The quick brown fox jumps over the lazy dog"


def _coordinate(data, layer, head, token):
    """The seed tool's --coordinate: kv_cache.layer_L.head_H.tokens[T] and its norms."""
    entry = data["kv_cache"][f"layer_{layer}"][f"head_{head}"]["tokens"][token]
    assert entry["token_idx"] == token
    return {"token": data["input_tokens"][token], "key": entry["key"], "value": entry["value"],
            "key_norm": math.sqrt(sum(x * x for x in entry["key"])),
            "value_norm": math.sqrt(sum(x * x for x in entry["value"]))}


def _search_norm(data, low, high, part="key"):
    """The seed tool's --search-norm: every (layer, head, token) whose vector norm is in [low, high]."""
    hits = []
    for layer_name, heads in data["kv_cache"].items():
        for head_name, head in heads.items():
            for entry in head["tokens"]:
                norm = math.sqrt(sum(x * x for x in entry[part]))
                if low <= norm <= high:
                    hits.append((int(layer_name.split("_")[1]), int(head_name.split("_")[1]), entry["token_idx"]))
    return hits


def test_seed_layout_answers_the_seed_tools_lookups(tiny_models, tmp_path, capsys):
    model = tiny_models["llama"]
    out = tmp_path / "seed.json"
    assert main(["extract", "--model", str(model), "--prompt", TEXT, "--out", str(tmp_path / "run"),
                 "--json", str(out), "--json-layout", "seed", "--top-k", "4"]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["model", "input_text", "input_tokens", "predicted_next_token", "kv_cache", "metadata"]
    meta = data["metadata"]  # the tool's --info
    assert data["input_text"] == TEXT and meta["sequence_length"] == len(data["input_tokens"])
    assert (meta["n_layers"], meta["n_heads"], meta["d_head"]) == (2, 2, 16)  # heads: the cache's KV heads
    assert len(data["kv_cache"]) == meta["n_layers"] and len(data["kv_cache"]["layer_1"]) == meta["n_heads"]
    candidates = data["predicted_next_token"]["top_k_candidates"]
    assert len(candidates) == 4 and data["predicted_next_token"]["token"] == candidates[0]["token"]
    assert candidates[0]["probability"] >= candidates[-1]["probability"]
    from kvcore.extract import Extractor

    reference = Extractor(model, "cpu", "float32").extract(TEXT)
    for layer, head, token in [(0, 0, 0), (1, 1, meta["sequence_length"] - 1)]:
        got = _coordinate(data, layer, head, token)
        want = reference.coordinate(layer, head, token)
        assert got["token"] == want["token_text"]
        torch.testing.assert_close(torch.tensor(got["key"]), torch.tensor(want["key"]))
        assert got["key_norm"] == pytest.approx(want["key_norm"], rel=1e-5)
    fox = [i for i, t in enumerate(data["input_tokens"]) if t.strip().lower() == "fox"]  # --token-search
    assert fox and _coordinate(data, 0, 0, fox[0])["token"].strip() == "fox"
    norms = sorted(_coordinate(data, 0, h, t)["key_norm"] for h in range(2) for t in range(meta["sequence_length"]))
    assert (0, 0, 0) in _search_norm(data, 0, math.inf) and len(_search_norm(data, norms[-1] + 1, math.inf)) == 0


def test_seed_layout_refused_above_the_limit(tiny_models, tmp_path, monkeypatch, capsys):
    import kvcore.extract

    monkeypatch.setattr(kvcore.extract, "JSON_MAX_ELEMENTS", 100)
    code = main(["extract", "--model", str(tiny_models["gpt2"]), "--prompt", TEXT, "--out", str(tmp_path / "run"),
                 "--json", str(tmp_path / "big.json"), "--json-layout", "seed"])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "kvcore:" in line]
    assert code == 2 and line.startswith("kvcore: error:") and "too many for JSON (limit 100)" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "big.json").exists()  # refused before any output
    assert main(["extract", "--model", str(tiny_models["gpt2"]), "--prompt", TEXT, "--out", str(tmp_path / "r2"),
                 "--json-layout", "seed"]) == 2  # the layout without --json is a usage error


def test_temperature_samples_from_the_top_k_seeded(tiny_models):
    from kvcore.extract import Extractor

    ex = Extractor(tiny_models["gpt2"], "cpu", "float32")
    greedy = ex.extract(TEXT, top_k=20)
    assert greedy.prediction["token_id"] == greedy.prediction["top_k"][0]["token_id"]
    hot = [ex.extract(TEXT, top_k=20, temperature=5.0, seed=s).prediction for s in range(12)]
    assert ex.extract(TEXT, top_k=20, temperature=5.0, seed=3).prediction == hot[3]  # seeded
    assert len({p["token_id"] for p in hot}) > 1  # a flat distribution gives several tokens
    assert all(p["token_id"] in {c["token_id"] for c in p["top_k"]} for p in hot)
    cold = ex.extract(TEXT, top_k=20, temperature=0.25).prediction
    assert cold["top_k"][0]["probability"] > greedy.prediction["top_k"][0]["probability"] > hot[0]["top_k"][0][
        "probability"]


def test_random_word_counts(tiny_models, tmp_path, capsys):
    assert main(["extract", "--model", str(tiny_models["gpt2"]), "--random", "3", "--random-min", "2",
                 "--random-max", "2", "--out", str(tmp_path / "run"), "--json", str(tmp_path / "r.json")]) == 0
    texts = ["".join(doc["tokens"]) for doc in json.loads((tmp_path / "r.json").read_text())]
    assert len(texts) == 3 and [len(t.split()) for t in texts] == [2, 2, 2]
    capsys.readouterr()
    assert main(["extract", "--model", str(tiny_models["gpt2"]), "--random", "3", "--random-min", "5",
                 "--random-max", "2", "--out", str(tmp_path / "r2")]) == 2
    assert "--random-min (5) must not exceed --random-max (2)" in capsys.readouterr().err
