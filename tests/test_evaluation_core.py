"""One evaluation core: for the same context and method, perplexity, the tasks and the
eviction compress job keep the same tokens; one bits-per-element number reaches every table
and plot."""

from __future__ import annotations

import json

import pytest
import torch

from kvcore.compress import parse_method
from kvcore.compress.evict import Evict
from kvcore.model import load_model

# uniform per head, one threshold per layer, one threshold over the whole model
BUDGETS = {"evict-kvzip-0.5-s2": "uniform", "evict-h2o-0.4-s1-global": "global", "evict-kvzip-0.5-s2-model": "model",
           "evict-knorm-0.3-model": "model"}


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(tiny_models["llama"], "cpu", "float32")


def selections(monkeypatch):
    """Every keep mask an evict method's selection returns, whoever asks for it."""
    seen = []
    select_layers = Evict.select_layers

    def spy(self, scores):
        out = select_layers(self, scores)
        seen.append([m.clone() for m in out])
        return out

    monkeypatch.setattr(Evict, "select_layers", spy)
    return seen


@pytest.mark.parametrize("name", BUDGETS)
def test_every_path_keeps_the_same_tokens(llama, monkeypatch, name):
    from kvcore.evaluation.extracted import context_keep
    from kvcore.evaluation.protocols import evaluate_methods
    from kvcore.tasks.base import Example
    from kvcore.tasks.evaluate import evaluate_task, prompt_ids

    model, tokenizer, _ = llama
    method = parse_method(name)
    words = "the quick brown fox jumps over the lazy dog and a key and a value are stored".split()
    g = torch.Generator().manual_seed(4)
    context = " ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=g))
    example = Example(id="e", context=context, question="What jumps?", answers=["fox"])
    head, _ = prompt_ids(tokenizer, example.context, example.question)
    targets = torch.randint(0, model.config.vocab_size, (16,), generator=g).tolist()

    seen = selections(monkeypatch)
    evaluate_task(model, tokenizer, [example], {name: method.spec}, {"keep_ratios": [method.keep_ratio],
                                                                   "max_new_tokens": 1, "device": "cpu"})
    # one window whose context is exactly the task's prefix
    evaluate_methods(model, head + targets, {name: method}, protocol="prefill-compress",
                     max_length=len(head) + len(targets), stride=len(targets), layout="chunks", tokenizer=tokenizer)
    context_keep(model, torch.tensor([head]), method, tokenizer=tokenizer, index=0)
    assert len(seen) == 3  # tasks, perplexity, the compress job: each selected once, all layers together
    tasks, ppl, job = seen
    for a, b, c in zip(tasks, ppl, job):
        assert a.shape == (1, 2, len(head)) and torch.equal(a, b) and torch.equal(a, c)
    counts = [int(m.sum()) for m in tasks]
    if BUDGETS[name] == "uniform":
        assert all((m.sum(-1) == m.sum(-1).flatten()[0]).all() for m in tasks)
    if name == "evict-knorm-0.3-model":  # key norms differ by layer: one threshold, different shares
        assert len(set(counts)) > 1


def test_budget_scope_is_the_methods_own(llama):
    """A scorer named alone gets its own budget in tasks: KVzip's model-wide one for kvzip and
    the attention scorers, uniform for the others; a suffix picks another."""
    from kvcore.tasks.evaluate import resolve_methods

    specs = resolve_methods(["kvzip", "h2o", "snapkv", "knorm", "kvzip-uniform", "random-model"])
    assert [specs[n]["budget"] for n in specs] == ["model", "model", "model", "uniform", "uniform", "model"]
    assert specs["kvzip-uniform"]["scorer"] == "kvzip"


def test_one_bits_number_in_every_table_and_plot(llama, tmp_path):
    """ppl JSON, results/perplexity.md, the run's report.md and the trade-off plot's data show the
    same bits per element (fp16 basis) for an eviction and a quantization method, and a compress
    JSON of a float32 extraction counts under the same convention."""
    from kvcore import report
    from kvcore.compress.bits import LABEL
    from kvcore.compress.files import measure
    from kvcore.evaluation.perplexity import validate_method
    from kvcore.plots.results import plot_compression_tradeoff
    from safetensors.torch import save_file

    run = tmp_path / "results" / "tiny" / "toy"
    (run / "ppl").mkdir(parents=True)
    ids = torch.randint(0, 500, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    settings = {"max_length": 64, "stride": 32, "threshold": 0.5}
    want = {}
    for name in ("evict-knorm-0.5-model", "int4-g32-ch"):
        record = validate_method(None, ids, name, None, settings, loaded=llama)
        (run / "ppl" / f"{name}.json").write_text(json.dumps(record))
        want[name] = {p: format(r["bits_per_element"], ".3g") for p, r in record["protocols"].items()}
    assert 8.0 < float(want["evict-knorm-0.5-model"]["prefill-compress"]) < 8.5  # not 16: fp16 basis
    results = sorted((run / "ppl").glob("*.json"))
    table = report.write_perplexity_table({"tiny": results}, tmp_path / "p.md").read_text()
    run_md = report.write_run_report(run, results=results).read_text()
    records = report.collect_results(results)
    points = plot_compression_tradeoff(records, tmp_path / "t.png")["points"]
    for md in (table, run_md):
        assert LABEL in md
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in md.splitlines() if line.startswith("| ")]
        got = {(r[0], r[2]): r[3] for r in rows if r[0] in want}
        assert got == {(m, p): b for m, bits in want.items() for p, b in bits.items()}
    assert {(p["method"], p["protocol"]): format(p["bits_per_element"], ".3g") for p in points} == \
        {(m, p): b for m, bits in want.items() for p, b in bits.items()}

    # a float32 extraction, compressed: the kept half of 16-bit vectors, not of 32-bit ones
    k = torch.randn(1, 2, 64, 16)
    save_file({"layer_0_key": k, "layer_0_value": k.clone()}, str(tmp_path / "x.safetensors"),
              metadata={"num_layers": "1", "seq_ids": "[0]"})
    for name in ("evict-knorm-0.5", "int4-g32-ch"):
        method = parse_method(name)
        got = measure(tmp_path / "x.safetensors", method, (lambda l, k, v: -k.norm(dim=-1)) if method.needs_scores
                      else None)
        bits = float(want["evict-knorm-0.5-model" if method.needs_scores else name]["prefill-compress"])
        assert got["bits_per_element"] == pytest.approx(bits, abs=0.2)
        assert got["written_bits_per_element"] > got["bits_per_element"] or not method.needs_scores
