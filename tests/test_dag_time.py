"""What the workflow runs while Snakemake builds its DAG (on every start, a no-op rerun too) imports
no torch: the method check is kvcore.compress.params' table, the one the method classes are built
from, so both ways give the same canonical parameters, or the same error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from kvcore.compress import family_class, parse_method, preset_spec
from kvcore.compress.params import FAMILIES, PARAMS, canonical_spec
from kvcore.errors import UsageError

# every method of the shipped configs, the grammar's examples and specs of every family
CONFIG_METHODS = [(name, spec) for path in [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
                  for name, spec in (yaml.safe_load(path.read_text()).get("methods") or {}).items()]
PRESETS = ["baseline", "int4-g64", "int2-g32-sym", "kivi2-g32-r128", "int4-g128-ch-s4-o0.01", "int2-g32-had",
           "kivi4-g64-kg128-f32-hadv", "int4-rot3-c", "int4-nuq", "int3-mx3", "sparse-0.5",
           "evict-knorm-0.5-s4-r64-global", "evict-kvzip-0.5-s4-model", "prune-l0,1-h5.2",
           "evict-kvzip-0.5-s4-model+int4-g32-had", "sparse-0.5+int4-g32", "evict-h2o-0.3+kivi2-r4", "prune"]
BASES = {"none": {}, "quant": {"bits": 4}, "sparsify": {}, "evict": {"scorer": "knorm"}, "prune": {"layers": [1]},
         "compose": {"first": "evict-knorm-0.5", "then": "int4-g32"}}
ODD_VALUES = [True, -1, 0, 2, 0.25, 0.75, 9.0, float("nan"), "", "x", "channel", "uniform", "model", "lloyd",
              "both", "hadamard", [0, 1], [[0, 1]], [[1]], {"family": "quant"}, "int4-g64-s4", None]


def spec_cases():
    cases = [*CONFIG_METHODS, *((name, None) for name in PRESETS)]
    for family, base in BASES.items():  # one key at a time set to an odd value, on a valid spec
        cases += [(f"m-{family}", {"family": family, **base, key: value})
                  for key in [*PARAMS[family], "bitz"] for value in ODD_VALUES]
    return cases


def outcome(make):
    try:
        return "ok", make()
    except UsageError as error:
        return "error", str(error)


def build(name, spec) -> dict:
    """The method's class built straight from the spec as the config gives it (a preset's merged in)."""
    full = preset_spec(name) if spec is None else spec if "family" in spec else {**preset_spec(name), **spec}
    return family_class(full["family"])(name, full).spec


def test_the_methods_are_built_from_the_table():
    assert FAMILIES == ("none", "quant", "sparsify", "evict", "prune", "compose")
    for family in FAMILIES:
        assert family_class(family).params is PARAMS[family]


def test_the_torch_free_check_and_the_constructor_agree():
    cases = spec_cases()
    both = {"ok": 0, "error": 0}
    for name, spec in cases:
        built = outcome(lambda: build(name, spec))
        checked = outcome(lambda: canonical_spec(name, spec))
        assert checked == built, (name, spec)
        assert checked == outcome(lambda: parse_method(name, spec).spec)
        both[checked[0]] += 1
    assert both["ok"] > 100 and both["error"] > 100  # both branches seen, many times


def test_a_config_entry_without_family_overrides_its_preset():
    assert canonical_spec("int4-g64", {"symmetric": True}) == parse_method("int4-g64", {"symmetric": True}).spec
    assert canonical_spec("evict-kvzip-0.5", {"sink_tokens": 4})["family"] == "evict"
    with pytest.raises(UsageError, match="missing key 'family'"):
        canonical_spec("mine", {"bits": 4})


BLOCKED = """
import sys
BLOCKED, tried = ("torch", "transformers", "matplotlib"), []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from snakemake.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    code = done.code
print("tried to import:", sorted(set(tried)))
sys.exit(code)
"""


@pytest.mark.parametrize("config", ["configs/tiny-test.yaml", "config.yaml", "configs/gpu-bench.yaml"])
def test_the_dag_builds_without_torch(config, tmp_path):
    """`snakemake -n` from an empty directory, with torch, transformers and matplotlib blocked."""
    done = subprocess.run([sys.executable, "-c", BLOCKED, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "--configfile", str(REPO / config), "--dry-run", "--cores", "1"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "tried to import: []" in done.stdout
    assert "extract" in done.stdout and "perplexity" in done.stdout and "This was a dry-run" in done.stdout


def test_dag_bench_prints_its_table(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dag_bench.py"), "--config", "configs/tiny-test.yaml",
                           "--repeats", "1"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "measurement" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| python -c pass", "| snakemake -n, empty Snakefile (floor)", f"| {REPO.name} configs/tiny-test.yaml: dry run"]
