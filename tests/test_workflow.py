"""The whole Snakemake DAG on the tiny config, then what reruns after each kind of edit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = SNAKEMAKE + ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
                       "--cores", "2", "--resources", "gpu=1", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def planned_jobs(workdir: Path) -> dict[str, int]:
    """{rule: count} that a dry run would execute."""
    out = snakemake(workdir, "--dry-run").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M))
    jobs.pop("total", None)
    return {rule: int(n) for rule, n in jobs.items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    shutil.copy(REPO / "configs" / "tiny-test.yaml", work / "config.yaml")
    snakemake(work)
    return work


def test_the_workflow_produces_every_output(workdir):
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    for model in config["models"]:
        for dataset in config["datasets"]:
            run = workdir / "results" / model / dataset
            assert (run / "metadata.json").is_file() and (run / "predictions.parquet").is_file()
            # one Parquet file per layer; the shards' parts were temp() and are gone
            assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*.parquet") if "layer=" in str(p)) \
                == ["kv/layer=0/data.parquet", "kv/layer=1/data.parquet"]
            assert (run / "ppl" / "baseline.json").is_file() and (run / "ppl" / "kivi4-g32.json").is_file()
            assert (run / "compress" / "kivi4-g32.safetensors").is_file()
            assert (run / "report.md").is_file() and len(list(run.glob("plots/*.png"))) >= 10
    assert (workdir / "results" / "report.md").is_file() and (workdir / "results" / "summary.parquet").is_file()


def test_a_second_run_does_nothing(workdir):
    assert planned_jobs(workdir) == {}


# Perplexity jobs, and only the plots and reports that read their results.
PERPLEXITY_AND_READERS = {"all": 1, "perplexity": 4, "plots_results": 2, "run_report": 2, "grid_report": 1,
                          "perplexity_table": 1}


def test_changing_the_stride_reruns_only_perplexity(workdir):
    config_path = workdir / "config.yaml"
    original = config_path.read_text()
    config = yaml.safe_load(original)
    config["perplexity"]["stride"] = 16
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        assert planned_jobs(workdir) == PERPLEXITY_AND_READERS
    finally:
        config_path.write_text(original)


def test_editing_a_perplexity_module_reruns_only_perplexity(workdir):
    # Snakemake skips inputs whose checksum is unchanged, so a bare `touch` is (rightly) not an
    # edit: change the content, then put the file back exactly as it was.
    module = REPO / "kvcore" / "evaluation" / "protocols.py"
    text, before = module.read_text(), module.stat()
    module.write_text(text + "\n# edited by tests/test_workflow.py\n")
    try:
        assert planned_jobs(workdir) == PERPLEXITY_AND_READERS
    finally:
        module.write_text(text)
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert planned_jobs(workdir) == {}


def test_an_invalid_config_fails_before_any_job_naming_the_key(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    config["extract"]["seq_lenght"] = 64
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "--dry-run", check=False)
    assert done.returncode != 0
    assert "unknown key under extract: 'seq_lenght'" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_snakemake_report_builds_the_html(workdir):
    import base64

    snakemake(workdir, "--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "layer_statistics" in html and "compression_tradeoff" in html
    # the perplexity and compression tables and the summary are inside, each as an HTML table of its rows
    embedded = {name: base64.b64decode(data).decode() for name, data in
                re.findall(r"data:text/html;charset=utf8;filename=([\w.]+);base64,([A-Za-z0-9+/=]+)", html)}
    for name, row in (("perplexity.html", "kivi4-g32"), ("compression.html", "kivi4-g32"),
                      ("summary.html", "kivi4-g32")):
        assert "<table" in embedded[name] and row in embedded[name], name
    assert "fake-quant" in embedded["perplexity.html"] and "tiny-llama" in embedded["summary.html"]


# --- reruns exactly right, every output declared (issue 17) -----------------------------------------------

def edited_config(workdir: Path, edit) -> str:
    """Apply `edit` to the workdir's config (a dict), write it back; returns the original text."""
    path = workdir / "config.yaml"
    original = path.read_text()
    config = yaml.safe_load(original)
    config = edit(config) or config
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return original


def reversed_keys(value):
    """Every mapping of `value` with its keys in reverse order."""
    if isinstance(value, dict):
        return {k: reversed_keys(value[k]) for k in reversed(list(value))}
    return [reversed_keys(v) for v in value] if isinstance(value, list) else value


def test_reordered_config_keys_plan_no_job(workdir):
    original = edited_config(workdir, reversed_keys)
    try:
        assert planned_jobs(workdir) == {}
        (workdir / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(original)))  # sorted keys
        assert planned_jobs(workdir) == {}
    finally:
        (workdir / "config.yaml").write_text(original)


