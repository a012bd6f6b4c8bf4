"""KVzip: query-agnostic scoring by context reconstruction (Kim et al. 2025, arXiv 2505.23416).

After the context is prefilled, the model is asked to repeat it: a reconstruction pass
feeds, for each chunk of the context,

    "\\n\\nRepeat the previous context exactly."            (first chunk)
    "\\n\\nRepeat the part of the previous context exactly, starting with" + the
    last 8 tokens of the previous chunk                   (later chunks)

then the assistant-turn opening of the model's own chat template (a plain "\\n" for a
tokenizer without one), then the chunk itself, all against the cache at the positions
that follow the context. A cached token's score is the maximum attention it receives
from any of those queries, over the query heads of its KV head (KVzip's max over the
GQA group and the queries). The reconstruction pass's own entries are dropped from the
cache afterwards. KVzip keeps sink tokens (kvpress: 4) and, with budget `global`, uses one
threshold across the heads of a layer.

Chunks are at most `chunk_size` tokens and never reach past the model's position limit.
The softmax is over every cached key (the whole context plus the pass so far), where
KVzip restricts keys to the chunk and the sinks for speed; with one chunk (any context up
to `chunk_size` tokens) the two are the same.
"""

from __future__ import annotations

import torch

from kvcore.eviction.base import Scorer

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
PREV_TAIL = 8


def template_suffix(tokenizer) -> str:
    """What the model's chat template puts between a user message and the assistant's reply."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False)
    return text.split(separator, 1)[1]


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class KVzip(Scorer):
    name = "kvzip"
    queries = "repeat"
    budget = "model"
    defaults = {"chunk_size": 2048}

    def reconstruction_chunks(self, tokenizer, context_ids: torch.Tensor, room: int | None = None) -> list[torch.Tensor]:
        """[1, m] id tensors, one reconstruction pass each, for context_ids [1, seq].

        `room`: how many positions are left after the context (the model's limit); chunks
        shrink so that every pass fits.
        """
        first, nxt = encode(tokenizer, FIRST_PROMPT), encode(tokenizer, NEXT_PROMPT)
        suffix = encode(tokenizer, template_suffix(tokenizer))
        overhead = max(len(first), len(nxt) + PREV_TAIL) + len(suffix)
        size = self.chunk_size if room is None else min(self.chunk_size, room - overhead)
        if size < 1:
            from kvcore.errors import UsageError

            raise UsageError(f"kvzip: no room for a reconstruction pass within the model's {room} free positions")
        ids = context_ids[0].tolist()
        out = []
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            prompt = first if start == 0 else nxt + ids[max(0, start - PREV_TAIL):start]
            out.append(torch.tensor([prompt + suffix + chunk], dtype=torch.long, device=context_ids.device))
        return out

    def score(self, inputs):
        return inputs.attention.max.amax(dim=2)
