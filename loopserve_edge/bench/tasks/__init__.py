"""The eleven task families and the generation of their dialogues.

Every dialogue is a function of (task, seed, case index, context length, turns): the same
arguments give the same text. Its length is counted with the model's tokenizer and chat
template, replies included at their most tokens, and fitted to the context length.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ..dialogues import SYSTEM, Case, Tokens, fit
from . import documents, reasoning, retrieval

ALL = ("before", "after", "later")


@dataclass(frozen=True)
class Family:
    name: str
    measures: str
    positions: tuple[str, ...]   # question positions it supports; cases cycle over them
    build: Callable


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("nq_qa", "single-document QA on real text: a Natural Questions question, its gold "
           "Wikipedia passage among distractors (other questions' gold passages), question after "
           "the documents or in a later turn; more turns ask about other gold passages",
           ("after", "later"), documents.qa),
    Family("nq_qa_first", "the same with the question before the documents", ("before",), documents.qa),
    Family("docs_over_turns", "documents arrive over several turns; questions in later turns "
           "about documents of earlier turns", ALL, documents.docs_over_turns),
    Family("kv_retrieval", "key-value retrieval on the real UUID records, several lookups over "
           "turns in one context", ALL, retrieval.kv_retrieval),
    Family("passkey", "a pass key in long filler text at a random depth, asked again in each turn",
           ALL, retrieval.passkey),
    Family("multi_needle", "several planted magic numbers, one asked a turn", ALL, retrieval.multi_needle),
    Family("variable_tracking", "chains of assignments through filler, multi-hop (3 hops)", ALL,
           reasoning.variable_tracking),
    Family("aggregation", "most frequent item and counts over a whole log", ALL, reasoning.aggregation),
    Family("state_tracking", "facts the user updates across turns; the latest value is asked",
           ("after", "later"), reasoning.state_tracking),
    Family("chained", "each turn's question needs the previous turn's answer (a reporting chain)",
           ALL, reasoning.chained),
    Family("open_generation", "describe document k; ROUGE-L against the full-attention reply",
           ("after", "later"), documents.open_generation),
)}
TASKS = tuple(FAMILIES)


def case_id(task: str, position: str, ctx: int, turns: int, seed: int, index: int) -> str:
    return f"{task}.{position}.ctx{ctx}.t{turns}.s{seed}.{index}"


def generate(task: str, *, ctx: int, turns: int, seed: int, index: int, tokens: Tokens,
             position: str | None = None) -> Case:
    """One dialogue of `task` with `turns` questions, fitted to `ctx` tokens."""
    fam = FAMILIES[task]
    position = position or fam.positions[index % len(fam.positions)]
    if position not in fam.positions:
        raise ValueError(f"task {task} has no {position!r} variant ({', '.join(fam.positions)})")

    def build(budget: int):
        rng = random.Random(f"{task}/{seed}/{index}")  # str seeds hash the same in every run
        return fam.build(rng, budget, turns, tokens)

    dialogue, meta = fit(build, position, ctx, tokens, SYSTEM)
    return Case(case_id(task, position, ctx, turns, seed, index), task, position, ctx, seed, index,
                SYSTEM, dialogue, meta)


def generate_all(tasks, *, ctx: int, turns: int, seed: int, cases_per_task: int, tokens: Tokens,
                 positions=None) -> list[Case]:
    """`cases_per_task` dialogues of each task, cycling over its question positions (those
    of `positions` that it supports, when given)."""
    out = []
    for task in tasks:
        fam = FAMILIES[task]
        mine = [p for p in fam.positions if positions is None or p in positions]
        for i in range(cases_per_task if mine else 0):
            out.append(generate(task, ctx=ctx, turns=turns, seed=seed, index=i, tokens=tokens,
                                position=mine[i % len(mine)]))
    return out
