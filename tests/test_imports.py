"""Imports run one way: no kvcore module imports another that imports it back (directly or
through others), and no module anywhere imports another module's underscore names."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

CHECKED = ["kvcore", "benchmarks", "tests", "workflow/scripts"]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = REPO / Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def kvcore_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported kvcore module, names taken from it) for every import in the file, lazy ones too."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("kvcore")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("kvcore"):
                continue
            names = [a.name for a in node.names]
            plain = [n for n in names if not is_module(f"{base}.{n}")]
            if plain:  # names defined in `base` itself (not its submodules)
                out.append((base, plain))
            out += [(f"{base}.{n}", []) for n in names if is_module(f"{base}.{n}")]
    return out


def files():
    for top in CHECKED:
        yield from sorted((REPO / top).rglob("*.py"))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_underscore_names():
    found = []
    for path in files():
        tree = ast.parse(path.read_text())
        modules = {}  # local name -> kvcore module bound to it
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvcore"):
                for a in node.names:
                    if private(a.name):
                        found.append(f"{path.relative_to(REPO)}: from {node.module} import {a.name}")
                    elif is_module(f"{node.module}.{a.name}"):
                        modules[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("kvcore") and a.asname:
                        modules[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and private(node.attr):
                found.append(f"{path.relative_to(REPO)}: {modules[node.value.id]}.{node.attr}")
    assert not found, "underscore names used across modules:\n" + "\n".join(found)


def test_no_import_cycles_inside_kvcore():
    graph = {}
    for path in sorted((REPO / "kvcore").rglob("*.py")):
        me = module_name(path)
        if me == "kvcore":  # the package root only holds the version and lazy re-exports for users
            continue
        graph[me] = {m for m, _ in kvcore_imports(path) if is_module(m) and m != me}

    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_what_it_must(tmp_path):
    """The cycle walk finds the evaluation package's own imports (a guard against checking nothing)."""
    graph = {m for m, _ in kvcore_imports(REPO / "kvcore" / "evaluation" / "protocols.py")}
    assert {"kvcore.evaluation.context", "kvcore.evaluation.prefill"} <= graph


def test_rules_and_scripts_reach_kvcore_only_through_kvcore_jobs():
    import re

    found = []
    for path in sorted((REPO / "workflow").rglob("*.smk")) + [REPO / "Snakefile"]:
        for line in path.read_text().splitlines():
            match = re.match(r"\s*(?:from|import)\s+(kvcore[\w.]*)", line)
            if match and not (match[1] + ".").startswith("kvcore.jobs."):
                found.append(f"{path.relative_to(REPO)}: {line.strip()}")
    for path in sorted((REPO / "workflow" / "scripts").glob("*.py")):
        found += [f"{path.relative_to(REPO)}: {m}" for m, _ in kvcore_imports(path)
                  if not (m + ".").startswith("kvcore.jobs.")]
    assert not found, "rule files and scripts import kvcore only through kvcore.jobs:\n" + "\n".join(found)


def test_the_library_imports_neither_jobs_nor_cli():
    """Imports run one way: cli/ and jobs/ call the library, never the reverse."""
    found = []
    for path in sorted((REPO / "kvcore").rglob("*.py")):
        me = module_name(path)
        if me.startswith(("kvcore.cli", "kvcore.jobs")) or me in ("kvcore", "kvcore.__main__"):
            continue
        found += [f"{me}: {m}" for m, _ in kvcore_imports(path) if m.startswith(("kvcore.cli", "kvcore.jobs"))]
    assert not found, "library modules importing cli/ or jobs/:\n" + "\n".join(found)


def test_the_workflows_dag_time_helpers_import_neither_torch_nor_matplotlib():
    """Snakemake imports kvcore.jobs.rules to build its DAG on every start (a no-op rerun too):
    torch and matplotlib each cost a second or more there."""
    import subprocess
    import sys

    code = ("import sys, kvcore.jobs.rules as r; r.scores_with_model('k', {'family': 'evict', 'scorer': 'kvzip'}); "
            "r.code_files('plots_results'); r.code_files('compress', 'int4-g64', None); "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def ast_imports(path: Path, module: str) -> set[str]:
    """The reference for kvcore.codedeps.file_imports: every import node of the file's syntax tree."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("kvcore.")}


def test_codedeps_finds_the_imports_an_ast_walk_finds(tmp_path):
    """codedeps reads import statements with regular expressions (the workflow reads some 60 files
    while it builds its DAG): the same modules as the syntax tree, for every kvcore file and for
    the awkward forms."""
    from kvcore.codedeps import file_imports

    for path in sorted((REPO / "kvcore").rglob("*.py")):
        assert file_imports(path, module_name(path)) == ast_imports(path, module_name(path)), path
    awkward = tmp_path / "mod.py"
    awkward.write_text('''"""Docs: an example, not an import:

    from kvcore.plots import draw
"""
import kvcore.gpus as gpus, kvcore.errors
from . import atomic  # a comment: import kvcore.stats
from .sources import (
    datasets,
    models as m,
)


def lazy():
    from ..query import run
    x = """
import kvcore.report
"""
    return x
''')
    found = file_imports(awkward, "kvcore.jobs.mod")
    assert found == ast_imports(awkward, "kvcore.jobs.mod") == {
        "kvcore.gpus", "kvcore.errors", "kvcore.jobs", "kvcore.jobs.atomic", "kvcore.jobs.sources",
        "kvcore.jobs.sources.datasets", "kvcore.jobs.sources.models", "kvcore.query", "kvcore.query.run"}
