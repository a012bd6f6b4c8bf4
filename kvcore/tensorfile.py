"""Write safetensors files whose bytes depend only on their content.

safetensors orders the `__metadata__` map as a hash map does, so the same tensors and
metadata give different bytes from one process to the next. After writing, the JSON
header is rewritten with sorted keys (same length, padded with spaces as the format
allows), so identical runs produce byte-identical files.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from kvcore.errors import KvcoreError


def canonicalize_header(path: str | Path) -> None:
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(
            sorted(header.items()))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen: same content, compact separators
            raise KvcoreError(f"{path}: canonical safetensors header is longer than the original")
        fh.seek(8)
        fh.write(text.ljust(n, b" "))


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file with a deterministic header; write errors become one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
        canonicalize_header(path)
    except (OSError, SafetensorError) as exc:  # disk full, file too large, ...
        raise KvcoreError(f"cannot write {path}: {exc}") from None
