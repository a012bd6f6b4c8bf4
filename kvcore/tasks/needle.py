"""Needle in a haystack, generated offline and deterministically from a seed.

For each (context length in tokens, depth) cell, `n_per_cell` examples: filler text is
a run of consecutive sentences of an embedded corpus (its documents split into
sentences, a seeded start), and the needle sentence, by default

    "The secret passkey is 48213. Remember it: 48213 is the passkey."

(a seeded 5-digit passkey that does not occur anywhere in that example's filler) is
inserted at the sentence boundary nearest to `depth` (0 = start, 1 = end) of the
filler's tokens, as RULER's and KVzip's needle tests do. The context has at most
`context_length` tokens of the given tokenizer (filler is trimmed sentence by sentence
from the far side of the needle). Each example's meta records where the needle is:

    needle_token   index of the needle's first token in the tokenized context
    needle_tokens  how many tokens it spans
    n_tokens       tokens of the context
    depth          the depth asked for; depth_actual = needle_token / (n_tokens -
                   needle_tokens), the fraction of the filler's tokens before the needle
                   (it differs from depth by at most about one sentence)

The question (asked after compression, never seen by it) is "What is the secret
passkey? Answer with the number only."; the assistant's reply starts with "The secret
passkey is" (RULER's answer prefix; `answer_prefix: ""` turns it off) and the answer
is the passkey.
"""

from __future__ import annotations

import random
import re

from kvcore.errors import UsageError
from kvcore.tasks.base import Example

NEEDLE = "The secret passkey is {answer}. Remember it: {answer} is the passkey."
ANSWER_PREFIX = "The secret passkey is"
QUESTION = "What is the secret passkey mentioned in the text above? Answer with the number only."
DEFAULTS = {
    "context_lengths": [512, 1024],
    "depths": [0.1, 0.5, 0.9],
    "n_per_cell": 2,
    "seed": 0,
    "digits": 5,
    "needle": NEEDLE,
    "question": QUESTION,
    "answer_prefix": ANSWER_PREFIX,
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(documents: list[str]) -> list[str]:
    out = []
    for doc in documents:
        out.extend(s.strip() for s in _SENTENCE_END.split(" ".join(doc.split())) if s.strip())
    return out


def check_spec(spec: dict) -> dict:
    unknown = sorted(set(spec) - set(DEFAULTS) - {"type", "dataset"})
    if unknown:
        raise UsageError(f"needle: unknown key {unknown[0]!r} (valid: {', '.join(['type', 'dataset', *DEFAULTS])})")
    spec = {**DEFAULTS, **{k: v for k, v in spec.items() if k in DEFAULTS}}
    lengths, depths = spec["context_lengths"], spec["depths"]
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 32 for n in lengths):
        raise UsageError(f"needle: context_lengths must be integers >= 32 (got {lengths!r})")
    if not depths or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
        raise UsageError(f"needle: depths must be numbers in [0, 1] (got {depths!r})")
    for key in ("n_per_cell", "digits"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1:
            raise UsageError(f"needle: {key} must be an integer >= 1 (got {spec[key]!r})")
    if "{answer}" not in spec["needle"]:
        raise UsageError("needle: the needle text must contain '{answer}'")
    return spec


def make_needle_examples(tokenizer, documents: list[str], spec: dict | None = None) -> list[Example]:
    """The needle examples of `spec` (keys of DEFAULTS), filler from `documents`."""
    spec = check_spec(spec or {})
    pool = sentences(documents)
    if len(pool) < 2:
        raise UsageError("needle: the filler corpus has fewer than 2 sentences")
    lengths = [len(ids) for ids in tokenizer([" " + s for s in pool], add_special_tokens=False)["input_ids"]]
    examples = []
    for length in spec["context_lengths"]:
        for depth in spec["depths"]:
            for i in range(spec["n_per_cell"]):
                rng = random.Random(f"{spec['seed']}/{length}/{depth}/{i}")
                examples.append(_example(tokenizer, pool, lengths, length, float(depth), i, rng, spec))
    return examples


def _example(tokenizer, pool, lengths, length, depth, index, rng, spec) -> Example:
    start = rng.randrange(len(pool))
    needle_len = len(tokenizer(" " + spec["needle"].format(answer="0" * spec["digits"]),
                               add_special_tokens=False)["input_ids"])
    chosen, total = [], 0
    while total < length - needle_len and len(chosen) < len(pool):
        j = (start + len(chosen)) % len(pool)
        chosen.append(pool[j])
        total += lengths[j]
    filler = " ".join(chosen)
    low, high = 10 ** (spec["digits"] - 1), 10 ** spec["digits"] - 1
    answer = str(rng.randint(low, high))
    while answer in filler:
        answer = str(rng.randint(low, high))
    needle = spec["needle"].format(answer=answer)

    # boundary k: needle goes before chosen[k]; nearest to depth of the filler's tokens
    cum = [0]
    for s in chosen:
        cum.append(cum[-1] + len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]))
    k = min(range(len(cum)), key=lambda b: (abs(cum[b] - depth * cum[-1]), b))
    before, after = chosen[:k], chosen[k:]
    while True:
        context, char_start = _join(before, needle, after)
        enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
        n_tokens = len(enc["input_ids"])
        if n_tokens <= length or not (before or after):
            break
        # trim the side that is longer than the depth asks for, so the needle stays put
        b, a = len(" ".join(before)), len(" ".join(after))
        if after and (not before or b <= depth * (a + b)):
            after = after[:-1]
        else:
            before = before[1:]
    if n_tokens > length:
        raise UsageError(f"needle: the needle alone has {n_tokens} tokens, more than context length {length}")
    offsets = enc["offset_mapping"]
    position = next(t for t, (a, b) in enumerate(offsets) if b > char_start)
    span = sum(1 for a, b in offsets if b > char_start and a < char_start + len(needle))
    return Example(
        id=f"needle-{length}-{depth:g}-{index}", context=context, question=spec["question"], answers=[answer],
        answer_prefix=spec["answer_prefix"],
        meta={"context_length": length, "depth": depth, "n_tokens": n_tokens, "needle_token": position,
              "needle_tokens": span, "depth_actual": position / max(1, n_tokens - span), "needle": needle})


def _join(before: list[str], needle: str, after: list[str]) -> tuple[str, int]:
    head = " ".join(before)
    prefix = head + " " if head else ""
    tail = " " + " ".join(after) if after else ""
    return prefix + needle + tail, len(prefix)
