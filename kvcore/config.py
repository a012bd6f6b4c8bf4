"""Check a workflow configuration and explain the first problem in one line.

The Snakefile validates with Snakemake's `validate` (JSON Schema, which also fills in
defaults); when that fails it asks `explain` for a message that names the key. Method
parameters are then checked against the compression library's parameter table, so a bad
method fails before any job runs.
"""

from __future__ import annotations

import math
from pathlib import Path

from kvcore.errors import UsageError

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | Path = SCHEMA) -> dict:
    from kvcore.inputs import read_yaml

    return read_yaml(path, "schema")


def load(path: str | Path) -> dict:
    """A config file as a dict: missing, binary, bad YAML or a duplicate key is one UsageError line."""
    from kvcore.inputs import read_yaml

    config = read_yaml(path, "config file")
    if not isinstance(config, dict):
        raise UsageError(f"config file {path}: expected a mapping of settings (got {type(config).__name__})")
    return config


def check_files(paths) -> None:
    """Read each config file as `load` does: Snakemake's YAML reader keeps a repeated key's last value
    silently, so the workflow rereads its config files to refuse them."""
    for path in paths:
        load(path)


def _non_finite(node, where=()):
    """(dotted path, value) of the first nan/inf in a config, or None: JSON Schema's bounds
    let nan through (it compares false with every bound)."""
    if isinstance(node, float) and not math.isfinite(node):
        return ".".join(map(str, where)) or "(top level)", node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        found = _non_finite(child, (*where, key))
        if found:
            return found
    return None


def _where(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _leaf(error):
    """The most specific error: dig into if/then and oneOf branches to the failing key."""
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def explain(config, schema: dict | None = None, what: str = "config") -> str | None:
    """One line naming the first invalid key, or None when the config is valid. With another
    `schema`, any JSON-like document's shape is checked the same way (`what` names it)."""
    import jsonschema

    schema = schema or load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (-len(e.absolute_path), e.path))
    if not errors:
        return None
    error = _leaf(jsonschema.exceptions.best_match(errors) or errors[0])
    where = _where(error)
    if error.validator == "additionalProperties":
        allowed = sorted((error.schema.get("properties") or {}).keys())
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"{what}: unknown key under {where}: {error.message.split('(')[-1].rstrip(')')}{hint}"
    if error.validator == "enum":
        return f"{what}: {where} must be one of {', '.join(map(str, error.validator_value))} (got {error.instance!r})"
    return f"{what}: {where}: {error.message}"


def check_methods(config: dict) -> None:
    """Validate every method's parameters against the table the methods are built from
    (kvcore.compress.params: no torch import while the workflow builds its DAG)."""
    from kvcore.compress.params import canonical_spec

    for name, spec in (config.get("methods") or {}).items():
        canonical_spec(name, spec)


def expand_models(config: dict) -> None:
    """Replace each model given as a string (a hub id or a directory) by its explicit spec, in place,
    so the workflow and the library read one form."""
    from kvcore.sources.model_ids import shorthand_spec

    models = config.get("models") or {}
    for name, spec in models.items():
        if isinstance(spec, str):
            models[name] = shorthand_spec(spec, f"models.{name}")


def check(config: dict) -> None:
    """Raise UsageError with one line if the config is invalid; model shorthands are expanded in place."""
    found = _non_finite(config)
    if found:
        raise UsageError(f"config: {found[0]} must be a finite number (got {found[1]})")
    problem = explain(config)
    if problem:
        raise UsageError(problem)
    expand_models(config)
    check_methods(config)
    pp = config["perplexity"]
    if pp["stride"] > pp["max_length"]:
        raise UsageError(f"config: perplexity.stride ({pp['stride']}) must not exceed perplexity.max_length "
                         f"({pp['max_length']})")
    shards = pp.get("shards", 1)
    if shards > 1:  # max_tokens bounds the windows a dataset gives; a shard beyond them would idle
        from kvcore.evaluation.windows import layout_windows

        max_tokens = pp.get("max_tokens", 8192)
        n_windows = len(layout_windows(max_tokens, pp["max_length"], pp["stride"], pp.get("layout", "sliding")))
        if shards > n_windows:
            raise UsageError(f"config: perplexity.shards ({shards}) exceeds the {n_windows} windows of "
                             f"max_tokens={max_tokens} (max_length {pp['max_length']}, stride {pp['stride']})")
