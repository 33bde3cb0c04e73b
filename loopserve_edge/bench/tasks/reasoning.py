"""Families that need more than a lookup: multi-hop variable chains, aggregation over the
whole context, facts the user updates across turns, and turns chained on earlier answers."""
from __future__ import annotations

import random
from collections import Counter

from ..dialogues import Block, Question
from ..material import ITEMS, NAMES, codename, fill, needle_budget, number, plant
from .gen import Gen

NUMBER_ONLY = "Answer with the number only."


def _in_filler(g: Gen, budget: int, needles: list[tuple[float, str]], units=None) -> str:
    """Needles at their depths in Wikipedia filler, about `budget` tokens in all."""
    room = needle_budget(budget, [n for _, n in needles], g.tokens)
    hay = fill(units, room, g.tokens, cut_last=True) if units is not None else g.haystack().take(room, g.tokens)
    return "\n\n".join(plant(hay, needles))


def variable_tracking(g: Gen):
    """Chains of assignments (VAR B = VAR A) through filler; a turn asks a chain's last
    variable (a multi-hop lookup). Knobs: `hops` per chain, `extra` chains never asked."""
    rng, n_q, hops = g.rng, g.n_q, g.knobs["hops"]
    used: set[str] = set()
    values = rng.sample(range(10000, 100000), n_q + g.knobs["extra"])
    needles, questions = [], []
    for value in values:
        names = [codename(rng, used) for _ in range(hops)]
        stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        needles += zip(sorted(rng.uniform(0.05, 0.95) for _ in stmts), stmts)
        # one hop: the cue is the statement's own form ("VAR X ="), which a small model
        # completes by copying (SmolLM2-135M, 8 dev dialogues: 0.69-0.81 against 0.31-0.44 with
        # "The value of VAR X is"); more hops would copy the next name, so they keep the sentence
        cue = f"VAR {names[-1]} =" if hops == 1 else f"The value of VAR {names[-1]} is"
        questions.append(Question(f"What is the value of VAR {names[-1]}? Follow the assignments. "
                                  + NUMBER_ONLY, (str(value),), "numeric", 16, cue=cue))
    text = _in_filler(g, g.budget, needles)
    return [Block(text if i == 0 else "", q) for i, q in enumerate(questions[:n_q])], {"hops": hops}


def aggregation(g: Gen):
    """A visitors' log; the first turn asks the most frequent item, later turns how often a
    rarer item comes up (counting over the whole log). Knob `entries`: None, the log fills
    the material; n, a log of n entries at a random depth in Wikipedia filler."""
    rng, budget, n_q, tokens = g.rng, g.budget, g.n_q, g.tokens
    n_entries = g.knobs["entries"]
    items = rng.sample(ITEMS, 6)
    weights = [0.3, 0.22, 0.16, 0.13, 0.1, 0.09]
    drawn = rng.choices(items, weights, k=n_entries or budget // 8 + 8)
    entries = (f"Entry {i}: a visitor brought a {it}." for i, it in enumerate(drawn, 1))
    lines = fill(entries, budget - 12, tokens) if n_entries is None else list(entries)
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
    if n_entries is not None:
        text = _in_filler(g, budget, [(rng.uniform(0.05, 0.95), text)])
    questions = [Question("Which item did visitors bring most often? Answer with the item only.",
                          (ranked[0],), "choice", 12, tuple(items), cue="Visitors brought most often a")]
    for it in sorted(ranked[1:], key=lambda x: counts[x])[:n_q - 1]:
        questions.append(Question(f"How many visitors brought a {it}? {NUMBER_ONLY}",
                                  (str(counts[it]),), "numeric", 12,
                                  cue=f"The number of visitors who brought a {it} is"))
    return ([Block(text if i == 0 else "", q) for i, q in enumerate(questions)],
            {"entries": len(lines), "counts": dict(counts)})


STATE = (("locker code", 4), ("hotel room", 3), ("table number", 2), ("gate number", 3))


def state_tracking(g: Gen):
    """The user states facts in filler and updates some in each later turn; each turn from
    the second (or all, with more turns) asks one fact's latest value. Knob `attrs`: how many
    facts are kept (each later turn updates up to two)."""
    rng, budget, n_q = g.rng, g.budget, g.n_q
    attrs = [a for a, _ in STATE[:g.knobs["attrs"]]]
    n_blocks = max(2, n_q)
    hay = g.haystack().units()
    state: dict[str, str] = {}
    blocks = []
    for b in range(n_blocks):
        notes = []
        if b == 0:
            changed = list(attrs)
        else:
            changed = rng.sample(attrs, min(2, len(attrs)))
        for attr in changed:
            digits = dict(STATE)[attr]
            value = number(rng, digits)
            while value == state.get(attr):
                value = number(rng, digits)
            note = f"(Note: my {attr} is {value}.)" if b == 0 else f"(Update: my {attr} is now {value}.)"
            notes.append((rng.uniform(0.05, 0.95), note))
            state[attr] = value
        text = _in_filler(g, budget // n_blocks, notes, units=hay)
        q = None
        if b >= n_blocks - n_q:
            attr = changed[0] if b else rng.choice(attrs)
            q = Question(f"What is my {attr} now? {NUMBER_ONLY}", (state[attr],), "numeric", 12,
                         cue=f"My {attr} is now")
        blocks.append(Block(text, q))
    return blocks, {"final_state": state}


def chained(g: Gen):
    """A reporting chain planted in filler; turn 1 asks whom an agent reports to, each next
    turn whom *that* agent reports to (the previous answer is needed to follow). Knobs:
    `others`, names in unrelated reporting facts; `explicit`, later turns name the agent
    (each answer is then a lookup: the chain stays, the reference to the last turn goes)."""
    rng, budget, n_q = g.rng, g.budget, g.n_q
    names = rng.sample(NAMES, n_q + 1 + g.knobs["others"])
    chain, others = names[:n_q + 1], names[n_q + 1:]
    facts = [f"Agent {a} reports to agent {b}." for a, b in zip(chain, chain[1:])]
    facts += [f"Agent {a} reports to agent {b}." for a, b in zip(others[::2], others[1::2])]
    text = _in_filler(g, budget, [(rng.uniform(0.05, 0.95), f) for f in facts])
    blocks = []
    for i in range(n_q):
        ask = (f"Who does agent {chain[0]} report to?" if i == 0 else
               f"And who does agent {chain[i]} report to?" if g.knobs["explicit"] else
               "And who does that agent report to?")
        choices = tuple(n for n in names if n != chain[i])
        cue = ("That agent reports to agent" if i and not g.knobs["explicit"] else
               f"Agent {chain[i]} reports to agent")
        blocks.append(Block(text if i == 0 else "",
                            Question(f"{ask} Answer with the name only.", (chain[i + 1],), "choice", 12,
                                     choices, cue)))
    return blocks, {"chain": chain}


VARIABLE_LADDER = ({"hops": 3, "extra": 1}, {"hops": 2, "extra": 1}, {"hops": 1, "extra": 1},
                   {"hops": 1, "extra": 0})
AGGREGATION_LADDER = ({"entries": None}, {"entries": 30}, {"entries": 10})
STATE_LADDER = ({"attrs": 4}, {"attrs": 2}, {"attrs": 1})
CHAINED_LADDER = ({"others": 4, "explicit": False}, {"others": 0, "explicit": False},
                  {"others": 0, "explicit": True})
