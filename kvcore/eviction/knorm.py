"""Knorm: keep the tokens whose keys have the smallest L2 norm (kvpress KnormPress).

Low-norm keys tend to draw high attention, so the score is minus the key norm.
"""

from kvcore.eviction.base import Scorer


class KNorm(Scorer):
    name = "knorm"

    def score(self, inputs):
        return -inputs.keys.float().norm(dim=-1)