def test_adding_a_method_redraws_no_cache_plot_and_no_statistics(workdir):
    def add(config):
        config["methods"]["int8"] = {**config["methods"]["kivi4-g32"], "bits": 8}

    original = edited_config(workdir, add)
    try:
        assert planned_jobs(workdir) == {"all": 1, "compress": 2, "perplexity": 2, "plots_results": 2,
                                         "run_report": 2, "grid_report": 1, "perplexity_table": 1,
                                         "compression_table": 1}
    finally:
        (workdir / "config.yaml").write_text(original)


def test_every_file_the_workflow_writes_is_a_declared_output(workdir):
    listed = snakemake(workdir, "--summary").stdout.splitlines()
    declared = {line.split("\t")[0] for line in listed[1:] if line.strip()}
    written = {str(p.relative_to(workdir)) for top in ("results", "resources") for p in (workdir / top).rglob("*")
               if p.is_file()}
    # a directory output (the model) declares the files inside it
    undeclared = {f for f in written if f not in declared and not any(f.startswith(d + "/") for d in declared)}
    assert undeclared == set()
    run = "results/tiny-gpt2/random-words"
    assert {f"{run}/kv/layer={layer}/data.parquet" for layer in (0, 1)} <= declared
    assert "resources/models/tiny-gpt2" in declared
    would_delete = snakemake(workdir, "--delete-all-output", "--dry-run").stdout
    assert f"Would delete {run}/kv/layer=1/data.parquet" in would_delete


def test_deleting_one_parquet_layer_file_reruns_what_produces_it(workdir):
    """finalize_extraction wrote it from the extract jobs' temp() parts, gone since: those jobs run again."""
    part = workdir / "results" / "tiny-llama" / "random-words" / "kv" / "layer=1" / "data.parquet"
    aside = workdir / "aside.parquet"
    part.rename(aside)  # a rename keeps the file's time, so putting it back changes nothing
    try:
        out = snakemake(workdir, "--dry-run").stdout
        jobs = planned_jobs(workdir)
        assert jobs["finalize_extraction"] == 1 and jobs["extract"] == 2  # that run's two shards
        assert "tokenize" not in jobs and "download_model" not in jobs
        assert "Missing output files: results/tiny-llama/random-words/kv/layer=1/data.parquet" in out
    finally:
        aside.rename(part)
    assert planned_jobs(workdir) == {}


@pytest.fixture
def copy_of(workdir, tmp_path):
    """A copy of the finished run (times and Snakemake's records kept), for edits that run jobs."""
    work = tmp_path / "copy"
    shutil.copytree(workdir, work, symlinks=True)
    assert planned_jobs(work) == {}
    return work


def test_a_removed_method_leaves_every_report(copy_of):
    def remove(config):
        del config["methods"]["kivi4-g32"]

    edited_config(copy_of, remove)
    snakemake(copy_of)
    results = copy_of / "results"
    assert (results / "tiny-gpt2" / "random-words" / "ppl" / "kivi4-g32.json").is_file()  # left on disk, unread
    reports = [results / "report.md", results / "perplexity.md", results / "compression.md",
               *results.glob("*/*/report.md")]
    for path in reports:
        assert "kivi4-g32" not in path.read_text(), path
    import pyarrow.parquet as pq

    assert set(pq.read_table(results / "summary.parquet").column("method").to_pylist()) == {"baseline"}


def test_a_run_with_fewer_shards_reads_only_its_own(copy_of):
    import json

    import pyarrow.parquet as pq

    def one_shard(config):
        config["extract"]["n_sequences"] = 4  # shard_size 4: shard 00001 of the earlier run is left behind

    edited_config(copy_of, one_shard)
    snakemake(copy_of)
    run = copy_of / "results" / "tiny-gpt2" / "random-words"
    assert (run / "kv" / "part-00001.safetensors").is_file() and (run / "shards" / "kv-00001.json").is_file()
    meta = json.loads((run / "metadata.json").read_text())
    assert (meta["n_shards"], meta["shards"], meta["n_sequences"], meta["n_tokens"]) == (1, [0], 4, 4 * 32)
    assert set(pq.read_table(run / "predictions.parquet").column("seq_id").to_pylist()) == {0, 1, 2, 3}
    assert set(pq.read_table(run / "stats" / "heads.parquet").column("n_tokens").to_pylist()) == {4 * 32}
    assert "4 sequences, 128 tokens" in (run / "report.md").read_text()


def test_snakemake_lint_is_clean(workdir):
    done = snakemake(workdir, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in done.stdout + done.stderr


def test_the_rule_files_are_snakefmt_formatted():
    """`snakefmt --check` (its settings in pyproject.toml) passes on every rule file and the Snakefile."""
    done = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "workflow/", "Snakefile"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
