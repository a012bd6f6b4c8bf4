"""SnapKV: attention from an observation window of the last context tokens, pooled.

The last `window` queries of the context vote: their attention to each token is
averaged over the window, smoothed along the sequence with an average pool of width
`kernel` (so neighbours of a hit survive together), and averaged over the query heads
of each KV head. The window's own tokens get the maximum score, so they are always kept
(as in SnapKV and kvpress).
"""

import torch.nn.functional as F

from kvcore.eviction.base import Scorer


class SnapKV(Scorer):
    name = "snapkv"
    queries = "window"
    budget = "model"
    defaults = {"window": 64, "kernel": 5}

    def score(self, inputs):
        att = inputs.attention
        n, h, g, seq = att.sum.shape
        window = min(self.window, seq)
        scores = att.sum / window  # mean over the window queries
        pooled = F.avg_pool1d(scores.reshape(n * h * g, 1, seq), kernel_size=self.kernel,
                              padding=self.kernel // 2, stride=1)[..., :seq]
        scores = pooled.reshape(n, h, g, seq).mean(dim=2)
        scores[..., seq - window:] = scores.max()
        return scores
