"""Which tokens a perplexity evaluation scores, window by window.

`sliding` is the Hugging Face perplexity guide (DESIGN.md): windows of `max_length`
advance by `stride` and score the tokens no earlier window scored. `chunks` cuts the text
into disjoint windows of max_length and scores the last `stride` of each against the
max_length - stride before it (kvpress's protocol: 8192 tokens at 1024/512 -> 8 windows).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcore.errors import UsageError

LAYOUTS = ("sliding", "chunks")


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window
    end: int  # one past its last token
    target_len: int  # how many of its last tokens are new (scored) in this window


def windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The HF guide's windows: begin = 0, stride, 2*stride, ... until the text is covered."""
    if max_length < 2 or stride < 1 or stride > max_length:
        raise UsageError(f"perplexity needs max_length >= 2 and 1 <= stride <= max_length "
                         f"(got max_length={max_length}, stride={stride})")
    if n_tokens < 2:
        raise UsageError(f"perplexity needs at least 2 tokens (got {n_tokens})")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def chunk_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Disjoint full windows of max_length tokens, each scoring its last `stride` tokens."""
    if max_length < 2 or stride < 1 or stride >= max_length:
        raise UsageError(f"the chunks layout needs max_length >= 2 and 1 <= stride < max_length "
                         f"(got max_length={max_length}, stride={stride})")
    if n_tokens < max_length:
        raise UsageError(f"the chunks layout needs at least max_length={max_length} tokens (got {n_tokens})")
    return [Window(b, b + max_length, stride) for b in range(0, n_tokens - max_length + 1, max_length)]


def layout_windows(n_tokens: int, max_length: int, stride: int, layout: str = "sliding") -> list[Window]:
    if layout == "sliding":
        return windows(n_tokens, max_length, stride)
    if layout == "chunks":
        return chunk_windows(n_tokens, max_length, stride)
    raise UsageError(f"perplexity layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")


def split_window(length: int, target_len: int, max_length: int, stride: int) -> tuple[int, bool]:
    """(n_ctx, context_scored): the context length of a window under prefill-compress and
    whether the context's own tokens are scored (a first window, whose prefill is
    uncompressed: nothing precedes it). n_ctx 0 means nothing to compress: scored plainly."""
    if target_len < length:
        return length - target_len, False
    return min(max_length - stride, length - 1), True


def shard_windows(n_windows: int, shard: int, shards: int) -> range:
    """Shard `shard` of `shards`: the contiguous block of window indices it evaluates."""
    if shards < 1 or not 0 <= shard < shards:
        raise UsageError(f"perplexity shard must be in 0..shards-1 with shards >= 1 (got shard {shard} of {shards})")
    return range(shard * n_windows // shards, (shard + 1) * n_windows // shards)
