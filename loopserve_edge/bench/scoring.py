"""Scorers: exact, contains, numeric and choice match per family; ROUGE-L (by LCS) for
open generation, against the full-attention reply."""
from __future__ import annotations

import re
import string

_PUNCT = str.maketrans({c: " " for c in string.punctuation + "‘’“”"})
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lower case, no punctuation, articles or extra white space (SQuAD's normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact(pred: str, answers) -> float:
    p = normalize(pred)
    return float(any(p == normalize(a) for a in answers))


def contains(pred: str, answers) -> float:
    """Some reference answer appears in the reply, as whole words."""
    p = f" {normalize(pred)} "
    return float(any(normalize(a) and f" {normalize(a)} " in p for a in answers))


def first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    if m is None:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:
        return None


def numeric(pred: str, answers) -> float:
    """The first number in the reply equals a reference answer."""
    x = first_number(pred)
    return float(x is not None and any(x == first_number(str(a)) for a in answers))


def choice(pred: str, answers, choices) -> float:
    """Of the candidates (the answer among them), the first named in the reply is the answer."""
    p = f" {normalize(pred)} "
    found = [(p.find(f" {normalize(c)} "), c) for c in choices]
    found = [(i, c) for i, c in found if i >= 0]
    if not found:
        return 0.0
    first = min(found)[1]
    return float(any(normalize(first) == normalize(a) for a in answers))


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over normalised words (1.0 when both are empty)."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


SCORERS = ("exact", "contains", "numeric", "choice", "rouge_full")


def score(scorer: str, reply: str, answers, choices=(), full_reply: str | None = None) -> float:
    """One turn's score in [0, 1]. `rouge_full` scores against the full-attention reply
    (`full_reply`), so full attention itself scores 1."""
    if scorer == "exact":
        return exact(reply, answers)
    if scorer == "contains":
        return contains(reply, answers)
    if scorer == "numeric":
        return numeric(reply, answers)
    if scorer == "choice":
        return choice(reply, answers, choices)
    if scorer == "rouge_full":
        if full_reply is None:
            raise ValueError("rouge_full needs the full-attention reply")
        return rouge_l(reply, full_reply)
    raise ValueError(f"unknown scorer {scorer!r}")
