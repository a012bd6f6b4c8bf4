"""Answer metrics: the standard definitions over normalised tokens.

Normalisation is SQuAD's (the official evaluate-v1.1 script): lower case, drop
punctuation, drop the articles a/an/the, collapse white space. Over those tokens:

    exact_match      normalised prediction == normalised answer
    contains_answer  the answer's tokens occur contiguously in the prediction's tokens
                     (needle / passkey retrieval: "The passkey is 12345." contains "12345",
                     "123456" does not)
    f1               SQuAD token F1: overlap = multiset intersection of the two token lists,
                     P = overlap / |pred|, R = overlap / |answer|, F1 = 2PR / (P + R);
                     0 without overlap; when either side is empty, 1 if both are, else 0
    rouge_l          ROUGE-L F-measure (Lin 2004, beta = 1): LCS = longest common
                     subsequence of the token lists, P = LCS / |pred|, R = LCS / |answer|,
                     F = 2PR / (P + R)

With several reference answers every metric takes the maximum over them (as SQuAD does).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)

METRICS = ("exact_match", "contains_answer", "f1", "rouge_l")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _best(metric, prediction: str, answers: str | Iterable[str]) -> float:
    if isinstance(answers, str):
        answers = [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("at least one reference answer is needed")
    return max(metric(prediction, a) for a in answers)


def _exact(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def _contains(prediction: str, answer: str) -> float:
    p, a = tokens(prediction), tokens(answer)
    if not a:
        return float(not p)
    return float(any(p[i:i + len(a)] == a for i in range(len(p) - len(a) + 1)))


def _f1(prediction: str, answer: str) -> float:
    p, a = tokens(prediction), tokens(answer)
    if not p or not a:
        return float(p == a)
    overlap = sum((Counter(p) & Counter(a)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(a)
    return 2 * precision * recall / (precision + recall)


def lcs_length(x: list, y: list) -> int:
    """Length of the longest common subsequence (dynamic programming, O(|x| |y|))."""
    if not x or not y:
        return 0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l(prediction: str, answer: str) -> float:
    p, a = tokens(prediction), tokens(answer)
    if not p or not a:
        return float(p == a)
    lcs = lcs_length(p, a)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(a)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers) -> float:
    return _best(_exact, prediction, answers)


def contains_answer(prediction: str, answers) -> float:
    return _best(_contains, prediction, answers)


def f1_score(prediction: str, answers) -> float:
    return _best(_f1, prediction, answers)


def rouge_l(prediction: str, answers) -> float:
    return _best(_rouge_l, prediction, answers)


def score_all(prediction: str, answers) -> dict[str, float]:
    return {"exact_match": exact_match(prediction, answers), "contains_answer": contains_answer(prediction, answers),
            "f1": f1_score(prediction, answers), "rouge_l": rouge_l(prediction, answers)}
