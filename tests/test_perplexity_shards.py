"""Perplexity split into shards of windows (perplexity.shards) merges to exactly one job's record."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from kvcore.errors import KvcoreError

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def _is_timing(key: str) -> bool:
    return key == "seconds" or key.endswith(("_seconds", "per_second", "_ms")) or key == "latency_ratio"


def assert_same_numbers(a, b, where: str = "") -> None:
    """Equal in every key and value, floats bit for bit (NaN equal to NaN), timings aside."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for key in a:
            if not _is_timing(key):
                assert_same_numbers(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b and type(a) is type(b), (where, a, b)


# --- the library: shards of windows against one job -----------------------------------------------------------

SETTINGS = {"max_length": 64, "stride": 32, "threshold": 0.5}


@pytest.fixture(scope="module")
def llama(tiny_models):
    import torch

    from kvcore.model import load_model

    loaded = load_model(tiny_models["llama"], "cpu", "float32")
    ids = torch.randint(0, loaded[0].config.vocab_size, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    return loaded, ids  # 150 tokens at 64/32: 4 windows, the last one short


def _sharded(loaded, ids, method, shards):
    from kvcore.evaluation.perplexity import evaluate_shard, merge_shards

    parts = [json.loads(json.dumps(evaluate_shard(None, ids, method, None, SETTINGS, loaded=loaded, shard=i,
                                                  shards=shards)))  # through JSON, as the shard files are
             for i in range(shards)]
    random.Random(shards).shuffle(parts)  # the merge does not depend on the order it gets them in
    return parts, merge_shards(parts)


# quantization under both protocols, a seeded-random eviction (its seed is the window index), the baseline
@pytest.mark.parametrize("method,shards", [("int4-g32-ch", 2), ("evict-random-0.5", 3), ("baseline", 4)])
def test_merged_shards_equal_one_job_in_every_number(llama, method, shards):
    from kvcore.evaluation.perplexity import validate_method

    loaded, ids = llama
    one = validate_method(None, ids, method, None, SETTINGS, loaded=loaded)
    parts, merged = _sharded(loaded, ids, method, shards)
    assert_same_numbers(json.loads(json.dumps(one)), json.loads(json.dumps(merged)))
    # each shard really did only its contiguous block of the 4 windows
    blocks = sorted([w["index"] for w in p["protocols"][one["protocol"]]["baseline"]["windows"]] for p in parts)
    assert sorted(i for b in blocks for i in b) == list(range(4)) and all(b == list(range(b[0], b[-1] + 1))
                                                                         for b in blocks)
    assert len(one["windows"]) == 4 and one["n_tokens"] == 149  # 150 tokens, the first is never predicted
    if method != "baseline":
        assert one["delta"] != 0 and one["rmse"] > 0  # a method that changed something, not a trivial equality
    # latencies merge as sums of the windows' seconds
    total = sum(w["seconds"] for p in parts for w in p["protocols"][one["protocol"]]["methods"].get(
        method, p["protocols"][one["protocol"]]["baseline"])["windows"])
    assert merged["seconds"] == pytest.approx(total)


def test_a_method_taking_the_baseline_jobs_windows_gets_its_own_numbers(llama, monkeypatch):
    # the workflow's method jobs read ppl/baseline.json instead of running the baseline's forwards again
    from kvcore.evaluation.perplexity import validate_method

    loaded, ids = llama
    method = "int4-g32-ch"  # both protocols
    model = loaded[0]
    alone = validate_method(None, ids, method, None, SETTINGS, loaded=loaded)
    baseline = json.loads(json.dumps(validate_method(None, ids, "baseline", None, SETTINGS, loaded=loaded)))
    forwards = []
    monkeypatch.setattr(model, "forward", lambda *a, _f=model.forward, **k: forwards.append(1) or _f(*a, **k))
    taken = validate_method(None, ids, method, None, SETTINGS, loaded=loaded, baseline=baseline)
    assert_same_numbers(json.loads(json.dumps(alone)), json.loads(json.dumps(taken)))
    # per window: fake-quant runs the method's forward only, prefill-compress the prefill and the method's
    # feed, not the baseline's (20 forwards without the baseline's record)
    assert len(forwards) == 4 + 4 + 4
    assert taken["baseline_seconds"] == baseline["protocols"][taken["protocol"]]["seconds"]
    baseline["protocols"]["prefill-compress"]["token_ids_sha256"] = "0" * 64  # another text's baseline
    with pytest.raises(KvcoreError, match="does not fit this evaluation"):
        validate_method(None, ids, method, None, SETTINGS, loaded=loaded, baseline=baseline)


def test_more_shards_than_windows_leave_empty_shards_that_still_merge(llama):
    from kvcore.evaluation.perplexity import validate_method

    loaded, ids = llama
    short = ids[:80]  # 2 windows
    one = validate_method(None, short, "int4-g32-ch", None, SETTINGS, loaded=loaded)
    parts, merged = _sharded(loaded, short, "int4-g32-ch", 3)
    assert sum(not p["protocols"]["fake-quant"]["baseline"]["windows"] for p in parts) == 1
    assert_same_numbers(json.loads(json.dumps(one)), json.loads(json.dumps(merged)))


def test_shards_that_do_not_fit_together_are_refused(llama, tmp_path):
    from kvcore.evaluation.perplexity import merge_shards
    from kvcore.jobs.perplexity import merge_shard_files

    loaded, ids = llama
    parts, _ = _sharded(loaded, ids[:80], "baseline", 2)
    parts.sort(key=lambda p: p["shard"])
    with pytest.raises(KvcoreError, match=r"expected shards 0..1, got \[0\]"):
        merge_shards(parts[:1])
    with pytest.raises(KvcoreError, match=r"expected shards 0..1, got \[0, 0\]"):
        merge_shards([parts[0], parts[0]])
    with pytest.raises(KvcoreError, match="disagree on stride"):
        merge_shards([parts[0], {**parts[1], "stride": 16}])
    # a truncated shard file: one line naming it, and no merged output
    paths = []
    for p in parts:
        paths.append(tmp_path / f"baseline-{p['shard']:05d}.json")
        paths[-1].write_text(json.dumps(p))
    paths[1].write_text(paths[1].read_text()[:50])
    with pytest.raises(KvcoreError, match=re.escape(str(paths[1]))) as error:
        merge_shard_files(paths, tmp_path / "baseline.json")
    assert "\n" not in str(error.value) and not (tmp_path / "baseline.json").exists()
    # missing, a directory, not UTF-8, not a shard: each one line naming the file and the job to rerun
    bad = {"missing": None, "folder": "dir", "binary": b"\xff\xfe\x00", "list": b"[1, 2]"}
    for name, content in bad.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(KvcoreError, match=re.escape(str(path))) as error:
            merge_shard_files([paths[0], path], tmp_path / "baseline.json")
        assert "\n" not in str(error.value) and "rerun its perplexity_shard job" in str(error.value), name
    assert not (tmp_path / "baseline.json").exists()


def test_the_config_refuses_more_shards_than_max_tokens_has_windows():
    from kvcore.config import check
    from kvcore.errors import UsageError

    config = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    config["perplexity"]["shards"] = 7  # 256 tokens at 64/32: 7 windows
    check(config)
    config["perplexity"]["shards"] = 8
    with pytest.raises(UsageError, match=r"perplexity.shards \(8\) exceeds the 7 windows"):
        check(config)
    config["perplexity"]["shards"] = 0
    with pytest.raises(UsageError, match="perplexity.shards"):
        check(config)


# --- the workflow: shards 1, then shards 2 ---------------------------------------------------------------------

RUN = "results/tiny-gpt2/random-words"
# The perplexity result only: every job costs seconds of imports (tests/test_workflow.py checks
# the whole grid's reruns); the downloads show that no rule outside perplexity reruns.
TARGETS = [f"{RUN}/ppl/kivi4-g32.json"]
FAKE_GPU = "7"  # a device id no CPU-only host has: torch finds no CUDA, the job still claims it


def snakemake(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, *TARGETS, "--directory", str(work), "--configfile", str(work / "config.yaml"),
           "--cores", "2", "--resources", "gpu=1", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def planned_jobs(work: Path, env: dict, *args: str) -> dict[str, int]:
    """{rule: count} of the jobs a run plans (a dry run unless `args` say otherwise)."""
    done = snakemake(work, env, *(args or ("--dry-run",)))
    out = done.stdout + done.stderr  # a real run logs to stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1].strip().split("\n\n", 1)[0]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M))
    jobs.pop("total", None)
    return {rule: int(n) for rule, n in jobs.items()}


def _set_shards(work: Path, shards: int) -> None:
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["perplexity"]["shards"] = shards
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def one_job_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("ppl-shards")
    config = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    config["models"] = {"tiny-gpt2": config["models"]["tiny-gpt2"]}
    config["methods"] = {"kivi4-g32": config["methods"]["kivi4-g32"]}  # one method: each job costs seconds
    config["perplexity"]["device"] = "auto"  # GPU jobs claim a device (kvcore.gpus) on "auto"
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": FAKE_GPU, "KVCORE_GPU_LOCK_DIR": str(work / "gpu-locks")}
    snakemake(work, env)
    ppl = {p.name: json.loads(p.read_text()) for p in (work / RUN / "ppl").glob("*.json")}
    return work, env, ppl


def test_one_job_writes_no_shard_files_and_claims_a_gpu(one_job_run):
    work, _, ppl = one_job_run
    assert sorted(ppl) == ["kivi4-g32.json"]
    assert not (work / RUN / "ppl" / "shards").exists()
    log = (work / "logs/perplexity/tiny-gpt2/random-words/kivi4-g32.log").read_text()
    assert f"claimed GPU {FAKE_GPU}" in log
    assert (work / "gpu-locks" / f"gpu-{FAKE_GPU}.lock").is_file()


def test_two_shards_rerun_only_perplexity_and_merge_to_the_same_numbers(one_job_run):
    work, env, ppl = one_job_run
    _set_shards(work, 2)
    try:
        # the real run's plan: only the perplexity rules (no download, no one-job perplexity)
        assert planned_jobs(work, env, "--printshellcmds") == {"perplexity_shard": 2, "perplexity": 1}
        assert sorted(p.name for p in (work / RUN / "ppl" / "shards").iterdir()) == [
            "kivi4-g32-00000.json", "kivi4-g32-00001.json"]
        for name, one in ppl.items():
            merged = json.loads((work / RUN / "ppl" / name).read_text())
            assert_same_numbers(one, merged, name)
            assert one["seconds"] > 0 and merged["seconds"] > 0
        logs = work / "logs/perplexity/tiny-gpt2/random-words"
        assert f"claimed GPU {FAKE_GPU}" in (logs / "kivi4-g32-00001.log").read_text()
        assert "claimed GPU" not in (logs / "kivi4-g32.log").read_text()  # the merge needs no GPU
        assert planned_jobs(work, env) == {}
    finally:
        _set_shards(work, 1)
