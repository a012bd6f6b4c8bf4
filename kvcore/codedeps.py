"""Which kvcore source files a module depends on, so a rule reruns when they change.

Snakemake does not notice edits to an imported package; each rule declares the files of
the kvcore modules it uses (transitively, from their import statements) as inputs.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _module_file(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for candidate in (PACKAGE_DIR / rel.with_suffix(".py"), PACKAGE_DIR / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _statements(nodes):
    """Every statement, nested ones too (imports are statements: no need to walk the expressions)."""
    for node in nodes:
        yield node
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, block, ()))


@lru_cache(maxsize=None)  # each file parsed once per process (the workflow asks for many rules' files)
def _imports(path: Path, module: str) -> frozenset[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
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
        todo.extend(_imports(path, module))
    return tuple(sorted(str(p) for p in set(seen.values())))


def method_modules(method: str, spec: dict | None) -> list[str]:
    """The modules a method's jobs load lazily, found without importing torch: its family in
    kvcore.compress and, for eviction, its scorer (imports alone miss them)."""
    from kvcore.compress.presets import preset_spec
    from kvcore.errors import UsageError

    if spec is None or "family" not in spec:
        spec = {**preset_spec(method), **(spec or {})}
    family = spec.get("family", "none")
    modules = [f"kvcore.compress.{'identity' if family == 'none' else family}"]
    if family == "compose":  # its parts, the first (evict's scorer) last
        then, first = (spec.get(k) for k in ("then", "first"))
        for part in (then, first):
            modules += method_modules(part, None) if isinstance(part, str) else method_modules(method, part or {})
        return list(dict.fromkeys(modules))
    if family == "evict":
        from kvcore.eviction import SCORERS

        if spec.get("scorer") not in SCORERS:
            raise UsageError(f"method {method!r}: scorer must be one of {', '.join(SCORERS)} "
                             f"(got {spec.get('scorer')!r})")
        modules.append(f"kvcore.eviction.{spec['scorer']}")
    return modules
