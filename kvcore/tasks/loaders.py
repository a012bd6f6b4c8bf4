"""Task datasets: each a list of `Example` (context, question, answers).

A task spec (config.yaml `tasks.suite.NAME`, or the CLI) has a `type`:

    needle   generated offline from a seed (kvcore.tasks.needle); filler from `dataset`,
             a text.parquet of the embedded corpora (config: a name under `datasets:`)
    squad    SQuAD from the hub through `datasets` (`hub_id` rajpurkar/squad, `split`
             validation), the first `n_examples` after a seeded shuffle
    local    a jsonl file `path`: one object per line with `context`, `question` and
             `answers` (a list of strings) or `answer` (a string); `id` optional
             (default: the line number); the first `n_examples` lines (all when null)

Free-form tasks (squad, local) are scored by F1 (primary), ROUGE-L and exact match;
needle by contains-answer accuracy (primary) and exact match.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kvcore.errors import KvcoreError, UsageError
from kvcore.tasks.base import Example

TYPES = ("needle", "squad", "local")
PRIMARY = {"needle": "accuracy", "squad": "f1", "local": "f1"}
FREE_FORM_QUESTION = "Answer the question briefly, using only the text above.\nQuestion: {question}"
SQUAD_DEFAULTS = {"hub_id": "rajpurkar/squad", "split": "validation", "n_examples": 50, "seed": 0}


def task_type(spec: dict) -> str:
    kind = (spec or {}).get("type")
    if kind not in TYPES:
        raise UsageError(f"task type must be one of {', '.join(TYPES)} (got {kind!r})")
    return kind


def load_examples(spec: dict, tokenizer, filler_parquet: str | Path | None = None) -> list[Example]:
    """The examples of one task spec (see the module docstring)."""
    kind = task_type(spec)
    if kind == "needle":
        from kvcore.sources.datasets import read_documents
        from kvcore.tasks.needle import make_needle_examples

        if filler_parquet is None or not Path(filler_parquet).is_file():
            raise UsageError(f"needle: the filler corpus {filler_parquet} does not exist "
                             "(give a dataset's text.parquet; run the download step first)")
        return make_needle_examples(tokenizer, read_documents(filler_parquet), spec)
    if kind == "squad":
        return load_squad(spec)
    return load_local(spec.get("path"), spec.get("n_examples"))


def _free_form(question: str) -> str:
    return FREE_FORM_QUESTION.format(question=question.strip())


def load_squad(spec: dict) -> list[Example]:
    spec = {**SQUAD_DEFAULTS, **spec}
    try:
        import datasets
    except ImportError:
        raise KvcoreError("the squad task needs the `datasets` package (pip install datasets)") from None
    try:
        rows = datasets.load_dataset(spec["hub_id"], split=spec["split"])
    except Exception as exc:  # hub errors come in many types
        raise KvcoreError(f"could not load {spec['hub_id']} ({spec['split']}) from the hub: {exc}") from None
    order = list(range(len(rows)))
    random.Random(spec["seed"]).shuffle(order)
    n = spec["n_examples"]
    out = []
    for i in order[: n if n else None]:
        row = rows[i]
        answers = list(dict.fromkeys(row["answers"]["text"]))
        out.append(Example(id=str(row["id"]), context=row["context"], question=_free_form(row["question"]),
                           answers=answers, meta={"title": row.get("title")}))
    return out


def load_local(path, n_examples: int | None = None) -> list[Example]:
    if not path:
        raise UsageError("local task: give `path`, a jsonl file of {context, question, answers}")
    from kvcore.inputs import read_text

    path = Path(path)
    out = []
    for number, line in enumerate(read_text(path, "local task file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{number}: each line must be a JSON object")
        answers = row.get("answers", row.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        missing = [k for k in ("context", "question") if not isinstance(row.get(k), str)]
        if missing or not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            what = f"'{missing[0]}' (a string)" if missing else "'answers' (a list of strings) or 'answer'"
            raise UsageError(f"{path}:{number}: missing {what}")
        out.append(Example(id=str(row.get("id", number)), context=row["context"],
                           question=_free_form(row["question"]), answers=list(answers)))
        if n_examples and len(out) >= n_examples:
            break
    if not out:
        raise UsageError(f"local task: {path} holds no examples")
    return out
