"""Retrieval families: key-value lookups on the real UUID records, a passkey in filler,
several planted needles."""
from __future__ import annotations

import itertools
import json
import random

from ..data import kv_records
from ..dialogues import Block, Question, Tokens
from ..material import CITIES, Haystack, fill, needle_budget, number, plant

KV_HEADER = "JSON data:"


def kv_retrieval(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """One JSON object of UUID key-value records; a lookup a turn, keys at varied depths."""
    rows = list(range(len(kv_records())))
    rng.shuffle(rows)
    pairs = list(itertools.islice((p for r in rows for p in kv_records()[r]), budget // 40 + 8))
    lines = fill((f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs),
                 budget - tokens.count(KV_HEADER) - 4, tokens, sep_tokens=1)
    records = pairs[:len(lines)]
    asked = rng.sample(range(len(records)), min(n_q, len(records)))
    body = "{" + ",\n ".join(lines) + "}"
    blocks = []
    for i, r in enumerate(asked):
        key, value = records[r]
        q = Question(f'What is the value of the key "{key}" in the JSON object? '
                     "Answer with the value only.", (value,), "contains", 40)
        blocks.append(Block(f"{KV_HEADER}\n{body}" if i == 0 else "", q))
    return blocks, {"records": len(records), "asked_depths": [round(r / len(records), 3) for r in asked]}


def passkey(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """A pass key in Wikipedia filler at a random depth, asked for in each turn (the later
    asks test that it survives the compressions after the earlier ones)."""
    key = number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    depth = rng.uniform(0.05, 0.95)
    hay = Haystack(rng).take(needle_budget(budget, [needle], tokens), tokens)
    text = "\n\n".join(plant(hay, [(depth, needle)]))
    blocks = []
    for i in range(n_q):
        q = ("What is the pass key? Answer with the number only." if i == 0 else
             "What was the pass key again? Answer with the number only.")
        blocks.append(Block(text if i == 0 else "", Question(q, (key,), "numeric", 12)))
    return blocks, {"depth": round(depth, 3)}


def multi_needle(rng: random.Random, budget: int, n_q: int, tokens: Tokens):
    """Several special magic numbers for cities in filler (two never asked); one asked a turn."""
    cities = rng.sample(CITIES, n_q + 2)
    values = [number(rng, 7) for _ in cities]
    needles = [f"The special magic number for {c} is {v}." for c, v in zip(cities, values)]
    depths = [rng.uniform(0.05, 0.95) for _ in needles]
    hay = Haystack(rng).take(needle_budget(budget, needles, tokens), tokens)
    text = "\n\n".join(plant(hay, list(zip(depths, needles))))
    blocks = [Block(text if i == 0 else "",
                    Question(f"What is the special magic number for {cities[i]}? "
                             "Answer with the number only.", (values[i],), "numeric", 16))
              for i in range(n_q)]
    return blocks, {"depths": [round(d, 3) for d in depths[:n_q]]}
