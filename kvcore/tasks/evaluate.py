"""The task protocol: prefill once, compress query-agnostically, answer from the cache.

Per example:
1. The prompt is the model's chat template (`tokenizer.apply_chat_template`) around one
   user turn "CONTEXT\\n\\nQUESTION", with the generation prompt. It is split where the
   context ends: the *prefix* (template head + context) is prefilled once and cached;
   the *suffix* ("\\n\\nQUESTION" + end of turn + generation prompt) is never seen by
   compression (query-agnostic, as in KVzip). A tokenizer without a chat template gets
   "CONTEXT" / "\\n\\nQUESTION\\nAnswer:".
2. The prefill collects what the scorers need (attention statistics, kvzip's
   reconstruction pass): `kvcore.evaluation.prefill`, as perplexity's prefill-compress.
3. For the uncompressed baseline and every (method, keep ratio): the prefilled context
   is compressed through the evaluation's one path (`kvcore.evaluation.context`, the
   method's own budget scope; evicted tokens physically removed, or masked per head),
   then the suffix is fed with the position ids it has in the full prompt
   (prefix length onwards, whatever was evicted) and the answer generated greedily,
   at most `max_new_tokens` tokens, stopping at an end-of-sequence / end-of-turn token.
   An example's `answer_prefix` (needle: "The secret passkey is") ends the suffix, so
   the reply starts there.

Keep ratios apply to methods of family `evict` (the method's keep_ratio is replaced by
each); other families (quant, sparsify, prune) are evaluated once (keep_ratio null).
A method name is a `methods:` entry of the config, an eviction scorer name (kvzip,
snapkv, h2o, streamingllm, knorm, random: evict with sink_tokens 4 under the scorer's own
budget, `Scorer.budget`: one threshold over the whole model for kvzip and the attention
scorers, as KVzip selects, uniform per head for the others), a scorer name with a budget
(`kvzip-uniform`, `snapkv-global`, `knorm-model`, ...), or a preset
(evict-snapkv-0.5-s4-global, int4-g64, ...). Eviction results record kept_fraction and
kept_by_layer (means over the examples).

kv_bytes_held is the stored size of the compressed context cache, in the model's dtype
(`method.packed_nbytes`: for eviction the kept vectors plus a 1-bit mask), summed over
layers, keys and values, averaged over examples; kv_bytes_full is the uncompressed
cache's bytes. peak_memory_bytes is the CUDA peak allocation of the evaluation on a GPU,
the process's peak resident set size on the CPU.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

from kvcore.errors import UsageError
from kvcore.tasks.base import Example
from kvcore.tasks.metrics import score_all

QUESTION_SEPARATOR = "\n\n"
DEFAULT_SINKS = 4
DEFAULT_SETTINGS = {
    "keep_ratios": [1.0, 0.5, 0.3, 0.2, 0.1],
    "max_new_tokens": 16,
    "device": "auto",
    "dtype": "auto",
    "seed": 0,
    "scorers": {},
    "keep_predictions": True,
}
_MARK = "\u241fKVCORE-CONTEXT-END\u241f"


# --------------------------------------------------------------------------- prompts


def split_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[str, str]:
    """(prefix, suffix) texts: the prompt up to the end of the context, and the rest."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": context + _MARK}],
                                             add_generation_prompt=True, tokenize=False)
        head, _, tail = text.partition(_MARK)
        return head, QUESTION_SEPARATOR + question + tail + answer_prefix
    return context, QUESTION_SEPARATOR + question + "\nAnswer:" + (" " + answer_prefix if answer_prefix else "")


