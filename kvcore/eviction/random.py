"""Random: a seeded uniform score per token, the floor every scorer must beat."""

import torch

from kvcore.eviction.base import Scorer


class Random(Scorer):
    name = "random"

    def score(self, inputs):
        n, h, seq, _ = inputs.keys.shape
        return torch.rand((n, h, seq), generator=inputs.generator).to(inputs.keys.device)
