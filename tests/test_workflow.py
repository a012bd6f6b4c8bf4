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
            assert len(list(run.glob("kv/layer=*/part-*.parquet"))) == 2 * 2  # layers x shards
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
    snakemake(workdir, "--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    assert len(html) > 100_000 and "layer_statistics" in html and "compression_tradeoff" in html
