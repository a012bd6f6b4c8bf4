"""Wall-clock timing of a block, device synchronised (CUDA runs asynchronously)."""

from __future__ import annotations

import time


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """`with Timer(device) as t: ...` then `t.seconds`."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
