"""Tasks under compression (kvcore.tasks): needle generator, metrics, the generation
protocol on tiny models, and one slow check on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest

from kvcore.errors import UsageError
from kvcore.tasks.metrics import contains_answer, exact_match, f1_score, lcs_length, normalize_answer, rouge_l

# --------------------------------------------------------------------------- metrics


def test_normalize_answer_is_squads():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"


def test_exact_match_and_contains():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert contains_answer("The secret passkey is 12345.", "12345") == 1.0
    assert contains_answer("The secret passkey is 123456.", "12345") == 0.0  # whole tokens only
    assert contains_answer("it is in Paris, France", ["London", "paris france"]) == 1.0


def test_f1_hand_computed():
    # pred tokens: cat sat on mat; gold: cat on mat -> overlap 3, P = 3/4, R = 1
    assert f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    # multiset overlap: pred "a a b" -> [b]... use repeated words: pred x x y, gold x y y -> overlap 2
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1_score("no overlap", "different") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("the", "cat") == 0.0  # empty after normalisation
    assert f1_score("Denver Broncos", ["Broncos", "Denver Broncos"]) == 1.0  # max over answers


def test_rouge_l_hand_computed():
    assert lcs_length("a b c d e".split(), "a x c y e".split()) == 3
    # Lin (2004): "police killed the gunman" vs "police kill the gunman": LCS 2 of 3 tokens each
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(2 / 3)
    # "the gunman kill police": LCS 1 -> P = R = 1/3
    assert rouge_l("police killed the gunman", "the gunman kill police") == pytest.approx(1 / 3)
    # P = 2/4, R = 2/2 -> F = 2/3
    assert rouge_l("x p y q", "p q") == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- needle


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_models):
    from kvcore.model import load_tokenizer

    return load_tokenizer(tiny_models["llama"])


@pytest.fixture(scope="module")
def documents(lee_news_dir):
    from kvcore.sources.datasets import read_documents

    return read_documents(lee_news_dir / "text.parquet")


SPEC = {"context_lengths": [300, 600], "depths": [0.0, 0.25, 0.5, 0.9], "n_per_cell": 2, "seed": 3}


def test_needle_is_deterministic(tiny_tokenizer, documents):
    from kvcore.tasks.needle import make_needle_examples

    a = make_needle_examples(tiny_tokenizer, documents, SPEC)
    b = make_needle_examples(tiny_tokenizer, documents, SPEC)
    assert [(e.context, e.answers, e.meta) for e in a] == [(e.context, e.answers, e.meta) for e in b]
    c = make_needle_examples(tiny_tokenizer, documents, {**SPEC, "seed": 4})
    assert [e.answers for e in a] != [e.answers for e in c]
    assert len(a) == 2 * 4 * 2 and len({e.id for e in a}) == len(a)


def test_needle_position_depth_and_filler(tiny_tokenizer, documents):
    from kvcore.tasks.needle import make_needle_examples, sentences

    longest = max(len(tiny_tokenizer(" " + s)["input_ids"]) for s in sentences(documents))
    for e in make_needle_examples(tiny_tokenizer, documents, SPEC):
        m = e.meta
        ids = tiny_tokenizer(e.context, add_special_tokens=False)["input_ids"]
        assert len(ids) == m["n_tokens"] <= m["context_length"]
        assert m["n_tokens"] >= m["context_length"] - 2 * longest  # filled up to the length
        # the needle really starts at the stated token and holds the answer
        text = tiny_tokenizer.decode(ids[m["needle_token"]:m["needle_token"] + m["needle_tokens"]])
        assert text.strip() == m["needle"] and e.answers[0] in text
        assert tiny_tokenizer.decode(ids[:m["needle_token"]]).strip() == e.context[: e.context.index(m["needle"])].strip()
        # at the stated depth, to within one sentence of filler
        filler = m["n_tokens"] - m["needle_tokens"]
        assert abs(m["needle_token"] / filler - m["depth"]) <= longest / filler + 1e-9
        # the answer occurs nowhere in the filler
        assert e.answers[0] not in e.context.replace(m["needle"], "")
        assert len(e.answers[0]) == 5 and e.answers[0].isdigit()


def test_needle_bad_spec(tiny_tokenizer, documents):
    from kvcore.tasks.needle import make_needle_examples

    with pytest.raises(UsageError, match="depths"):
        make_needle_examples(tiny_tokenizer, documents, {"depths": [1.5]})
    with pytest.raises(UsageError, match="unknown key 'lenghts'"):
        make_needle_examples(tiny_tokenizer, documents, {"lenghts": [100]})


# --------------------------------------------------------------------------- loaders


def test_local_jsonl(tmp_path):
    from kvcore.tasks.loaders import load_local

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"context": "Paris is in France.", "question": "Where is Paris?", "answer": "France"})
                    + "\n\n" + json.dumps({"id": "b", "context": "c", "question": "q", "answers": ["x", "y"]}) + "\n")
    examples = load_local(path)
    assert [e.id for e in examples] == ["1", "b"] and examples[0].answers == ["France"]
    assert "Where is Paris?" in examples[0].question
    path.write_text(json.dumps({"context": "c", "answers": ["x"]}) + "\n")
    with pytest.raises(UsageError, match=r"qa.jsonl:1: missing 'question'"):
        load_local(path)


def test_squad_loader_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from kvcore.tasks.loaders import load_squad

    rows = [{"id": str(i), "title": "t", "context": f"ctx {i}", "question": f"q {i}?",
             "answers": {"text": [f"a{i}", f"a{i}"], "answer_start": [0, 0]}} for i in range(5)]
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: rows)
    examples = load_squad({"n_examples": 3, "seed": 1})
    assert len(examples) == 3 and all(e.answers == [f"a{e.id}"] for e in examples)
    assert [e.id for e in examples] == [e.id for e in load_squad({"n_examples": 3, "seed": 1})]


# --------------------------------------------------------------------------- protocol


def _plain_generate(model, tokenizer, head, tail, max_new_tokens):
    import torch

    from kvcore.tasks.evaluate import stop_ids

    ids = torch.tensor([head + tail])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=sorted(stop_ids(model, tokenizer)),
                         pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stops = stop_ids(model, tokenizer)
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_keep_one_equals_plain_generation(tiny_models, documents, arch):
    from kvcore.model import load_model
    from kvcore.tasks.evaluate import evaluate_task, prompt_ids, resolve_methods
    from kvcore.tasks.needle import make_needle_examples

    model, tokenizer, _ = load_model(tiny_models[arch], "cpu", "float32")
    examples = make_needle_examples(tokenizer, documents, {"context_lengths": [200], "depths": [0.5], "n_per_cell": 2})
    methods = resolve_methods(["random", "snapkv", "kvzip"])
    run = evaluate_task(model, tokenizer, examples, methods, {"keep_ratios": [1.0, 0.3], "max_new_tokens": 8})
    changed = 0
    for i, e in enumerate(examples):
        head, tail = prompt_ids(tokenizer, e.context, e.question, e.answer_prefix)
        plain = _plain_generate(model, tokenizer, head, tail, 8)
        assert plain  # an empty answer would make the comparison vacuous
        assert run["baseline"]["examples"][i]["prediction"] == plain
        for name in methods:
            full = run["methods"][name]["results"][0]
            assert full["keep_ratio"] == 1.0 and full["examples"][i]["prediction"] == plain
            changed += run["methods"][name]["results"][1]["examples"][i]["prediction"] != plain
    if arch == "llama":  # the comparison sees the cache: evicting 70% changes some answer
        assert changed > 0
    low = run["methods"]["random"]["results"][1]
    assert 0.25 < low["kv_fraction"] < 0.4 and low["kv_bytes_held"] < low["kv_bytes_full"]
    assert run["peak_memory_bytes"] > 0 and run["n_examples"] == 2


def test_prompt_split_keeps_question_out_of_prefix(tiny_tokenizer):
    from kvcore.tasks.evaluate import split_prompt

    head, tail = split_prompt(tiny_tokenizer, "CONTEXT TEXT", "What is it?", "It is")
    full = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "CONTEXT TEXT\n\nWhat is it?"}],
                                              add_generation_prompt=True, tokenize=False)
    assert head + tail == full + "It is"
    assert head.endswith("CONTEXT TEXT") and "What is it?" not in head


def test_run_task_writes_results_and_plot(tiny_models, lee_news_dir, tmp_path):
    from kvcore.plots_tasks import plot_task_accuracy
    from kvcore.tasks.evaluate import run_task

    outputs = {m: str(tmp_path / "tasks" / "needle" / f"{m}.json") for m in ("knorm", "streamingllm")}
    spec = {"type": "needle", "context_lengths": [150], "depths": [0.5], "n_per_cell": 1}
    run_task(tiny_models["llama"], "needle", spec, list(outputs), {"keep_ratios": [1.0, 0.5], "max_new_tokens": 4,
             "device": "cpu"}, outputs, filler_parquet=lee_news_dir / "text.parquet")
    docs = [json.loads(open(p).read()) for p in outputs.values()]
    for doc in docs:
        for key in ("accuracy", "n_examples", "results", "kv_bytes_held", "peak_memory_bytes", "seconds"):
            assert key in doc
        assert doc["primary_metric"] == "accuracy" and set(doc["accuracy"]) == {"1", "0.5"}
        assert [r["keep_ratio"] for r in doc["results"]] == [1.0, 0.5]
    png = plot_task_accuracy(docs, tmp_path / "task_accuracy.png")
    assert png.stat().st_size > 1000


def test_tables_per_context_length(tmp_path, capsys):
    from kvcore.cli import main

    def cells(a512, a1024):  # by_cell: 2 depths x (1 or 3 examples) per length
        return [{"context_length": 512, "depth": 0.1, "accuracy": a512, "n": 1},
                {"context_length": 512, "depth": 0.9, "accuracy": 1.0, "n": 1},
                {"context_length": 1024, "depth": 0.1, "accuracy": a1024, "n": 3},
                {"context_length": 1024, "depth": 0.9, "accuracy": 0.0, "n": 1}]

    doc = {"method": "h2o", "primary_metric": "accuracy", "n_examples": 6, "accuracy": {"0.5": 0.5},
           "baseline": {"accuracy": 1.0, "by_cell": cells(1.0, 1.0)},
           "results": [{"keep_ratio": 0.5, "by_cell": cells(0.0, 2 / 3)}]}
    path = tmp_path / "h2o.json"
    path.write_text(json.dumps(doc))
    assert main(["tasks", "table", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| method (accuracy, n=6) | 0.5 |" in out and "| h2o | 0.500 |" in out
    # 512: (0 + 1) / 2; 1024: (3 * 2/3 + 0) / 4, weighted by examples
    assert "| method (accuracy, 512 tokens, n=2) | 0.5 |" in out and "| h2o | 0.500 |" in out.split("512 tokens")[1]
    assert "| method (accuracy, 1024 tokens, n=4) | 0.5 |" in out
    assert out.split("1024 tokens")[1].splitlines()[3] == "| h2o | 0.500 |"
    assert out.split("1024 tokens")[1].splitlines()[2] == "| uncompressed | 0.750 |"


def test_paired_table_counts_who_got_which_example(tmp_path, capsys):
    from kvcore.cli import main
    from kvcore.cli.tasks import mcnemar_p

    def doc(name, right):
        examples = [{"id": str(i), "contains_answer": float(r)} for i, r in enumerate(right)]  # as run_task writes
        return {"method": name, "primary_metric": "accuracy", "n_examples": len(right), "accuracy": {"0.5": 0},
                "baseline": {"accuracy": 1.0, "by_cell": []},
                "results": [{"keep_ratio": 0.5, "accuracy": sum(right) / len(right), "examples": examples}]}

    a, b = doc("kvzip", [1, 1, 1, 1, 0, 1]), doc("kvzip-uniform", [0, 0, 0, 1, 1, 1])
    for d in (a, b):
        (tmp_path / f"{d['method']}.json").write_text(json.dumps(d))
    paths = [str(tmp_path / "kvzip.json"), str(tmp_path / "kvzip-uniform.json")]
    assert main(["tasks", "table", *paths, "--versus", "kvzip:kvzip-uniform"]) == 0
    assert "| kvzip vs kvzip-uniform | 0.5 | 0.833 | 0.500 | 3 | 1 | 0.62 |" in capsys.readouterr().out
    assert mcnemar_p(3, 1) == pytest.approx(0.625) and mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert main(["tasks", "table", *paths, "--versus", "kvzip:h2o"]) != 0
    assert "no result for method 'h2o'" in capsys.readouterr().err


def test_cli_errors(capsys, tmp_path):
    from kvcore.cli import main

    assert main(["tasks", "local", "--model", str(tmp_path), "--path", "x.jsonl", "--method", "knorm"]) != 0
    assert "kvcore: error:" in capsys.readouterr().err
    assert main(["tasks", "needle", "--model", str(tmp_path), "--dataset", "x", "--method", "knorm",
                 "--keep", "0"]) != 0
    assert "argument --keep: must be a finite number > 0 and <= 1 (got '0')" in capsys.readouterr().err


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_smollm2_needle_accuracy(smollm2_dir, lee_news_dir):
    """SmolLM2-135M-Instruct, 6 passkeys at 256 tokens: uncompressed retrieval is well above
    chance (a 5-digit guess: 1e-5); keep 1.0 retrieves the same; random eviction to 10% does
    no better than keep 1.0."""
    import torch

    from kvcore.model import load_model
    from kvcore.sources.datasets import read_documents
    from kvcore.tasks.evaluate import evaluate_task, resolve_methods
    from kvcore.tasks.needle import make_needle_examples

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decoding tiny steps: threads only contend on a shared CPU
    try:
        model, tokenizer, _ = load_model(smollm2_dir, "cpu", "float32")
        examples = make_needle_examples(tokenizer, read_documents(lee_news_dir / "text.parquet"),
                                        {"context_lengths": [256], "depths": [0.1, 0.5, 0.9], "n_per_cell": 2})
        run = evaluate_task(model, tokenizer, examples, resolve_methods(["random"]),
                            {"keep_ratios": [1.0, 0.1], "max_new_tokens": 8})
    finally:
        torch.set_num_threads(threads)
    base = run["baseline"]["accuracy"]
    full, low = (r["accuracy"] for r in run["methods"]["random"]["results"])
    print(f"SmolLM2 needle@256: uncompressed accuracy {base:.2f}, random keep 1.0 {full:.2f}, keep 0.1 {low:.2f}")
    assert base >= 0.8
    assert full == base
    assert low <= full