def prompt_ids(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[list[int], list[int]]:
    prefix, suffix = split_prompt(tokenizer, context, question, answer_prefix)
    templated = bool(getattr(tokenizer, "chat_template", None))
    head = tokenizer(prefix, add_special_tokens=not templated)["input_ids"]
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return list(head), list(tail)


def stop_ids(model, tokenizer) -> set[int]:
    out = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        out.update(value if isinstance(value, (list, tuple)) else [value])
    return out


def greedy_answer(model, cache, hidden, suffix_ids, start: int, max_new_tokens: int, stops: set[int]) -> list[int]:
    """Greedy decoding of the suffix's continuation from `cache`; positions from `start`."""
    import torch

    from kvcore.evaluation.attention import PassState, attention_pass

    device = next(model.parameters()).device
    ids = torch.tensor([suffix_ids], device=device)
    position, out = start, []
    with attention_pass(model, PassState(hidden=hidden or {})):
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                           position_ids=torch.arange(position, position + ids.shape[1], device=device)[None]).logits
            position += ids.shape[1]
            token = int(logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
            ids = torch.tensor([[token]], device=device)
    return out


# --------------------------------------------------------------------------- methods


def resolve_methods(names, config_methods: dict | None = None) -> dict[str, dict]:
    """name -> spec dict (with `family`) for each method name (see the module docstring)."""
    from kvcore.compress import parse_method
    from kvcore.compress.evict import BUDGETS
    from kvcore.eviction import SCORERS, scorer_class

    config_methods = config_methods or {}
    out = {}
    for name in names:
        scorer, _, budget = name.rpartition("-") if name.rpartition("-")[2] in BUDGETS else (name, "", None)
        if name in config_methods:
            spec = config_methods[name]
            method = parse_method(name, spec)
        elif scorer in SCORERS:
            method = parse_method(name, {"family": "evict", "scorer": scorer, "sink_tokens": DEFAULT_SINKS,
                                         "budget": budget or scorer_class(scorer).budget})
        else:
            method = parse_method(name)
        out[name] = dict(method.spec) if hasattr(method, "spec") else dict(spec)
    return out


def _methods_at(name: str, spec: dict, keep_ratios) -> list[tuple[float | None, object]]:
    from kvcore.compress import parse_method

    if spec.get("family") == "evict":
        return [(float(r), parse_method(name, {**spec, "keep_ratio": float(r)})) for r in keep_ratios]
    return [(None, None if spec.get("family") == "none" else parse_method(name, spec))]


def check_settings(settings: dict | None) -> dict:
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    ratios = settings["keep_ratios"]
    if not ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios):
        raise UsageError(f"keep ratios must be numbers in (0, 1] (got {ratios!r})")
    n = settings["max_new_tokens"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"max_new_tokens must be an integer >= 1 (got {n!r})")
    return settings


# --------------------------------------------------------------------------- evaluation


def _nbytes(method, keys, values, keep=None) -> int:
    """Stored bytes of the context cache in the model's dtype (`keep`: eviction's masks)."""
    if method is None:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(keys, values))
    total = 0
    for i, (k, v) in enumerate(zip(keys, values)):
        mask = keep[i] if keep is not None else None
        total += method.packed_nbytes(tuple(k.shape), k.dtype, "key", layer=i, keep=mask)
        total += method.packed_nbytes(tuple(v.shape), v.dtype, "value", layer=i, keep=mask)
    return total


def _peak_memory(device) -> int:
    import torch

    if str(device).startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _summary(records: list[dict]) -> dict:
    return {
        "accuracy": _mean(r["contains_answer"] for r in records),
        "exact_match": _mean(r["exact_match"] for r in records),
        "f1": _mean(r["f1"] for r in records),
        "rouge_l": _mean(r["rouge_l"] for r in records),
    }


def evaluate_task(model, tokenizer, examples: list[Example], methods: dict[str, dict], settings: dict | None = None,
                  *, progress: str | None = None) -> dict:
    """Baseline and every (method, keep ratio) on `examples`, one prefill per example.

    `methods`: name -> spec (see `resolve_methods`). Returns {"baseline": {...},
    "methods": {name: {"results": [per keep ratio], "seconds": ...}}, "seconds", ...}.
    """
    import torch

    from kvcore.evaluation.context import compress_context, kept_summary
    from kvcore.evaluation.options import check_options
    from kvcore.evaluation.prefill import make_scorers, prefill_context
    from kvcore.progress import each

    settings = check_settings(settings)
    options = check_options({"seed": settings["seed"], "scorers": settings["scorers"]})
    plans = {name: _methods_at(name, spec, settings["keep_ratios"]) for name, spec in methods.items()}
    scorers = make_scorers([m for plan in plans.values() for _, m in plan if m is not None], options, tokenizer)
    stops = stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    records: dict = {None: []}
    timing: dict = {None: 0.0}
    held: dict = {None: []}
    kept: dict = {}
    full_bytes = []
    prefill_seconds = 0.0
    started = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for index, example in enumerate(each(examples, progress, "examples")):
            head, tail = prompt_ids(tokenizer, example.context, example.question, example.answer_prefix)
            t0 = time.perf_counter()
            state = prefill_context(model, torch.tensor([head], device=device), scorers, options, tokenizer)
            prefill_seconds += time.perf_counter() - t0
            full_bytes.append(_nbytes(None, state.keys, state.values))
            scores_cache: dict = {}
            runs = [(None, None, None)] + [(name, r, m) for name, plan in plans.items() for r, m in plan]
            for name, ratio, method in runs:
                key = None if name is None else (name, ratio)
                t1 = time.perf_counter()
                compressed = compress_context(method, state, scorers, options, index=index, scores=scores_cache)
                nbytes = _nbytes(method, state.keys, state.values, compressed.keep)
                if compressed.keep is not None:
                    kept.setdefault(key, []).append(kept_summary(compressed.keep))
                answer_ids = greedy_answer(model, compressed.cache(model), compressed.hidden, tail, len(head),
                                           settings["max_new_tokens"], stops)
                timing[key] = timing.get(key, 0.0) + time.perf_counter() - t1
                prediction = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
                record = {"id": example.id, "prediction": prediction, "answers": example.answers,
                          **score_all(prediction, example.answers),
                          **{k: example.meta[k] for k in ("context_length", "depth") if k in example.meta}}
                records.setdefault(key, []).append(record)
                held.setdefault(key, []).append(nbytes)
    seconds = time.perf_counter() - started
    peak = _peak_memory(device)

    def block(key, ratio):
        out = {"keep_ratio": ratio, **_summary(records[key]), "n_examples": len(records[key]),
               "kv_bytes_held": _mean(held[key]), "kv_bytes_full": _mean(full_bytes),
               "kv_fraction": _mean(held[key]) / _mean(full_bytes) if full_bytes else None,
               "seconds": timing[key], "by_cell": _by_cell(records[key])}
        if key in kept:  # eviction: what the method's budget kept, averaged over the examples
            out["kept_fraction"] = _mean(k["kept_fraction"] for k in kept[key])
            out["kept_by_layer"] = [_mean(layer) for layer in zip(*(k["kept_by_layer"] for k in kept[key]))]
        if settings["keep_predictions"]:
            out["examples"] = records[key]
        return out

    result = {"n_examples": len(examples), "seconds": seconds, "prefill_seconds": prefill_seconds,
              "peak_memory_bytes": peak, "max_new_tokens": settings["max_new_tokens"],
              "keep_ratios": [float(r) for r in settings["keep_ratios"]],
              "baseline": block(None, 1.0), "methods": {}}
    for name, plan in plans.items():
        result["methods"][name] = {"spec": methods[name],
                                   "results": [block((name, r), r) for r, _ in plan]}
    return result


