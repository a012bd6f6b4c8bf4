"""The spellings of a model that are not a prepared name: a hub id or a directory (no kvcore imports
beyond errors, so the config checker and the resolver both use it without a cycle)."""

from __future__ import annotations

import re
from pathlib import Path

from kvcore.errors import UsageError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
FORMS = "a model directory (with config.json) or a hub id org/name[@revision]"


def hub_spec(text: str) -> tuple[str, dict] | None:
    """(prepared name, `source: hf` spec) of a hub id, or None when `text` is not one."""
    match = HUB_ID.fullmatch(text)
    if not match:
        return None
    spec = {"source": "hf", "repo_id": match["repo"]}
    name = match["repo"].replace("/", "--")
    if match["revision"]:
        spec["revision"] = match["revision"]
        name += f"@{match['revision']}"
    return name, spec


def shorthand_spec(text: str, where: str) -> dict:
    """The explicit spec of a config entry written as a string: a directory or a hub id."""
    if Path(text).expanduser().is_dir():
        return {"source": "local", "path": text}
    hub = hub_spec(text)
    if hub is None:
        raise UsageError(f"config: {where} must be {FORMS}, or a mapping with `source:` (got {text!r})")
    return hub[1]
