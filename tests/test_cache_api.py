"""The public cache API: load_cache, compressed_cache / apply inside generate(), score_continuation.

Tiny random models built from configs (GPT-2 = MHA, LLaMA = GQA), head_dim 32 so per-token
quantization groups fit, initializer_range 0.3 so greedy decoding does not collapse to
one repeated token (which would make "equal generations" say little).
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

import kvcore
from kvcore.compress import compress_file, parse_method
from kvcore.errors import KvcoreError, UsageError
from kvcore.evaluation.score import score_continuation
from kvcore.model import load_model

CONFIGS = {"gpt2": {"n_embd": 128, "initializer_range": 0.3},
           "llama": {"hidden_size": 128, "head_dim": 32, "initializer_range": 0.3}}
TEXTS = ["the cat sat on the mat and then it slept for a while",
         "a b c d e f g h i j k l m n o p q r s t u v w x y z and more letters follow here",
         "short one"]
NEW = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from kvcore.sources import prepare_model

    root = tmp_path_factory.mktemp("cache_api")
    return {arch: prepare_model(f"t-{arch}", {"source": "random-init", "architecture": arch, "config": cfg},
                                root / arch) for arch, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """arch -> (run dir, model, tokenizer, {seq_id: token ids}, {seq_id: predicted next token})."""
    out = {}
    for arch, model_dir in models.items():
        run = tmp_path_factory.mktemp(f"run_{arch}")
        extractor = kvcore.Extractor(model_dir, "cpu", "float32")
        # one sequence per forward: the stored K/V are bit for bit those of a plain prefill
        extractor.extract_to_run(TEXTS, run, top_k=2, batch_size=1)
        tokens = pq.read_table(run / "tokens.parquet").to_pylist()
        ids: dict = {}
        for row in sorted(tokens, key=lambda r: (r["seq_id"], r["pos"])):
            ids.setdefault(row["seq_id"], []).append(row["token_id"])
        top1 = {r["seq_id"]: r["token_id"] for r in pq.read_table(run / "predictions.parquet").to_pylist()
                if r["rank"] == 0}
        out[arch] = (run, extractor.model, extractor.tokenizer, ids, top1)
    return out


def greedy(model, ids, **kw):
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, **kw)[0].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_continued_from_a_run_equals_generation_from_scratch(runs, arch):
    run, model, _, ids, top1 = runs[arch]
    seq = 1
    scratch = greedy(model, ids[seq])
    loaded = kvcore.load_cache(run, [seq], model=model)
    assert loaded.lengths == [len(ids[seq])] and loaded.method is None and not loaded.hidden
    assert loaded.positions[0][0, 0].tolist() == list(range(len(ids[seq])))
    assert loaded.token_ids == [ids[seq]] and loaded.next_token_ids == [top1[seq]]
    # the run's own prediction is the first new token; the cache holds every prompt token
    with torch.no_grad():
        cont = model.generate(torch.tensor([ids[seq] + [top1[seq]]]), past_key_values=loaded.cache,
                              max_new_tokens=NEW - 1, do_sample=False)[0].tolist()
    assert cont == scratch
    assert len(set(scratch[len(ids[seq]):])) > 2  # a real continuation, not one repeated token


def test_several_sequences_stack_right_padded(runs):
    run, model, _, ids, _ = runs["llama"]
    loaded = kvcore.load_cache(run, [2, 0], model=model)
    n2, n0 = len(ids[2]), len(ids[0])
    assert loaded.seq_ids == [2, 0] and loaded.lengths == [n2, n0]
    k = loaded.cache.layers[0].keys
    assert k.shape[0] == 2 and k.shape[2] == max(n2, n0)
    pos = loaded.positions[0]
    assert pos[0, 0].tolist() == list(range(n2)) + [-1] * (n0 - n2)
    assert loaded.hidden[0][0, 0].tolist() == [False] * n2 + [True] * (n0 - n2)
    alone = kvcore.load_cache(run, [2])
    assert torch.equal(alone.cache.layers[1].values[0], loaded.cache.layers[1].values[0, :, :n2])


def test_int8_file_continues_as_its_prefill_compress_score(runs, tmp_path):
    """The check for a quantized file: its tensors are exactly method.fake of the extracted
    ones (the dequantization), the continuation's NLL read against it equals the
    prefill-compress protocol's int8 score of the same continuation (1e-5), that differs from
    the exact cache's, and greedy decoding from it keeps the exact cache's first tokens."""
    run, model, _, ids, top1 = runs["llama"]
    method = parse_method("int8-g32")
    shard = run / "kv" / "part-00000.safetensors"
    compress_file(shard, tmp_path / "int8.safetensors", method)
    seq, cont = 0, [5, 17, 300, 42, 9]
    exact = kvcore.load_cache(run, [seq])
    q = kvcore.load_cache(tmp_path / "int8.safetensors", [seq], model=model)
    assert q.method == "int8-g32"
    for a, b in zip(exact.cache.layers, q.cache.layers):
        assert torch.equal(method.fake(a.keys, "key"), b.keys)

    def nll(cache):  # the prompt's last logits predict cont[0]; cont[:-1] is fed against the cache
        with torch.no_grad():
            return model(input_ids=torch.tensor([cont[:-1]]), past_key_values=cache, use_cache=True,
                         position_ids=torch.arange(len(ids[seq]), len(ids[seq]) + len(cont) - 1)[None]).logits

    want = score_continuation(model, ids[seq], cont, {"q": method}, protocol="prefill-compress")
    prompt_last = model(input_ids=torch.tensor([ids[seq]])).logits[0, -1:].detach()
    for cache, expected in ((q.cache, want["methods"]["q"]), (exact.cache, want["baseline"])):
        logits = torch.cat([prompt_last, nll(cache)[0]])
        got = float(-torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(cont)[:, None]).sum())
        assert got == pytest.approx(expected["nll_sum"], rel=1e-5)
    assert want["methods"]["q"]["nll_sum"] != pytest.approx(want["baseline"]["nll_sum"], rel=1e-7)
    q8 = kvcore.load_cache(tmp_path / "int8.safetensors", [seq], model=model)  # fresh: the caches above grew
    with torch.no_grad():
        start = torch.tensor([ids[seq] + [top1[seq]]])
        from_exact = model.generate(start, past_key_values=kvcore.load_cache(run, [seq]).cache,
                                    max_new_tokens=4, do_sample=False)
        from_int8 = model.generate(start, past_key_values=q8.cache, max_new_tokens=4, do_sample=False)
    assert from_int8.tolist() == from_exact.tolist()


def test_evicted_file_holds_only_kept_tokens_at_their_positions(runs, models, tmp_path):
    from kvcore.evaluation.extracted import compress_extracted

    run, model, _, ids, _ = runs["llama"]
    out = tmp_path / "ev.safetensors"
    compress_extracted([run / "kv" / "part-00000.safetensors"], out, tmp_path / "ev.json", "evict-knorm-0.5-global",
                       None, model_dir=models["llama"], tokens=run / "tokens.parquet", model_device="cpu",
                       model_dtype="float32")
    exact = kvcore.load_cache(run, [1])
    ev = kvcore.load_cache(out, [1], model=model)
    for layer, (a, b) in enumerate(zip(exact.cache.layers, ev.cache.layers)):
        pos = ev.positions[layer]
        assert b.keys.shape[2] < a.keys.shape[2]
        for h in range(pos.shape[1]):
            p = pos[0, h][pos[0, h] >= 0]
            assert torch.equal(b.keys[0, h, :len(p)], a.keys[0, h, p])
            assert p.tolist() == sorted(set(p.tolist()))
    assert ev.hidden  # budget global: heads keep different counts, padded and masked
    # continued at the true positions with the padding masked out, the file scores a
    # continuation exactly as the prefill-compress protocol does with the same method
    cont, n = [7, 99, 250, 3], len(ids[1])
    want = score_continuation(model, ids[1], cont, {"e": parse_method("evict-knorm-0.5-global")},
                              protocol="prefill-compress")["methods"]["e"]["nll_sum"]
    with torch.no_grad():
        first = model(input_ids=torch.tensor([ids[1]])).logits[0, -1:]  # the prompt's last logits
        with ev.attention(model):
            rest = model(input_ids=torch.tensor([cont[:-1]]), past_key_values=ev.cache, use_cache=True,
                         position_ids=torch.arange(n, n + len(cont) - 1)[None]).logits[0]
    logits = torch.cat([first, rest]).double()
    got = float(-torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())
    assert got == pytest.approx(want, rel=1e-5)


def test_bfloat16_shards_load_as_stored(models, tmp_path):
    from safetensors import safe_open

    extractor = kvcore.Extractor(models["gpt2"], "cpu", "bfloat16")
    extractor.extract_to_run(TEXTS[:1], tmp_path, top_k=1)
    loaded = kvcore.load_cache(tmp_path, [0])
    with safe_open(str(tmp_path / "kv" / "part-00000.safetensors"), "pt") as f:
        stored = f.get_tensor("layer_1_value")
    assert loaded.cache.layers[1].values.dtype == torch.bfloat16
    assert torch.equal(loaded.cache.layers[1].values, stored)
    assert kvcore.validate_cache(loaded.cache, extractor.model.config) == []
    assert "head_dim" not in " ".join(kvcore.validate_cache(loaded.cache, extractor.model.config))
    problems = kvcore.validate_cache([(stored[:, :1], stored[:, :1])] * 2, extractor.model.config)
    assert "expected [batch, 4, seq, 32]" in problems[0]


def test_load_cache_errors_are_one_line(runs, tmp_path):
    run = runs["llama"][0]
    with pytest.raises(UsageError, match=r"seq id 7 is not in .* ids 0\.\.2"):
        kvcore.load_cache(run, [7])
    with pytest.raises(UsageError, match="seq_ids must be a list of integer"):
        kvcore.load_cache(run, 0)
    with pytest.raises(UsageError, match="device must be"):
        kvcore.load_cache(run, [0], device="gpu")
    with pytest.raises(UsageError, match="no such run directory or safetensors file"):
        kvcore.load_cache(tmp_path / "missing")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(KvcoreError, match="cannot read .*bad.safetensors") as err:
        kvcore.load_cache(bad)
    assert "\n" not in str(err.value)
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KvcoreError, match="not an extracted run, shard or compressed file"):
        kvcore.load_cache(tmp_path / "model.safetensors")
    with pytest.raises(KvcoreError, match="does not fit the model"):
        kvcore.load_cache(run, [0], model=runs["gpt2"][1])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_identity_and_kvzip_keep_one_equals_plain(runs, arch):
    _, model, tokenizer, ids, _ = runs[arch]
    plain = greedy(model, ids[1])
    assert greedy(model, ids[1], past_key_values=kvcore.compressed_cache(model, "none")) == plain
    with kvcore.apply(model, "evict-kvzip-1.0", tokenizer=tokenizer):
        assert greedy(model, ids[1]) == plain
    assert "forward" not in model.__dict__  # the wrapper is gone after the block
    with kvcore.apply(model, "evict-kvzip-0.3", tokenizer=tokenizer):
        assert greedy(model, ids[1]) != plain  # and it does evict


def test_generate_under_eviction_answers_as_the_task_protocol(runs):
    """apply() evicts at prefill through the evaluation's one path: generate() gives the tokens
    the task protocol's greedy decoding gives from the same compressed context (budget global:
    heads keep different counts, so the padding masks are exercised too)."""
    from kvcore.evaluation.context import compress_context
    from kvcore.evaluation.options import check_options
    from kvcore.evaluation.prefill import make_scorers, prefill_context
    from kvcore.tasks.evaluate import greedy_answer

    _, model, tokenizer, ids, _ = runs["llama"]
    method, options = parse_method("evict-snapkv-0.4-global"), check_options(None)
    with kvcore.apply(model, method):
        got = greedy(model, ids[1])[len(ids[1]):]
    scorers = make_scorers([method], options)
    with torch.no_grad():
        pre = prefill_context(model, torch.tensor([ids[1]]), scorers, options)
        compressed = compress_context(method, pre, scorers, options)
        first = int(pre.last_logits[0].argmax())
        want = [first] + greedy_answer(model, compressed.cache(model), compressed.hidden, [first], len(ids[1]),
                                       NEW - 1, set())
    assert compressed.hidden  # heads kept different counts
    assert got == want
    assert got != greedy(model, ids[1])[len(ids[1]):]


def test_generate_under_4bit_scores_as_the_fake_quant_protocol(runs):
    """generate() with the int4 cache (its logits at each step) gives the continuation the
    same NLL as the fake-quant protocol's one forward over prompt + continuation."""
    _, model, _, ids, _ = runs["llama"]
    prompt = ids[1]
    for run_with in ("cache", "apply"):
        with torch.no_grad():
            if run_with == "cache":
                out = model.generate(torch.tensor([prompt]), past_key_values=kvcore.compressed_cache(model, "int4-g32"),
                                     max_new_tokens=NEW, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            else:
                with kvcore.apply(model, "int4-g32"):
                    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, len(prompt):].tolist()
        logits = torch.cat(out.logits).double()
        nll = float(-torch.log_softmax(logits, -1).gather(1, torch.tensor(new)[:, None]).sum())
        scored = score_continuation(model, prompt, new, {"q": parse_method("int4-g32")}, protocol="fake-quant")
        assert nll == pytest.approx(scored["methods"]["q"]["nll_sum"], rel=1e-4)
        assert scored["methods"]["q"]["nll_sum"] != pytest.approx(scored["baseline"]["nll_sum"], rel=1e-3)
    assert new == greedy(model, prompt, past_key_values=kvcore.compressed_cache(model, "int4-g32"))[len(prompt):]


