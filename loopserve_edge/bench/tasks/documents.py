"""Families on real documents: Natural Questions gold passages among distractors."""
from __future__ import annotations

import itertools
import random

from ..data import NQItem
from ..dialogues import Block, Question, Tokens
from ..material import fill, needle_budget, plant
from .gen import Gen

HEADER = "Documents:"


def _body(item: NQItem) -> str:
    return f"(Title: {item.title}) {item.text}"


DOC_TOKENS = 7  # "Document [12] " and the blank line between documents


def _ask(item: NQItem) -> Question:
    # 40 tokens: a small chat model tends to restate the question before the answer
    return Question(f"Question: {item.question}?\nAnswer from the documents, in a few words.",
                    item.answers, "contains", 40)


def _describe(k: int) -> Question:
    return Question(f"Describe Document [{k}] in two sentences.", (), "rouge_full", 48)


def _documents(rng: random.Random, budget: int, golds: list[NQItem], pool: list[NQItem],
               tokens: Tokens, first: int = 1) -> tuple[str, dict[int, int]]:
    """Gold passages at random places among distractors (the last one may be cut short),
    numbered from `first`, about `budget` tokens in all; returns the text and
    {gold item index: document number}."""
    gold_cost = sum(tokens.count(_body(g)) + DOC_TOKENS for g in golds)
    room = budget - gold_cost - tokens.count(HEADER) - 2
    docs = [(None, body) for body in fill(map(_body, pool), room, tokens, DOC_TOKENS, cut_last=True)]
    for g in golds:
        docs.insert(rng.randrange(len(docs) + 1), (g.index, _body(g)))
    text = "\n\n".join(f"Document [{first + i}] {body}" for i, (_, body) in enumerate(docs))
    numbers = {idx: first + i for i, (idx, _) in enumerate(docs) if idx is not None}
    return f"{HEADER}\n\n{text}", numbers


def _draw(g: Gen, n_gold: int) -> tuple[list[NQItem], list[NQItem]]:
    items = list(g.corpus.nq)
    g.rng.shuffle(items)
    return items[:n_gold], items[n_gold:]


def _doc_meta(numbers: dict[int, int], n_docs_text: str) -> dict:
    total = n_docs_text.count("Document [")
    return {"gold_docs": list(numbers.values()), "n_docs": total}


def _material(g: Gen, budget: int, golds: list[NQItem], pool: list[NQItem], first: int = 1,
              n_docs: int | None = None):
    """The documents of a turn, about `budget` tokens: with n_docs None, gold passages among
    as many distractors as fill it; else n_docs documents in all (the golds and n_docs -
    golds distractors) at a random depth in Wikipedia filler (fewer distractors: easier)."""
    if n_docs is None:
        return _documents(g.rng, budget, golds, pool, g.tokens, first)
    distractors = pool[:max(0, n_docs - len(golds))]
    text, numbers = _documents(g.rng, 10 ** 9, golds, distractors, g.tokens, first)
    used = [it.index for it in golds + distractors]
    hay = g.haystack(exclude=used).take(needle_budget(budget, [text], g.tokens), g.tokens)
    return "\n\n".join(plant(hay, [(g.rng.uniform(0.05, 0.95), text)])), numbers


def qa(g: Gen):
    """All documents in one turn; each question (one a turn) asks about another gold one."""
    golds, pool = _draw(g, g.n_q)
    text, numbers = _material(g, g.budget, golds, pool, n_docs=g.knobs["docs"])
    blocks = [Block(text if i == 0 else "", _ask(it)) for i, it in enumerate(golds)]
    return blocks, _doc_meta(numbers, text)


def docs_over_turns(g: Gen):
    """Documents arrive over several turns; from the second turn on, each question is about
    a document of an earlier turn (the last question comes on its own)."""
    rng, budget, n_q, tokens = g.rng, g.budget, g.n_q, g.tokens
    n_chunks = max(2, n_q)
    golds, pool = _draw(g, n_q)
    blocks, numbers, first = [], {}, 1
    per_chunk = budget // n_chunks
    pool_iter = iter(pool)
    for c in range(n_chunks):
        mine = [golds[c]] if c < len(golds) else []
        chunk_pool = list(itertools.islice(pool_iter, max(4, per_chunk // 60)))
        n_docs = None if g.knobs["docs"] is None else max(len(mine), g.knobs["docs"] // n_chunks)
        text, nums = _material(g, per_chunk, mine, chunk_pool, first=first, n_docs=n_docs)
        numbers.update(nums)
        first += text.count("Document [")
        blocks.append(Block(text, _ask(golds[c - 1]) if c >= 1 else None))
    if n_q >= 2:
        blocks.append(Block("", _ask(golds[n_chunks - 1])))
    return blocks, {"gold_docs": [numbers[g.index] for g in golds], "n_docs": first - 1}


def open_generation(g: Gen):
    """Describe document k, one document a turn (scored against full attention's reply)."""
    golds, pool = _draw(g, g.n_q)
    text, numbers = _material(g, g.budget, golds, pool, n_docs=g.knobs["docs"])
    blocks = [Block(text if i == 0 else "", _describe(numbers[it.index])) for i, it in enumerate(golds)]
    return blocks, _doc_meta(numbers, text)



QA_LADDER = ({"docs": None}, {"docs": 6}, {"docs": 2})
# scored against full attention's own reply: nothing to calibrate
DESCRIBE_LADDER = ({"docs": None},)
_EX_DOCS = ("Documents:\n\nDocument [1] (Title: Lake Orin) Lake Orin is a freshwater lake in the north of "
            "the valley. It is fed by three rivers and freezes every winter.\n\nDocument [2] (Title: "
            "Tarn Bridge) Tarn Bridge is a stone bridge built in 1821 over the river Tarn.")
DESCRIBE_EXAMPLES = ((f"{_EX_DOCS}\n\nDescribe Document [1] in two sentences.",
                      "Lake Orin is a freshwater lake in the north of the valley. Three rivers feed it."),)
