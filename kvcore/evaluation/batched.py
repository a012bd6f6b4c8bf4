"""Several perplexity windows per forward, for the uncompressed baseline on a GPU.

Windows of one length are independent rows of one batch. When the baseline runs alone (the
`baseline` method's job), its fake-quant forward (an empty cache, the whole window) and its
prefill-compress prefill and scored feed run once per batch instead of once per window; with
methods every window runs alone, so a method and its baseline keep one code path.
Each row's NLL is the one-window function applied to that row (`nll.target_nll`,
`nll.scored_nll`), so a batch gives each window's numbers up to the float rounding of a
larger matrix product (tests/test_gpu_paths.py compares them on the CPU). Each window is
charged an equal share of its batch's time. On the CPU one window at a time stays the rule
(`window_batch` is 1), so CPU results keep their bits.
"""

from __future__ import annotations

LOGITS_BYTES = 2 << 30  # float32 logits of one batch stay under this


def window_batch(model, device, max_length: int) -> int:
    """Windows per forward: 1 on the CPU; on a GPU as many as keep a batch's float32 logits
    under LOGITS_BYTES, at most 8."""
    if not str(device).startswith("cuda"):
        return 1
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    return max(1, min(8, LOGITS_BYTES // (4 * vocab * max(1, max_length))))


def batches(chosen, all_windows, size: int, same) -> list[list[int]]:
    """Consecutive runs of window indices, at most `size` long, whose windows agree on `same(w)`."""
    out: list[list[int]] = []
    for i in chosen:
        if out and len(out[-1]) < size and same(all_windows[out[-1][0]]) == same(all_windows[i]):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def fake_quant_baseline(model, ids, all_windows, group, run, device) -> None:
    """The fake-quant baseline of the windows `group` (equal lengths) in one forward."""
    from kvcore.evaluation.cache import cache_from
    from kvcore.evaluation.nll import scored_nll
    from kvcore.evaluation.timing import Timer

    wins = [all_windows[i] for i in group]
    window_ids = _stack(ids, wins)
    with Timer(device) as t:
        logits = model(input_ids=window_ids, past_key_values=cache_from(model, [], []), use_cache=True).logits
    share = t.seconds / len(group)
    for row, (i, w) in enumerate(zip(group, wins)):
        labels = window_ids[row:row + 1].clone()
        labels[:, :-w.target_len] = -100
        run.add(None, (i, w.begin, w.end), *scored_nll(logits[row:row + 1], labels), share)


def prefill_compress_baseline(model, ids, all_windows, group, run, device, n_ctx: int, options) -> None:
    """The prefill-compress baseline of the windows `group` (equal lengths, none a first window
    scoring its context): one batched prefill of the contexts, one batched scored feed."""
    import torch

    from kvcore.evaluation.cache import cache_from
    from kvcore.evaluation.nll import target_nll
    from kvcore.evaluation.prefill import prefill_context
    from kvcore.evaluation.timing import Timer

    wins = [all_windows[i] for i in group]
    window_ids = _stack(ids, wins)
    ctx, targets = window_ids[:, :n_ctx], window_ids[:, n_ctx:]
    pre = prefill_context(model, ctx, {}, options, device=device)
    feed = targets[:, :-1]
    with Timer(device) as t:
        logits = None
        if feed.shape[1]:
            positions = torch.arange(n_ctx, n_ctx + feed.shape[1], device=feed.device)[None]
            logits = model(input_ids=feed, past_key_values=cache_from(model, pre.keys, pre.values),
                           use_cache=True, position_ids=positions).logits
    share, prefill_share = t.seconds / len(group), pre.seconds / len(group)
    for row, (i, w) in enumerate(zip(group, wins)):
        nll, count = target_nll(pre.last_logits[row:row + 1, None], targets[row:row + 1, :1])
        if logits is not None:
            more, n = target_nll(logits[row:row + 1], targets[row:row + 1, 1:])
            nll, count = nll + more, count + n
        run.add(None, (i, w.begin, w.end), nll, count, share, prefill_share)


def _stack(ids, wins):
    import torch

    return torch.cat([ids[:, w.begin:w.end] for w in wins])
