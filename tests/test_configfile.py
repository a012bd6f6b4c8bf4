"""The config file: `--configfile` replaces the embedded default instead of merging into it; the schema
describes every key."""

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


def test_every_key_of_the_config_schema_has_a_description():
    """Each property the schema declares says what it means; `{}` only re-allows, inside an if/then
    branch, a key described above, and the `if:` conditions are no keys of their own."""
    from kvcore.config import load_schema

    missing = []

    def walk(node, where):
        if isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}[{i}]")
        if not isinstance(node, dict):
            return
        for key, prop in (node.get("properties") or {}).items():
            if prop != {} and not (isinstance(prop.get("description"), str) and prop["description"].strip()):
                missing.append(f"{where}.properties.{key}")
        for key, child in node.items():
            if key != "if":
                walk(child, f"{where}.{key}")

    schema = load_schema()
    walk(schema, "")
    assert "description" in schema["properties"]["extract"]["properties"]["seq_len"]  # the walk reaches the keys
    assert not missing, "schema keys without a description:\n" + "\n".join(missing)
