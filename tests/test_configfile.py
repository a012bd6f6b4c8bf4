"""`--configfile` replaces the embedded default instead of merging into it."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dry_run(*args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "--quiet", "all", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def test_configfile_replaces_the_default_run():
    text = dry_run("--configfile", "configs/tiny-test.yaml", "--summary")
    assert "results/tiny-llama/random-words" in text
    # the default's model and corpora must not join a run that names its own config
    assert "smollm2-135m" not in text and "lee-news" not in text
