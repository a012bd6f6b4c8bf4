"""The sliding-window evaluator against a plain forward pass and the HF guide's loop."""

from __future__ import annotations

import math

import pytest
import torch

from kvcore.errors import UsageError
from kvcore.model import load_model
from kvcore.evaluation.protocols import evaluate
from kvcore.evaluation.windows import windows


@pytest.fixture
def model_and_ids(tiny_model_dir):
    model, tokenizer, _ = load_model(tiny_model_dir, "cpu", "float32")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (150,), generator=g).tolist()
    return model, ids


def plain_forward_ppl(model, ids):
    """exp(mean NLL) of one forward pass, computed independently in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return math.exp(float(nll))


def hf_guide_ppl(model, ids, max_length, stride):
    """The Hugging Face perplexity guide's loop (labels -100, model's own loss), weighting each
    window by the tokens its loss actually averaged."""
    enc = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = enc[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n = int((target[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


def test_one_window_equals_a_plain_forward_pass(model_and_ids):
    model, ids = model_and_ids
    result = evaluate(model, ids, max_length=len(ids), stride=len(ids))
    assert result["n_scored"] == len(ids) - 1
    assert result["perplexity"] == pytest.approx(plain_forward_ppl(model, ids), rel=1e-5)


def test_text_shorter_than_the_window(model_and_ids):
    model, ids = model_and_ids
    result = evaluate(model, ids[:40], max_length=64, stride=32)
    assert len(result["windows"]) == 1
    assert result["perplexity"] == pytest.approx(plain_forward_ppl(model, ids[:40]), rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(64, 32), (64, 64), (50, 17)])
def test_sliding_windows_match_the_hf_guide(model_and_ids, max_length, stride):
    model, ids = model_and_ids
    result = evaluate(model, ids, max_length, stride)
    assert result["perplexity"] == pytest.approx(hf_guide_ppl(model, ids, max_length, stride), rel=1e-5)
    # every token is scored once, except a window's first token when nothing precedes it there
    unscored = sum(w.target_len == w.end - w.begin for w in windows(len(ids), max_length, stride))
    assert result["n_scored"] == len(ids) - unscored


def test_window_edges():
    ws = windows(150, 64, 32)
    assert ws[0].begin == 0 and ws[0].target_len == 64
    assert ws[-1].end == 150 and ws[-1].target_len == 150 - ws[-2].end  # the last, partial window
    assert sum(w.target_len for w in ws) == 150
    assert windows(10, 64, 32) == [windows(10, 64, 32)[0]] and windows(10, 64, 32)[0].end == 10
    with pytest.raises(UsageError, match="stride"):
        windows(100, 32, 64)
    with pytest.raises(UsageError, match="at least 2 tokens"):
        windows(1, 32, 16)


def test_shards_of_windows_merge_to_the_same_number(model_and_ids):
    from kvcore.evaluation.nll import summarize

    model, ids = model_and_ids
    whole = evaluate(model, ids, 64, 32)
    n = whole["n_windows_total"]
    parts = [evaluate(model, ids, 64, 32, selected=list(range(i, n, 2))) for i in range(2)]
    merged = summarize(parts[0]["windows"] + parts[1]["windows"], 0.0)
    assert merged["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-12)