def test_compressed_cache_refuses_prefill_methods(runs):
    model = runs["llama"][1]
    with pytest.raises(UsageError, match=r"compresses a prefilled context.*kvcore.apply"):
        kvcore.compressed_cache(model, "evict-knorm-0.5")
    with pytest.raises(UsageError, match="bits must be one of"):
        kvcore.compressed_cache(model, "int5")
    with pytest.raises(UsageError, match="already compresses .*int8-g32"), kvcore.apply(model, "int4-g32"):
        greedy(model, [1, 2, 3], past_key_values=kvcore.compressed_cache(model, "int8-g32"))
    assert "forward" not in model.__dict__  # removed after an error too


def test_score_equals_a_plain_forward_pass(runs, capsys):
    _, model, _, ids, _ = runs["gpt2"]
    prompt, cont = ids[0][:6], ids[0][6:]
    full = torch.tensor([prompt + cont])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0, len(prompt) - 1:-1].double()
    want = float(-torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())
    for protocol in ("fake-quant", "prefill-compress"):
        s = score_continuation(model, prompt, cont, {"none": parse_method("none")}, protocol=protocol)
        assert s["n_continuation_tokens"] == len(cont)
        assert s["baseline"]["nll_sum"] == pytest.approx(want, rel=1e-5)
        assert s["methods"]["none"]["nll_sum"] == pytest.approx(want, rel=1e-5)
        assert s["baseline"]["perplexity"] == pytest.approx(math.exp(want / len(cont)), rel=1e-5)


def test_score_cli(models, capsys):
    from kvcore.cli import main

    args = ["score", "--model", str(models["llama"]), "--device", "cpu", "--prompt", "the cat sat on",
            "--continuation", " the mat"]
    assert main([*args, "--method", "int4-g32"]) == 0
    out = capsys.readouterr().out
    assert "fake-quant" in out and "prefill-compress" in out and "continuation" in out
    assert main([*args, "--method", "evict-knorm-0.5", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert list(record["protocols"]) == ["prefill-compress"]
    assert main([*args[:-2], "--continuation", "", "--method", "int4-g32"]) == 2
    assert "at least one token" in capsys.readouterr().err
