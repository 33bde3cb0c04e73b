"""Families that need more than a lookup: multi-hop variable chains, aggregation over the
whole context, facts the user updates across turns, and turns chained on earlier answers."""
from __future__ import annotations

import random
from collections import Counter

from ..dialogues import Block, Question, Tokens
from ..material import ITEMS, NAMES, Haystack, codename, fill, needle_budget, number, plant

NUMBER_ONLY = "Answer with the number only."


def _in_filler(rng: random.Random, budget: int, tokens: Tokens, needles: list[tuple[float, str]],
               units=None) -> str:
    """Needles at their depths in Wikipedia filler, about `budget` tokens in all."""
    room = needle_budget(budget, [n for _, n in needles], tokens)
    hay = fill(units, room, tokens, cut_last=True) if units is not None else Haystack(rng).take(room, tokens)
    return "\n\n".join(plant(hay, needles))


def variable_tracking(rng: random.Random, budget: int, n_q: int, tokens: Tokens, hops: int = 3):
    """Chains of assignments (VAR B = VAR A) through filler; a turn asks a chain's last
    variable (a multi-hop lookup). One more chain is never asked."""
    used: set[str] = set()
    values = rng.sample(range(10000, 100000), n_q + 1)
    needles, questions = [], []
    for value in values:
        names = [codename(rng, used) for _ in range(hops)]
        stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        needles += zip(sorted(rng.uniform(0.05, 0.95) for _ in stmts), stmts)
        questions.append(Question(f"What is the value of VAR {names[-1]}? Follow the assignments. "
                                  + NUMBER_ONLY, (str(value),), "numeric", 16))
    text = _in_filler(rng, budget, tokens, needles)
    return [Block(text if i == 0 else "", q) for i, q in enumerate(questions[:n_q])], {"hops": hops}


def aggregation(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """A visitors' log; the first turn asks the most frequent item, later turns how often a
    rarer item comes up (counting over the whole context)."""
    items = rng.sample(ITEMS, 6)
    weights = [0.3, 0.22, 0.16, 0.13, 0.1, 0.09]
    drawn = rng.choices(items, weights, k=budget // 8 + 8)
    lines = fill((f"Entry {i}: a visitor brought a {it}." for i, it in enumerate(drawn, 1)),
                 budget - 12, tokens)
    drawn = drawn[:len(lines)]
    counts = Counter(drawn)
    ranked = [it for it, _ in counts.most_common()]
    if len(ranked) > 1 and counts[ranked[0]] == counts[ranked[1]]:  # make the leader unique
        last = max(i for i, it in enumerate(drawn) if it == ranked[1])
        drawn[last] = ranked[0]
        lines[last] = f"Entry {last + 1}: a visitor brought a {ranked[0]}."
        counts = Counter(drawn)
        ranked = [it for it, _ in counts.most_common()]
    text = "Visitors' log:\n" + "\n".join(lines)
    questions = [Question("Which item did visitors bring most often? Answer with the item only.",
                          (ranked[0],), "choice", 12, tuple(items))]
    for it in sorted(ranked[1:], key=lambda x: counts[x])[:n_q - 1]:
        questions.append(Question(f"How many visitors brought a {it}? {NUMBER_ONLY}",
                                  (str(counts[it]),), "numeric", 12))
    return ([Block(text if i == 0 else "", q) for i, q in enumerate(questions)],
            {"entries": len(lines), "counts": dict(counts)})


STATE = (("locker code", 4), ("hotel room", 3), ("table number", 2), ("gate number", 3))


def state_tracking(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """The user states facts in filler and updates some in each later turn; each turn from
    the second (or all, with more turns) asks one fact's latest value."""
    n_blocks = max(2, n_q)
    hay = Haystack(rng).units()
    state: dict[str, str] = {}
    blocks = []
    for b in range(n_blocks):
        notes = []
        if b == 0:
            changed = [a for a, _ in STATE]
        else:
            changed = rng.sample([a for a, _ in STATE], 2)
        for attr in changed:
            digits = dict(STATE)[attr]
            value = number(rng, digits)
            while value == state.get(attr):
                value = number(rng, digits)
            note = f"(Note: my {attr} is {value}.)" if b == 0 else f"(Update: my {attr} is now {value}.)"
            notes.append((rng.uniform(0.05, 0.95), note))
            state[attr] = value
        text = _in_filler(rng, budget // n_blocks, tokens, notes, units=hay)
        q = None
        if b >= n_blocks - n_q:
            attr = changed[0] if b else rng.choice([a for a, _ in STATE])
            q = Question(f"What is my {attr} now? {NUMBER_ONLY}", (state[attr],), "numeric", 12)
        blocks.append(Block(text, q))
    return blocks, {"final_state": state}


def chained(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """A reporting chain planted in filler; turn 1 asks whom an agent reports to, each next
    turn whom *that* agent reports to (the previous answer is needed to follow)."""
    names = rng.sample(NAMES, n_q + 5)
    chain, others = names[:n_q + 1], names[n_q + 1:]
    facts = [f"Agent {a} reports to agent {b}." for a, b in zip(chain, chain[1:])]
    facts += [f"Agent {a} reports to agent {b}." for a, b in zip(others[::2], others[1::2])]
    text = _in_filler(rng, budget, tokens, [(rng.uniform(0.05, 0.95), f) for f in facts])
    blocks = []
    for i in range(n_q):
        ask = (f"Who does agent {chain[0]} report to?" if i == 0 else
               "And who does that agent report to?")
        choices = tuple(n for n in names if n != chain[i])
        blocks.append(Block(text if i == 0 else "",
                            Question(f"{ask} Answer with the name only.", (chain[i + 1],), "choice", 12,
                                     choices)))
    return blocks, {"chain": chain}
