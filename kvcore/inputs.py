"""Read the files users hand to kvcore (text, YAML, JSON): every failure is one UsageError line.

A Parquet or safetensors file given where text is expected, a YAML mapping that names a
key twice (YAML keeps the last silently) or JSON that does not parse is the user's
mistake, named with the file and what was expected, never a traceback.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from kvcore.errors import UsageError


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; `what` names it in errors (e.g. '--text-file')."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         f"is it a binary file such as Parquet or safetensors?") from None


def read_json(path: str | Path, what: str = "file"):
    """The parsed JSON of `path` (any shape: the caller checks the shape it needs)."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


@functools.cache  # yaml is imported on first use, so `kvcore --help` stays instant
def _strict_loader(fast: bool):
    import yaml

    class StrictLoader(yaml.CSafeLoader if fast else yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` overrides are meant to repeat keys
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable key: SafeLoader reports it
                    break
                if first is not key_node:
                    raise UsageError(f"{self.name}: duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                     f"(first at line {first.start_mark.line + 1}); give each key once")
            return super().construct_mapping(node, deep)

    return StrictLoader


def _load(text: str, name: str, fast: bool):
    loader = _strict_loader(fast)(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_yaml(text: str, name: str = "<string>"):
    """YAML text as Python objects, refusing duplicate keys (yaml.YAMLError for bad syntax).

    Read by libyaml where PyYAML has it (4x faster: the workflow reads its schema and config on
    every start); a document it refuses is read again by PyYAML's own parser, whose error names
    the file and shows the line."""
    import yaml

    if not getattr(yaml, "__with_libyaml__", False):
        return _load(text, name, fast=False)
    try:
        return _load(text, name, fast=True)
    except yaml.YAMLError:
        return _load(text, name, fast=False)


def read_yaml(path: str | Path, what: str = "file"):
    """The parsed YAML of `path`: a missing file, binary data, bad syntax or a duplicate key is one line."""
    import yaml

    try:
        return parse_yaml(read_text(path, what), str(path))
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} {path} is not valid YAML: {exc}") from None
