"""StreamingLLM: attention sinks plus the most recent tokens.

The score is the token's position, so the shared top-k keeps the latest tokens; the
sinks are the evict method's `sink_tokens` (StreamingLLM uses 4).
"""

import torch

from kvcore.eviction.base import Scorer


class StreamingLLM(Scorer):
    name = "streamingllm"

    def score(self, inputs):
        n, h, seq, _ = inputs.keys.shape
        return torch.arange(seq, dtype=torch.float32, device=inputs.keys.device).expand(n, h, seq)
