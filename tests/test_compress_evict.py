"""The workflow's compress job for eviction (rule compress_evict) and pruning, on a tiny model.

Sequences of different lengths (one per document), so each is scored and budgeted at its own
length and the padding of the merged shards is never kept.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import REPO
from test_workflow import SNAKEMAKE

from kvcore.compress import parse_method
from kvcore.compress.evict import kept_per_head
from kvcore.errors import KvcoreError, UsageError

MODEL, DATASET = "tiny-llama", "random-docs"
METHODS = {
    "kvzip-0.5": {"family": "evict", "scorer": "kvzip", "keep_ratio": 0.5, "sink_tokens": 2},
}
# compressed in process from the workflow's extraction (one workflow job is enough, and fast)
IN_PROCESS = {"h2o-0.25-global": {"family": "evict", "scorer": "h2o", "keep_ratio": 0.25, "sink_tokens": 1,
                                  "recent_tokens": 3, "budget": "global"}}


TARGETS = [f"results/{MODEL}/{DATASET}/compress/{m}.json" for m in METHODS]


def snakemake(work, *args: str) -> str:
    """Run the workflow for the compress targets only (named first: --resources takes a list)."""
    cmd = SNAKEMAKE + [*TARGETS, "--directory", str(work), "--configfile", str(work / "config.yaml"),
                       "--cores", "2", "--resources", "gpu=2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def planned(work) -> dict[str, int]:
    """{rule: count} that a dry run for the compress targets would execute."""
    out = snakemake(work, "--dry-run")
    if "Nothing to be done" in out:
        return {}
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:", 1)[1], flags=re.M))
    jobs.pop("total", None)
    return {rule: int(n) for rule, n in jobs.items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("evict")
    config = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    config["models"] = {MODEL: config["models"][MODEL]}
    config["datasets"] = {DATASET: {"source": "random", "n_documents": 6, "min_words": 6, "max_words": 40,
                                    "sequences": "documents"}}
    config["extract"].update(seq_len=64, n_sequences=6, shard_size=6)  # one shard: one extract job
    config["methods"] = METHODS
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(work)  # only the compress jobs and what they need: no perplexity
    return work


def extracted(run):
    """Per tensor name, the extracted shards side by side (right-padded), and every sequence's length."""
    parts, lengths = {}, []
    for path in sorted((run / "kv").glob("part-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            lengths += json.loads(f.metadata()["seq_lengths"])
            for name in f.keys():
                parts.setdefault(name, []).append(f.get_tensor(name))
    width = max(lengths)
    return {name: torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2])) for t in ts])
            for name, ts in parts.items()}, lengths


def stored(path):
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture(scope="module")
def compressed(work, tmp_path_factory):
    """{name: (path to .safetensors, metrics)}: the workflow's job, and the in-process runs."""
    from kvcore.evaluation.extracted import compress_extracted

    run = work / "results" / MODEL / DATASET
    out = {name: (run / "compress" / f"{name}.safetensors", json.loads((run / "compress" / f"{name}.json")
                                                                       .read_text())) for name in METHODS}
    tmp = tmp_path_factory.mktemp("in-process")
    for name, spec in IN_PROCESS.items():
        path = tmp / f"{name}.safetensors"
        compress_extracted(sorted((run / "kv").glob("part-*.safetensors")), path, tmp / f"{name}.json", name, spec,
                           model_dir=work / "resources" / "models" / MODEL, tokens=run / "tokens.parquet",
                           model_device="cpu", model_dtype="float32")
        out[name] = (path, json.loads((tmp / f"{name}.json").read_text()))
    return out


def test_evicted_files_hold_the_budget_and_the_extracted_vectors(work, compressed):
    run = work / "results" / MODEL / DATASET
    original, lengths = extracted(run)
    n_layers = sum(name.endswith("_key") for name in original)
    assert len(set(lengths)) > 1  # the padding case is exercised
    for name, (path, metrics) in compressed.items():
        method = parse_method(name, {**METHODS, **IN_PROCESS}[name])
        packed = stored(path)
        assert os.path.getsize(path) == metrics["compressed_size_bytes"]
        assert metrics["family"] == "evict" and metrics["bits_basis"] == "fp16"
        assert len(metrics["kept_by_layer"]) == n_layers
        budgets = torch.tensor([kept_per_head(n, method.keep_ratio, method.sink_tokens, method.recent_tokens)
                                for n in lengths])
        masks = []
        for layer in range(n_layers):
            for kind in ("key", "value"):
                fields = {k.split(".", 1)[1]: t for k, t in packed.items() if k.startswith(f"layer_{layer}_{kind}.")}
                keep = method.keep_mask(fields)
                x = original[f"layer_{layer}_{kind}"]
                # the stored vectors are the extracted ones at the kept slots, bit for bit
                assert torch.equal(fields["values"], x[keep])
                for i, n in enumerate(lengths):
                    assert not keep[i, :, n:].any()  # padding is never kept
                    assert keep[i, :, :method.sink_tokens].all() and keep[i, :, n - method.recent_tokens:n].all()
                if method.budget == "uniform":
                    assert torch.equal(keep.sum(-1), budgets[:, None].expand(-1, keep.shape[1]))
                else:  # one threshold over the layer's heads: the same total, heads differ
                    assert torch.equal(keep.sum((1, 2)), budgets * keep.shape[1])
                masks.append(keep)
        # fp16 basis over every stored slot (padding too): kept vectors at 16 bits + a 1-bit mask per slot
        kept, slots = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
        dim = original["layer_0_key"].shape[-1]  # (+ each tensor's small header)
        assert metrics["bits_per_element"] == pytest.approx(16 * kept / slots + 1 / dim, abs=0.05)
        assert metrics["kept_fraction"] == pytest.approx(kept / 2 / (sum(lengths) * masks[0].shape[1] * n_layers))
        # chosen by the scores, not by position alone: sequences keep different token sets
        first = masks[0][:, :, :min(lengths)]
        assert not all(torch.equal(first[0], first[i]) for i in range(1, len(lengths)))