def _by_cell(records: list[dict]) -> list[dict]:
    """Accuracy per (context_length, depth) for needle examples; [] for other tasks."""
    cells: dict = {}
    for r in records:
        if "context_length" in r:
            cells.setdefault((r["context_length"], r["depth"]), []).append(r["contains_answer"])
    return [{"context_length": c, "depth": d, "accuracy": _mean(v), "n": len(v)} for (c, d), v in sorted(cells.items())]


# --------------------------------------------------------------------------- one job


def method_result(run: dict, name: str, *, task: str, task_type: str, model: str) -> dict:
    """The `results/{model}/tasks/{task}/{method}.json` document of one method."""
    from kvcore.tasks.loaders import PRIMARY

    rows = run["methods"][name]["results"]
    metric = PRIMARY[task_type]

    def by_ratio(field):
        return {("none" if r["keep_ratio"] is None else f"{r['keep_ratio']:g}"): r.get(field) for r in rows}

    return {
        "task": task, "task_type": task_type, "model": model, "method": name, "spec": run["methods"][name]["spec"],
        "primary_metric": metric, "n_examples": run["n_examples"],
        "accuracy": by_ratio("accuracy"), "exact_match": by_ratio("exact_match"),
        "f1": by_ratio("f1"), "rouge_l": by_ratio("rouge_l"),
        "kv_bytes_held": by_ratio("kv_bytes_held"),
        "kept_fraction": by_ratio("kept_fraction"), "kept_by_layer": by_ratio("kept_by_layer"),
        "baseline": {k: v for k, v in run["baseline"].items() if k != "examples"},
        "results": rows,
        "peak_memory_bytes": run["peak_memory_bytes"], "seconds": run["seconds"],
        "prefill_seconds": run["prefill_seconds"], "max_new_tokens": run["max_new_tokens"],
        "protocol": "prefill-compress-generate",
    }


def run_task(model_dir, task: str, task_spec: dict, method_names: list[str], settings: dict | None,
             outputs: dict[str, str], *, filler_parquet=None, config_methods: dict | None = None) -> dict:
    """Load the model, evaluate `method_names` on one task, write one JSON per method
    (`outputs`: method name -> path, written atomically). Returns the run."""
    from kvcore.atomic import atomic_path
    from kvcore.model import load_model
    from kvcore.tasks.loaders import load_examples, task_type

    settings = check_settings(settings)
    kind = task_type(task_spec)
    methods = resolve_methods(method_names, config_methods)
    model, tokenizer, _ = load_model(model_dir, settings["device"], settings["dtype"], settings.get("attn_implementation"))
    examples = load_examples(task_spec, tokenizer, filler_parquet)
    print(f"task {task}: {len(examples)} examples, methods {', '.join(methods)}, "
          f"keep ratios {settings['keep_ratios']}", file=sys.stderr)
    run = evaluate_task(model, tokenizer, examples, methods, settings, progress=task)
    for name in methods:
        doc = method_result(run, name, task=task, task_type=kind, model=Path(model_dir).name)
        target = outputs.get(name)
        if target is None:
            continue
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=2) + "\n")
    return run
