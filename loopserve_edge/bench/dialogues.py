"""Benchmark dialogues: what a task generator builds, how the question is placed, and the
fitting of a dialogue to a context length counted with the model's own tokenizer.

A generator returns blocks: some material (text the questions need) and at most one
question about everything sent so far. `layout` turns blocks into user turns for a
question position:

- after:  material, then its question, in one turn;
- before: the question, then the material, in one turn;
- later:  the material in a turn of its own (the model acknowledges it), the question in
          the next turn.

Blocks without material are question-only turns in every layout (follow-up questions).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

POSITIONS = ("before", "after", "later")
ACK = "Read the text above. Reply only with: OK."
ACK_TOKENS = 8
SYSTEM = "You answer questions about the text the user gives you. Answer briefly."


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]     # reference answers, any may match (none: open generation)
    scorer: str                  # see scoring.SCORERS
    max_tokens: int = 24
    choices: tuple[str, ...] = ()
    # how the answer starts ("The pass key is"), given as the start of the reply: a small or
    # base model completes a sentence far more reliably than it follows an instruction
    cue: str = ""


@dataclass(frozen=True)
class Block:
    material: str
    question: Question | None = None


@dataclass(frozen=True)
class Turn:
    user: str
    answers: tuple[str, ...] = ()
    scorer: str | None = None    # None: not scored (an acknowledgement)
    max_tokens: int = ACK_TOKENS
    choices: tuple[str, ...] = ()
    cue: str = ""                # the start of the reply, given to the model (Question.cue)

    @classmethod
    def asking(cls, text: str, q: Question) -> "Turn":
        return cls(text, q.answers, q.scorer, q.max_tokens, q.choices, q.cue)

    def reply_prefix(self, fmt: str) -> str:
        """What the reply starts with (Dialogue.send's reply_prefix): the cue, after the
        completion format's "Answer:" with a space."""
        return "" if not self.cue else f" {self.cue}" if fmt == "completion" else self.cue


@dataclass(frozen=True)
class Case:
    id: str
    task: str
    position: str
    ctx: int
    seed: int
    index: int
    system: str
    turns: tuple[Turn, ...]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["digest"] = self.digest()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        turns = tuple(Turn(t["user"], tuple(t["answers"]), t["scorer"], t["max_tokens"],
                           tuple(t["choices"]), t.get("cue", "")) for t in d["turns"])
        return cls(d["id"], d["task"], d["position"], d["ctx"], d["seed"], d["index"],
                   d["system"], turns, dict(d.get("meta", {})))

    def digest(self) -> str:
        """Changes whenever the dialogue does (a run recorded for another text is redone)."""
        body = json.dumps([self.system, [asdict(t) for t in self.turns]], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    @property
    def n_scored(self) -> int:
        return sum(t.scorer is not None for t in self.turns)


def layout(blocks: list[Block], position: str) -> tuple[Turn, ...]:
    if position not in POSITIONS:
        raise ValueError(f"unknown question position {position!r}")
    turns: list[Turn] = []
    for b in blocks:
        q = b.question
        if not b.material:
            if q is not None:
                turns.append(Turn.asking(q.text, q))
        elif q is None or position == "later":
            turns.append(Turn(f"{b.material}\n\n{ACK}"))
            if q is not None:
                turns.append(Turn.asking(q.text, q))
        elif position == "after":
            turns.append(Turn.asking(f"{b.material}\n\n{q.text}", q))
        else:
            turns.append(Turn.asking(f"{q.text}\n\n{b.material}", q))
    return tuple(turns)


class Tokens:
    """Token counts with a model's tokenizer and chat template (a loaded `Llama`)."""

    def __init__(self, llm):
        self.llm = llm
        self._cache: dict[str, int] = {}

    def count(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = self._cache[text] = len(self.llm.tokenize(text))
        return n

    def dialogue(self, system: str, turns) -> int:
        """Tokens of the whole dialogue: the rendered template with every user turn, and
        each reply at its most tokens."""
        msgs = [{"role": "system", "content": system}]
        for t in turns:
            msgs += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.cue}]
        rendered = self.llm.template.render(msgs[:-1])
        return len(self.llm.tokenize(rendered)) + sum(t.max_tokens for t in turns)


def target_tokens(ctx: int) -> int:
    """What a dialogue for a context of `ctx` tokens aims at: a little under it, so that
    replies that re-tokenize a little longer still fit."""
    return ctx - max(16, ctx // 25)


def fit(build: Callable[[int], tuple[list[Block], dict]], position: str, ctx: int,
        tokens: Tokens, system: str = SYSTEM) -> tuple[tuple[Turn, ...], dict]:
    """Call build(material_budget) until the dialogue's tokens are within 2% of the target
    (never above `ctx`). `build` must be a function of the budget alone (seeded inside)."""
    target = target_tokens(ctx)
    budget = target - 64
    best = None
    for _ in range(5):
        blocks, meta = build(max(budget, 16))
        turns = layout(blocks, position)
        n = tokens.dialogue(system, turns)
        if n <= ctx and (best is None or abs(n - target) < abs(best[2] - target)):
            best = (turns, meta, n)
        if abs(n - target) <= 0.02 * target:
            break
        budget += target - n
    if best is None:
        raise ValueError(f"no dialogue fits a context of {ctx} tokens (the questions alone "
                         f"need {n}); use a larger --ctx or fewer --turns")
    turns, meta, n = best
    return turns, dict(meta, tokens=n)
