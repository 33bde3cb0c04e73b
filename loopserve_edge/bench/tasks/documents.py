"""Families on real documents: Natural Questions gold passages among distractors."""
from __future__ import annotations

import itertools
import random

from ..data import NQItem, nq_items
from ..dialogues import Block, Question, Tokens
from ..material import fill

HEADER = "Documents:"


def _body(item: NQItem) -> str:
    return f"(Title: {item.title}) {item.text}"


DOC_TOKENS = 7  # "Document [12] " and the blank line between documents


def _ask(item: NQItem) -> Question:
    return Question(f"Question: {item.question}?\nAnswer from the documents, in a few words.",
                    item.answers, "contains", 24)


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


def _draw(rng: random.Random, n_gold: int) -> tuple[list[NQItem], list[NQItem]]:
    items = list(nq_items())
    rng.shuffle(items)
    return items[:n_gold], items[n_gold:]


def _doc_meta(numbers: dict[int, int], n_docs_text: str) -> dict:
    total = n_docs_text.count("Document [")
    return {"gold_docs": list(numbers.values()), "n_docs": total}


def qa(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """All documents in one turn; each question (one a turn) asks about another gold one."""
    golds, pool = _draw(rng, n_q)
    text, numbers = _documents(rng, budget, golds, pool, tokens)
    blocks = [Block(text if i == 0 else "", _ask(g)) for i, g in enumerate(golds)]
    return blocks, _doc_meta(numbers, text)


def docs_over_turns(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """Documents arrive over several turns; from the second turn on, each question is about
    a document of an earlier turn (the last question comes on its own)."""
    n_chunks = max(2, n_q)
    golds, pool = _draw(rng, n_q)
    blocks, numbers, first = [], {}, 1
    per_chunk = budget // n_chunks
    pool_iter = iter(pool)
    for c in range(n_chunks):
        mine = [golds[c]] if c < len(golds) else []
        chunk_pool = list(itertools.islice(pool_iter, max(4, per_chunk // 60)))
        text, nums = _documents(rng, per_chunk, mine, chunk_pool, tokens, first=first)
        numbers.update(nums)
        first += text.count("Document [")
        blocks.append(Block(text, _ask(golds[c - 1]) if c >= 1 else None))
    if n_q >= 2:
        blocks.append(Block("", _ask(golds[n_chunks - 1])))
    return blocks, {"gold_docs": [numbers[g.index] for g in golds], "n_docs": first - 1}


def open_generation(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """Describe document k, one document a turn (scored against full attention's reply)."""
    golds, pool = _draw(rng, n_q)
    text, numbers = _documents(rng, budget, golds, pool, tokens)
    blocks = [Block(text if i == 0 else "", _describe(numbers[g.index])) for i, g in enumerate(golds)]
    return blocks, _doc_meta(numbers, text)

