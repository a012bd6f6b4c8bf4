"""H2O (heavy hitters), as kvpress's observed-attention press scores it.

A token's score is the attention it received from every later context query, divided
by the number of queries that could see it (so early tokens are not favoured just for
being seen more often), averaged over the query heads of its KV head.
"""

from kvcore.eviction.base import Scorer


class H2O(Scorer):
    name = "h2o"
    queries = "context"
    budget = "model"

    def score(self, inputs):
        return inputs.attention.mean().mean(dim=2)
