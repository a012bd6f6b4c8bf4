"""Which kvcore source files a module depends on, so a rule reruns when they change.

Snakemake does not notice edits to an imported package; each rule declares the files of
the kvcore modules it uses (transitively, from their import statements) as inputs.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def _module_file(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for candidate in (PACKAGE_DIR / rel.with_suffix(".py"), PACKAGE_DIR / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# Read with regular expressions, not `ast.parse`: the workflow reads the imports of some 60 files
# while it builds its DAG (a no-op rerun too), and parsing their whole syntax trees took 0.2-0.4 s of
# it. tests/test_imports.py compares this with an ast walk of every kvcore file.
# Triple-quoted strings (docstrings) are blanked first: an import statement inside one is an example.
_TRIPLE_QUOTED = re.compile(r'""".*?"""|\'\'\'.*?\'\'\'', re.S)
# An import statement at the start of a line: `import a.b as c, d` or `from ..a import (x, y)`
_IMPORT = re.compile(r"^[ \t]*(?:import[ \t]+(?P<modules>[^#;\n]+)"
                     r"|from[ \t]+(?P<dots>\.*)(?P<base>[\w.]*)[ \t]+import[ \t]+(?P<names>\([^)]*\)|[^#;\n]+))", re.M)


def _names(listed: str) -> list[str]:
    """`a.b as c, d` or `(x,\n y as z,)` -> the imported names [a.b, d] / [x, y]."""
    return [item.split()[0] for item in listed.strip().strip("()").split(",") if item.strip()]


@lru_cache(maxsize=None)  # each file read once per process (the workflow asks for many rules' files)
def file_imports(path: Path, module: str) -> frozenset[str]:
    """The kvcore modules (and `module.name` of every name taken from one) that the file of
    `module` imports, lazy imports inside functions included."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for m in _IMPORT.finditer(_TRIPLE_QUOTED.sub('""', path.read_text())):
        if m["modules"] is not None:
            found.update(_names(m["modules"]))
            continue
        base = m["base"]
        if m["dots"]:  # relative import
            parts = package.split(".")[: len(package.split(".")) - len(m["dots"]) + 1]
            base = ".".join(parts + ([base] if base else []))
        found.add(base)
        found.update(f"{base}.{name}" for name in _names(m["names"]))
    # The package root only holds lazy re-exports and the version: not a code dependency.
    return frozenset(m for m in found if m.startswith("kvcore."))


@lru_cache(maxsize=None)
def module_files(*modules: str) -> tuple[str, ...]:
    """Source files of `modules` and every kvcore module they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen[module] = path
        todo.extend(file_imports(path, module))
    return tuple(sorted(str(p) for p in set(seen.values())))


def method_modules(method: str, spec: dict | None) -> list[str]:
    """The modules a method's jobs load lazily, found without importing torch: its family in
    kvcore.compress and, for eviction, its scorer (imports alone miss them)."""
    from kvcore.compress.params import canonical_spec
    from kvcore.errors import UsageError

    spec = canonical_spec(method, spec)
    family = spec["family"]
    modules = [f"kvcore.compress.{'identity' if family == 'none' else family}"]
    if family == "compose":  # its parts, the first (evict's scorer) last
        for part in (spec["then"], spec["first"]):
            modules += method_modules(method, part)
        return list(dict.fromkeys(modules))
    if family == "evict":
        from kvcore.eviction import SCORERS

        if spec["scorer"] not in SCORERS:
            raise UsageError(f"method {method!r}: scorer must be one of {', '.join(SCORERS)} "
                             f"(got {spec['scorer']!r})")
        modules.append(f"kvcore.eviction.{spec['scorer']}")
    return modules