def test_the_choice_is_the_perplexity_protocols(work):
    # the job's mask for a sequence equals what prefill-compress chooses for that context
    from kvcore.model import load_model
    from kvcore.evaluation.extracted import context_keep
    from kvcore.tokens import read_sequences

    run = work / "results" / MODEL / DATASET
    model, tokenizer, _ = load_model(work / "resources" / "models" / MODEL, "cpu", "float32")
    method = parse_method("kvzip-0.5", METHODS["kvzip-0.5"])
    ids = read_sequences(run / "tokens.parquet", [5])[5]
    keep = context_keep(model, torch.tensor([ids]), method, tokenizer=tokenizer, index=5)[1]
    fields = {k.split(".", 1)[1]: t for k, t in stored(run / "compress" / "kvzip-0.5.safetensors").items()
              if k.startswith("layer_1_key.")}
    assert torch.equal(method.keep_mask(fields)[5, :, :len(ids)], keep[0])


def test_pruned_run_and_metrics(work, tmp_path):
    # the compress rule's job for other families, in process (its workflow wiring is test_workflow's)
    from kvcore.compress.run import compress_run

    run = work / "results" / MODEL / DATASET
    out = tmp_path / "prune-l0.safetensors"
    metrics = compress_run(sorted((run / "kv").glob("part-*.safetensors")), out, tmp_path / "prune-l0.json",
                           "prune-l0", {"family": "prune", "layers": [0]})
    assert os.path.getsize(out) == metrics["compressed_size_bytes"] == json.loads(
        (tmp_path / "prune-l0.json").read_text())["compressed_size_bytes"]
    assert 1.8 < metrics["compression_ratio"] < 2.0  # one of two layers dropped, plus headers
    original, _ = extracted(run)
    assert torch.equal(stored(out)["layer_1_value.data"], original["layer_1_value"])
    assert "layer_0_value.data" not in stored(out)


def test_compression_table_lists_every_method(work):
    from kvcore.report import write_compression_table

    run = work / "results" / MODEL / DATASET
    out = write_compression_table({"tiny": [run / "compress" / f"{m}.json" for m in METHODS]}, work / "c.md")
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(METHODS)
    assert "extracted as float32" in out.read_text() and all("| evict |" in r for r in rows)
    metrics = json.loads((run / "compress" / "kvzip-0.5.json").read_text())
    assert f"| {metrics['compression_ratio_vs_fp16']:.3g} |" in rows[0]


def test_editing_a_scorer_reruns_only_its_compress_job(work):
    module = REPO / "kvcore" / "eviction" / "kvzip.py"
    text, before = module.read_text(), module.stat()
    module.write_text(text + "\n# edited by tests/test_compress_evict.py\n")
    try:
        assert planned(work) == {"compress_evict": 1}
    finally:
        module.write_text(text)
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_evict_needs_the_model_and_matching_tokens(work, tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from kvcore.evaluation.extracted import compress_extracted

    run = work / "results" / MODEL / DATASET
    shards = sorted((run / "kv").glob("part-*.safetensors"))
    with pytest.raises(UsageError, match="scores tokens with the model"):
        compress_extracted(shards, tmp_path / "k.safetensors", tmp_path / "k.json", "kvzip-0.5", METHODS["kvzip-0.5"])
    table = pq.read_table(run / "tokens.parquet")
    pq.write_table(table.filter(pc.not_equal(table["pos"], 0)), tmp_path / "tokens.parquet")  # one token short
    with pytest.raises(KvcoreError, match="tokenize and extract again"):
        compress_extracted(shards, tmp_path / "k.safetensors", tmp_path / "k.json", "kvzip-0.5", METHODS["kvzip-0.5"],
                           model_dir=work / "resources" / "models" / MODEL, tokens=tmp_path / "tokens.parquet")
    assert not (tmp_path / "k.safetensors").exists() and not (tmp_path / "k.json").exists()
