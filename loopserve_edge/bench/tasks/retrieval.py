"""Retrieval families: key-value lookups on the real UUID records, a passkey in filler,
several planted needles."""
from __future__ import annotations

import itertools
import json
import random

from ..dialogues import Block, Question
from ..material import CITIES, fill, needle_budget, number, plant
from .gen import Gen

KV_HEADER = "JSON data:"


def kv_retrieval(g: Gen):
    """One JSON object of UUID key-value records; a lookup a turn, keys at varied depths.
    Knob `records`: None, the object fills the material; n, an object of n records at a
    random depth in Wikipedia filler (fewer look-alike keys: easier)."""
    rng, budget, n_q, tokens = g.rng, g.budget, g.n_q, g.tokens
    n_records = g.knobs["records"]
    rows = list(g.corpus.kv)
    rng.shuffle(rows)
    pairs = list(itertools.islice((p for r in rows for p in r), max(budget // 40 + 8, n_records or 0)))
    entries = (f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs)
    if n_records is None:
        lines = fill(entries, budget - tokens.count(KV_HEADER) - 4, tokens, sep_tokens=1)
    else:
        lines = list(itertools.islice(entries, n_records))
    records = pairs[:len(lines)]
    asked = rng.sample(range(len(records)), min(n_q, len(records)))
    data = f"{KV_HEADER}\n" + "{" + ",\n ".join(lines) + "}"
    if n_records is not None:
        hay = g.haystack().take(needle_budget(budget, [data], tokens), tokens)
        data = "\n\n".join(plant(hay, [(rng.uniform(0.05, 0.95), data)]))
    blocks = []
    for i, r in enumerate(asked):
        key, value = records[r]
        q = Question(f'What is the value of the key "{key}" in the JSON object? '
                     "Answer with the value only.", (value,), "contains", 40, cue=f'"{key}": "')
        blocks.append(Block(data if i == 0 else "", q))
    return blocks, {"records": len(records), "asked_depths": [round(r / len(records), 3) for r in asked]}


def passkey(g: Gen):
    """A pass key in Wikipedia filler at a random depth, asked for in each turn (the later
    asks test that it survives the compressions after the earlier ones)."""
    rng, budget, n_q, tokens = g.rng, g.budget, g.n_q, g.tokens
    key = number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    depth = rng.uniform(0.05, 0.95)
    hay = g.haystack().take(needle_budget(budget, [needle], tokens), tokens)
    text = "\n\n".join(plant(hay, [(depth, needle)]))
    blocks = []
    for i in range(n_q):
        q = ("What is the pass key? Answer with the number only." if i == 0 else
             "What was the pass key again? Answer with the number only.")
        blocks.append(Block(text if i == 0 else "", Question(q, (key,), "numeric", 12, cue="The pass key is")))
    return blocks, {"depth": round(depth, 3)}


def multi_needle(g: Gen):
    """Several special magic numbers for cities in filler, one asked a turn; knob `extra`:
    how many more are never asked (look-alike distractors)."""
    rng, budget, n_q, tokens = g.rng, g.budget, g.n_q, g.tokens
    cities = rng.sample(CITIES, n_q + g.knobs["extra"])
    values = [number(rng, 7) for _ in cities]
    needles = [f"The special magic number for {c} is {v}." for c, v in zip(cities, values)]
    depths = [rng.uniform(0.05, 0.95) for _ in needles]
    hay = g.haystack().take(needle_budget(budget, needles, tokens), tokens)
    text = "\n\n".join(plant(hay, list(zip(depths, needles))))
    blocks = [Block(text if i == 0 else "",
                    Question(f"What is the special magic number for {cities[i]}? "
                             "Answer with the number only.", (values[i],), "numeric", 16,
                             cue=f"The special magic number for {cities[i]} is"))
              for i in range(n_q)]
    return blocks, {"depths": [round(d, 3) for d in depths[:n_q]]}


KV_LADDER = ({"records": None}, {"records": 8}, {"records": 3})
NEEDLE_LADDER = ({"extra": 2}, {"extra": 0})
