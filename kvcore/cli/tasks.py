"""`kvcore tasks`: needle retrieval and question answering under KV-cache compression.

    kvcore tasks needle --model MODEL --dataset TEXT.parquet --method kvzip --method snapkv \\
        --keep 1.0 0.5 0.1 --lengths 512 1024 --depths 0.1 0.5 0.9 --n 2 --out-dir results/m/tasks/needle
    kvcore tasks squad  --model MODEL --method h2o --n 50 --out-dir ...
    kvcore tasks local  --model MODEL --path qa.jsonl --method knorm --out-dir ...
    kvcore tasks plot   results/m/tasks/needle/*.json --out task_accuracy.png
    kvcore tasks table  results/m/tasks/needle/*.json


A method is an eviction scorer name (kvzip, snapkv, h2o, streamingllm, knorm, random:
evict with 4 sink tokens under the scorer's own budget, model-wide for kvzip, snapkv and
h2o), such a name with a budget (kvzip-uniform, knorm-model, ...), or a preset
(evict-snapkv-0.5-s4-global, int4-g64, ...);
keep ratios replace an eviction method's keep_ratio. One JSON per method is written to
--out-dir/{method}.json; a table of the primary metric is printed (needle: also one
per context length); `table` prints them again from the JSONs.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvcore.cli.options import (MAX_EXAMPLES, MAX_LENGTH, MAX_NEW_TOKENS, MAX_SEED, add_device_options,
                                add_model_options, float_in, int_in, model_dir)
from kvcore.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tasks", help="needle / QA accuracy under KV-cache compression",
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task_command", metavar="TASK", parser_class=type(p))
    sub.required = True
    for kind, help_text in (("needle", "passkey retrieval, generated from a seed"),
                            ("squad", "SQuAD from the hub (needs `datasets`)"),
                            ("local", "your own jsonl of {context, question, answers}")):
        t = sub.add_parser(kind, help=help_text, description=f"Evaluate the {kind} task under compression.")
        add_model_options(t)
        t.add_argument("--method", action="append", required=True, metavar="NAME",
                       help="method to evaluate (repeatable)")
        t.add_argument("--keep", type=float_in(0, 1, low_open=True), nargs="+", default=[1.0, 0.5, 0.3, 0.2, 0.1],
                       metavar="R", help="keep ratios in (0, 1] (default 1.0 0.5 0.3 0.2 0.1)")
        t.add_argument("--max-new-tokens", type=int_in(1, MAX_NEW_TOKENS), default=16, metavar="N",
                       help="greedy tokens generated per answer (default 16)")
        add_device_options(t)
        t.add_argument("--seed", type=int_in(0, MAX_SEED), default=0,
                       help="seed of the needle generator / squad sample / random")
        t.add_argument("--out-dir", metavar="DIR", help="write DIR/{method}.json")
        t.add_argument("--json", action="store_true", help="print the whole run as JSON")
        if kind == "needle":
            t.add_argument("--dataset", required=True, metavar="TEXT.parquet", help="filler corpus (text.parquet)")
            t.add_argument("--lengths", type=int_in(32, MAX_LENGTH), nargs="+", default=[512, 1024], metavar="N",
                           help="context lengths in tokens (default 512 1024)")
            t.add_argument("--depths", type=float_in(0, 1), nargs="+", default=[0.1, 0.5, 0.9], metavar="D",
                           help="needle depths in [0, 1] (default 0.1 0.5 0.9)")
            t.add_argument("--n", type=int_in(1, MAX_EXAMPLES), default=2,
                           help="examples per (length, depth) cell (default 2)")
        elif kind == "squad":
            t.add_argument("--n", type=int_in(1, MAX_EXAMPLES), default=50, help="examples (default 50)")
            t.add_argument("--split", default="validation", help="dataset split to sample (default validation)")
            t.add_argument("--hub-id", default="rajpurkar/squad", metavar="ORG/NAME",
                           help="the SQuAD-format dataset on the hub (default rajpurkar/squad)")
        else:
            t.add_argument("--path", required=True, metavar="JSONL",
                           help="jsonl file, one {context, question, answers} per line")
            t.add_argument("--n", type=int_in(1, MAX_EXAMPLES), default=None, help="first N examples (default all)")
        t.set_defaults(func=run_tasks, task_kind=kind)
    pl = sub.add_parser("plot", help="accuracy vs keep ratio from task JSONs",
                        description="Plot accuracy vs keep ratio, one line per method (task_accuracy.png).")
    pl.add_argument("results", nargs="+", metavar="JSON", help="results/{model}/tasks/{task}/{method}.json files")
    pl.add_argument("--out", required=True, metavar="PNG", help="image file to write")
    pl.set_defaults(func=run_plot)
    tb = sub.add_parser("table", help="markdown tables of the primary metric from task JSONs",
                        description="Print the primary metric per method x keep ratio (needle: also per "
                                    "context length) from task JSONs.")
    tb.add_argument("results", nargs="+", metavar="JSON", help="results/{model}/tasks/{task}/{method}.json files")
    tb.add_argument("--versus", action="append", default=[], metavar="A:B",
                    help="also compare methods A and B example by example (paired: who gets which right)")
    tb.set_defaults(func=run_table)


def _task_spec(args) -> dict:
    if args.task_kind == "needle":
        return {"type": "needle", "context_lengths": args.lengths, "depths": args.depths,
                "n_per_cell": args.n, "seed": args.seed}
    if args.task_kind == "squad":
        return {"type": "squad", "n_examples": args.n, "split": args.split, "hub_id": args.hub_id, "seed": args.seed}
    return {"type": "local", "path": args.path, "n_examples": args.n}


def run_tasks(args) -> int:
    from pathlib import Path

    from kvcore.atomic import check_output
    from kvcore.tasks.evaluate import method_result, run_task

    settings = {"keep_ratios": args.keep, "max_new_tokens": args.max_new_tokens, "device": args.device,
                "dtype": args.dtype, "seed": args.seed, "attn_implementation": args.attn_implementation}
    names = list(dict.fromkeys(args.method))
    outputs = {n: str(Path(args.out_dir) / f"{n}.json") for n in names} if args.out_dir else {}
    for path in outputs.values():
        check_output(path, "--out-dir", inputs=[args.model])
    model = model_dir(args)
    run = run_task(model, args.task_kind, _task_spec(args), names, settings, outputs,
                   filler_parquet=getattr(args, "dataset", None))
    if args.json:
        print(json.dumps(run, indent=2))
        return 0
    docs = [method_result(run, n, task=args.task_kind, task_type=args.task_kind, model=model.name)
            for n in names]
    print(format_tables(docs))
    return 0


def format_tables(docs: list[dict]) -> str:
    """The pooled table, then (needle) one per context length, separated by blank lines."""
    lengths = sorted({c["context_length"] for c in (docs[0]["baseline"].get("by_cell") or [])}) if docs else []
    parts = [format_table(docs)]
    if len(lengths) > 1:
        parts += [format_table(docs, context_length=n) for n in lengths]
    return "\n\n".join(parts)


def _cell_accuracy(cells: list[dict], context_length: int) -> tuple[float | None, int]:
    """(accuracy, n) over the needle cells of one context length (n-weighted over depths)."""
    rows = [c for c in cells if c["context_length"] == context_length]
    n = sum(c["n"] for c in rows)
    return (sum(c["accuracy"] * c["n"] for c in rows) / n if n else None), n


def format_table(docs: list[dict], context_length: int | None = None) -> str:
    """Markdown table: rows = methods, columns = keep ratios, cells = the primary metric;
    with `context_length`, needle accuracy over that length's examples only (from by_cell)."""
    if not docs:
        return ""
    metric = docs[0]["primary_metric"]
    ratios = list(dict.fromkeys(k for d in docs for k in d[metric]))

    def fmt(x):
        return "" if x is None else f"{x:.3f}"

    if context_length is None:
        n = docs[0]["n_examples"]
        base = docs[0]["baseline"][metric]
        rows = [(d["method"], [d[metric].get(r) for r in ratios]) for d in docs]
        title = f"| method ({metric}, n={n}) | "
    else:
        base, n = _cell_accuracy(docs[0]["baseline"]["by_cell"], context_length)
        rows = []
        for d in docs:
            by_ratio = {("none" if r["keep_ratio"] is None else f"{r['keep_ratio']:g}"): r for r in d["results"]}
            rows.append((d["method"], [_cell_accuracy(by_ratio[r].get("by_cell", []), context_length)[0]
                                       if r in by_ratio else None for r in ratios]))
        title = f"| method (accuracy, {context_length} tokens, n={n}) | "
    lines = [title + " | ".join(ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    lines.append("| uncompressed | " + " | ".join(fmt(base) for _ in ratios) + " |")
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines)


METRICS = ("accuracy", "f1", "rouge_l", "exact_match")
_SCORE = {"type": ["number", "null"]}
_CELLS = {"type": "array", "items": {
    "type": "object", "required": ["context_length", "accuracy", "n"],
    "properties": {"context_length": {"type": "integer"}, "accuracy": {"type": "number"},
                   "n": {"type": "integer", "minimum": 0}}}}
# What `table` and `plot` read of a task result (kvcore.tasks.evaluate.method_result writes it),
# so valid JSON of another shape is one line naming the key, not a KeyError.
RESULT_SHAPE = {
    "type": "object",
    "required": ["method", "primary_metric", "n_examples", "baseline", "results"],
    "properties": {
        "method": {"type": "string"},
        "primary_metric": {"enum": list(METRICS)},
        "n_examples": {"type": "integer"},
        "baseline": {"type": "object", "properties": {"by_cell": _CELLS}},
        "results": {"type": "array", "items": {"type": "object", "required": ["keep_ratio"],
                                               "properties": {"keep_ratio": _SCORE, "kv_fraction": _SCORE,
                                                              "by_cell": _CELLS}}},
    },
    "allOf": [{"if": {"required": ["primary_metric"], "properties": {"primary_metric": {"const": m}}},
               "then": {"required": [m], "properties": {
                   m: {"type": "object", "additionalProperties": _SCORE},
                   "baseline": {"required": [m], "properties": {m: _SCORE}},
                   "results": {"items": {"properties": {m: _SCORE}}}}}} for m in METRICS],
}


def _read_results(paths) -> list[dict]:
    from kvcore.config import explain
    from kvcore.inputs import read_json

    docs = []
    for path in paths:
        doc = read_json(path, "task result")
        problem = explain(doc, RESULT_SHAPE, what=f"task result {path}")
        if problem:
            raise UsageError(f"{problem} (expected a results/MODEL/tasks/TASK/METHOD.json)")
        docs.append(doc)
    metrics = {d["primary_metric"] for d in docs}
    if len(metrics) > 1:
        raise UsageError(f"the task results mix primary metrics ({', '.join(sorted(metrics))}); "
                         f"give the results of one task")
    return docs


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of b vs c discordant pairs (binomial, p = 1/2)."""
    from math import comb

    n = b + c
    return min(1.0, 2 * sum(comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def paired_table(docs: list[dict], pairs: list[tuple[str, str]]) -> str:
    """Per keep ratio, A's and B's accuracy on the same examples, the examples only A / only B
    got right, and the exact McNemar p-value of that split."""
    by_name = {d["method"]: d for d in docs}
    missing = [n for pair in pairs for n in pair if n not in by_name]
    if missing:
        raise UsageError(f"--versus: no result for method {missing[0]!r} (have: {', '.join(by_name)})")
    lines = ["| A vs B | keep | A | B | only A right | only B right | McNemar p |", "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        for ra, rb in zip(by_name[a]["results"], by_name[b]["results"]):
            right_a = {e["id"]: e["contains_answer"] for e in ra.get("examples", [])}
            right_b = {e["id"]: e["contains_answer"] for e in rb.get("examples", [])}
            if not right_a or set(right_a) != set(right_b):
                raise UsageError(f"--versus {a}:{b}: the results do not hold the same examples' predictions")
            only_a = sum(bool(right_a[i]) and not right_b[i] for i in right_a)  # scores are 0.0 / 1.0
            only_b = sum(bool(right_b[i]) and not right_a[i] for i in right_a)
            lines.append(f"| {a} vs {b} | {ra['keep_ratio']:g} | {ra['accuracy']:.3f} | {rb['accuracy']:.3f} | "
                         f"{only_a} | {only_b} | {mcnemar_p(only_a, only_b):.2g} |")
    return "\n".join(lines)


def run_table(args) -> int:
    docs = _read_results(args.results)
    print(format_tables(docs))
    pairs = [tuple(v.split(":", 1)) for v in args.versus]
    if any(len(p) != 2 for p in pairs):
        raise UsageError("--versus takes A:B (two method names)")
    if pairs:
        print("\n" + paired_table(docs, pairs))
    return 0


def run_plot(args) -> int:
    from kvcore.atomic import check_output
    from kvcore.plots_tasks import plot_task_accuracy

    check_output(args.out, "--out", inputs=args.results)
    docs = _read_results(args.results)
    plot_task_accuracy(docs, args.out)
    print(args.out, file=sys.stderr)
    return 0
