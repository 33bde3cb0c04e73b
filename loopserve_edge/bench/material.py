"""Material for the generated dialogues: Wikipedia haystack passages from the real data,
filling to a token budget, needles planted at a depth, and seeded synthetic words."""
from __future__ import annotations

import random
import string
from typing import Iterable

from .dialogues import Tokens

CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dublin", "Perth", "Tunis",
          "Riga", "Accra", "Bergen", "Porto", "Cusco", "Kyoto", "Malmo", "Dakar", "Leeds",
          "Graz", "Turin", "Zagreb", "Austin", "Denver", "Sapporo", "Cairo", "Havana",
          "Tbilisi", "Tallinn", "Valencia", "Krakow")
NAMES = ("Ortega", "Baker", "Novak", "Haddad", "Lindqvist", "Okafor", "Moreau", "Tanaka",
         "Kowalski", "Fischer", "Duarte", "Petrov", "Quinn", "Sato", "Mendez", "Brennan",
         "Varga", "Nilsen", "Castillo", "Ferreira", "Abbott", "Keller", "Rossi", "Ibsen",
         "Murphy", "Larsen", "Costa", "Weber", "Hughes", "Jensen")
ITEMS = ("lantern", "umbrella", "compass", "teapot", "violin", "kite", "globe", "hammer",
         "candle", "basket")


def number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def codename(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in used:
            used.add(name)
            return name


def longest(n: int, fits) -> int:
    """The largest k in 0..n with fits(k), for a fits that holds up to some k and not after
    (a prefix that fits a token budget): a binary search, so a text is counted log n times."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def truncate(text: str, n_tokens: int, tokens: Tokens) -> str:
    """The longest word prefix of `text` with at most n_tokens tokens."""
    words = text.split()
    return " ".join(words[:longest(len(words), lambda k: tokens.count(" ".join(words[:k])) <= n_tokens)])


def fill(units: Iterable[str], budget: int, tokens: Tokens, sep_tokens: int = 1,
         cut_last: bool = False) -> list[str]:
    """Units, in order, until they hold about `budget` tokens (each joined with a
    separator of sep_tokens). The last unit is cut to fit with cut_last, else taken
    when that lands nearer the budget than leaving it out."""
    out: list[str] = []
    total = 0
    for u in units:
        n = tokens.count(u) + sep_tokens
        if total + n <= budget:
            out.append(u)
            total += n
            continue
        left = budget - total - sep_tokens
        if cut_last and left >= 8:
            piece = truncate(u, left, tokens)
            if piece:
                out.append(piece)
        elif not cut_last and total + n - budget < budget - total:
            out.append(u)
        break
    return out


class Haystack:
    """Wikipedia passages (NQ gold passages, of one split) in a seeded order, as filler."""

    def __init__(self, rng: random.Random, items, exclude: Iterable[int] = ()):
        skip = set(exclude)
        self._items = [it for it in items if it.index not in skip]
        rng.shuffle(self._items)

    def units(self) -> Iterable[str]:
        for it in self._items:
            yield f"{it.title}. {it.text}"

    def take(self, budget: int, tokens: Tokens) -> list[str]:
        return fill(self.units(), budget, tokens, sep_tokens=1, cut_last=True)


def plant(units: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Insert each needle text between units at its depth (0 = start, 1 = end); needles
    at the same depth keep their order."""
    out = list(units)
    for k, (depth, text) in enumerate(sorted(needles, key=lambda x: x[0])):
        out.insert(min(len(out), round(depth * len(units)) + k), text)
    return out


def needle_budget(budget: int, needles: list[str], tokens: Tokens) -> int:
    return budget - sum(tokens.count(n) + 1 for n in needles)
