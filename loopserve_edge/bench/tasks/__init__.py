"""The task families and the generation of their dialogues.

Every dialogue is a function of (task, split, seed, case index, context length, turns,
prompt format, difficulty): the same arguments give the same text. Its length is counted
with the model's tokenizer and prompt format, replies included at their most tokens, and
fitted to the context length. A split reads only its own share of the shared data
(data.Corpus) and seeds its own generators, so no dev case is ever a test case.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ..data import Corpus
from ..dialogues import ACK, SYSTEM, Case, Tokens, fit
from . import documents, reasoning, retrieval
from . import package_text
from .gen import Gen

ALL = ("before", "after", "later")
FORMATS = ("chat", "completion")

# Completion format (base models): an instruction and worked examples come first, in the
# transcript format the dialogue then follows. The examples are the same for every family
# and hold nothing a question could ask (a base model copies from examples readily: a pass
# key in an example came back as the answer); each question's own answer cue (dialogues.
# Question.cue) says what form its answer takes.
COMPLETION_INTRO = "Texts and questions about them follow. Each answer is short and on one line."
EXAMPLES = (("Documents:\n\nDocument [1] (Title: Lake Orin) Lake Orin is a freshwater lake in the "
             "north of the valley. It is fed by three rivers and freezes every winter.\n\nQuestion: "
             "what feeds lake orin?", "three rivers"),)
ACK_EXAMPLE = (f"The museum opens at nine and closes at five.\n\n{ACK}", "OK")


@dataclass(frozen=True)
class Family:
    name: str
    measures: str
    positions: tuple[str, ...]   # question positions it supports; cases cycle over them
    build: Callable[[Gen], tuple]
    # (user turn, answer) for the completion format, where a family needs its own (else EXAMPLES)
    examples: tuple[tuple[str, str], ...] = ()
    # difficulty levels, hardest (the defaults) first, for calibrate.py to walk down
    ladder: tuple[dict, ...] = ()
    # scored against full attention's own reply (ROUGE-L): full scores 1 by definition, and
    # what tells methods apart is that score and the fidelity columns
    versus_full: bool = False


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("nq_qa", "single-document QA on real text: a Natural Questions question, its gold "
           "Wikipedia passage among distractors (other questions' gold passages), question after "
           "the documents or in a later turn; more turns ask about other gold passages",
           ("after", "later"), documents.qa, ladder=documents.QA_LADDER),
    Family("nq_qa_first", "the same with the question before the documents", ("before",), documents.qa,
           ladder=documents.QA_LADDER),
    Family("docs_over_turns", "documents arrive over several turns; questions in later turns "
           "about documents of earlier turns", ALL, documents.docs_over_turns, ladder=documents.QA_LADDER),
    Family("kv_retrieval", "key-value retrieval on the real UUID records, several lookups over "
           "turns in one context", ALL, retrieval.kv_retrieval, ladder=retrieval.KV_LADDER),
    Family("passkey", "a pass key in long filler text at a random depth, asked again in each turn",
           ALL, retrieval.passkey),
    Family("multi_needle", "several planted magic numbers, one asked a turn", ALL, retrieval.multi_needle,
           ladder=retrieval.NEEDLE_LADDER),
    Family("variable_tracking", "chains of assignments through filler, multi-hop", ALL,
           reasoning.variable_tracking, ladder=reasoning.VARIABLE_LADDER),
    Family("aggregation", "most frequent item and counts over a whole log", ALL, reasoning.aggregation,
           ladder=reasoning.AGGREGATION_LADDER),
    Family("state_tracking", "facts the user updates across turns; the latest value is asked",
           ("after", "later"), reasoning.state_tracking, ladder=reasoning.STATE_LADDER),
    Family("chained", "each turn's question needs the previous turn's answer (a reporting chain)",
           ALL, reasoning.chained, ladder=reasoning.CHAINED_LADDER),
    Family("open_generation", "describe document k; ROUGE-L against the full-attention reply",
           ("after", "later"), documents.open_generation, documents.DESCRIBE_EXAMPLES,
           ladder=documents.DESCRIBE_LADDER, versus_full=True),
    Family("package_docs", "fidelity to full on real long texts, the docs and source files of installed "
           "Python packages (one a case, split by package): a question a turn on a function, class, "
           "section or file, early to late in the text; no reference answer (rouge_full)",
           ("after", "later"), package_text.package_docs, package_text.EXAMPLES, versus_full=True),
)}
TASKS = tuple(FAMILIES)


def system_text(task: str, fmt: str) -> str:
    """What comes before the dialogue: the chat format's system message, or the completion
    format's instruction and worked examples of the family (and of an acknowledgement)."""
    if fmt == "chat":
        return SYSTEM
    if fmt != "completion":
        raise ValueError(f"unknown prompt format {fmt!r}; choose from {', '.join(FORMATS)}")
    shots = (FAMILIES[task].examples or EXAMPLES) + (ACK_EXAMPLE,)
    return "\n\n".join([COMPLETION_INTRO] + [f"{user}\nAnswer: {answer}" for user, answer in shots])


def knobs_of(task: str, levels: dict | None = None) -> dict:
    """The family's difficulty settings: its defaults (the first level of its ladder),
    overridden by `levels` (a level chosen by calibration)."""
    ladder = FAMILIES[task].ladder
    out = dict(ladder[0]) if ladder else {}
    for k, v in (levels or {}).items():
        if k not in out:
            raise ValueError(f"task {task} has no difficulty setting {k!r} ({', '.join(out) or 'none'})")
        out[k] = v
    return out


def case_id(task: str, position: str, ctx: int, turns: int, split: str, seed: int, index: int) -> str:
    return f"{task}.{position}.ctx{ctx}.t{turns}.{split}.s{seed}.{index}"


def generate(task: str, *, ctx: int, turns: int, seed: int, index: int, tokens: Tokens,
             position: str | None = None, split: str = "dev", fmt: str = "chat",
             levels: dict | None = None) -> Case:
    """One dialogue of `task` with `turns` questions, fitted to `ctx` tokens."""
    fam = FAMILIES[task]
    position = position or fam.positions[index % len(fam.positions)]
    if position not in fam.positions:
        raise ValueError(f"task {task} has no {position!r} variant ({', '.join(fam.positions)})")
    corpus = Corpus(split)
    knobs = knobs_of(task, levels)
    system = system_text(task, fmt)

    def build(budget: int):
        # str seeds hash the same in every run; the split is part of it
        rng = random.Random(f"{task}/{split}/{seed}/{index}")
        return fam.build(Gen(rng, budget, turns, tokens, corpus, knobs))

    dialogue, meta = fit(build, position, ctx, tokens, system)
    return Case(case_id(task, position, ctx, turns, split, seed, index), task, position, ctx, seed, index,
                system, dialogue, dict(meta, split=split, format=fmt, knobs=knobs))


def generate_all(tasks, *, ctx: int, turns: int, seed: int, cases_per_task: int, tokens: Tokens,
                 positions=None, split: str = "dev", fmt: str = "chat",
                 levels: dict | None = None) -> list[Case]:
    """`cases_per_task` dialogues of each task, cycling over its question positions (those
    of `positions` that it supports, when given). `levels`: {task: difficulty settings}."""
    out = []
    for task in tasks:
        fam = FAMILIES[task]
        mine = [p for p in fam.positions if positions is None or p in positions]
        for i in range(cases_per_task if mine else 0):
            out.append(generate(task, ctx=ctx, turns=turns, seed=seed, index=i, tokens=tokens,
                                position=mine[i % len(mine)], split=split, fmt=fmt,
                                levels=(levels or {}).get(task)))
    return out
