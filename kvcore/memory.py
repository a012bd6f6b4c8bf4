"""Handing freed host memory back to the OS (glibc keeps freed heap pages for reuse)."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (call it with 0), or None off Linux/glibc."""
    import ctypes

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError, ValueError):
            return ctypes.CDLL(None).malloc_trim
    return None


def release_host_memory() -> None:
    """After a phase that held large temporaries (a model, its activations): collect cycles, drop
    torch's cached GPU blocks, and return the freed heap pages, so that the next phase's peak RSS
    does not stack on this one's."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    trim = malloc_trim()
    if trim is not None:
        trim(0)
