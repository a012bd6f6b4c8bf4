"""Score a given continuation after a given prompt, with and without compression.

One window holding prompt + continuation whose scored tokens are the continuation's,
evaluated by `protocols.evaluate_methods` (the perplexity protocols themselves):
`fake-quant` runs one forward whose every cache write is compressed; `prefill-compress`
prefills the prompt, compresses all of it, scores the continuation's first token from the
prefill's last logits and the rest against the compressed prompt (the old pruning
simulator's --prompt/--continuation).
"""

from __future__ import annotations

import math

from kvcore.errors import UsageError
from kvcore.evaluation.protocols import evaluate_methods
from kvcore.evaluation.windows import Window


def continuation_summary(summary: dict) -> dict:
    nll, n = summary["nll_sum"], summary["n_scored"]
    return {"nll_sum": nll, "mean_nll": nll / n, "perplexity": math.exp(nll / n), "n_scored": n}


def score_continuation(model, prompt_ids: list[int], continuation_ids: list[int], methods: dict, *,
                       protocol: str, tokenizer=None, device: str = "cpu", options: dict | None = None) -> dict:
    """NLL and perplexity of `continuation_ids` after `prompt_ids`: the baseline and each
    method of `methods` (name -> Method) under `protocol`."""
    if not prompt_ids or not continuation_ids:
        raise UsageError(f"scoring needs a non-empty prompt and continuation (got {len(prompt_ids)} and "
                         f"{len(continuation_ids)} tokens)")
    ids = list(prompt_ids) + list(continuation_ids)
    n = len(continuation_ids)
    run = evaluate_methods(model, ids, methods, protocol=protocol, max_length=len(ids), stride=n,
                           tokenizer=tokenizer, device=device, options=options, windows=[Window(0, len(ids), n)])
    return {"protocol": protocol, "n_prompt_tokens": len(prompt_ids), "n_continuation_tokens": n,
            "baseline": continuation_summary(run["baseline"]),
            "methods": {name: continuation_summary(s) for name, s in run["methods"].items()}}
