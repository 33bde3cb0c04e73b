"""What a family's generator is given: a seeded random source, the token budget of its
material, the number of question turns, the tokenizer, its split's data and its difficulty."""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import Corpus
from ..dialogues import Tokens
from ..material import Haystack


@dataclass
class Gen:
    rng: random.Random
    budget: int          # tokens the material should take
    n_q: int             # question turns
    tokens: Tokens
    corpus: Corpus       # the split's share of the shared data
    knobs: dict          # the family's difficulty settings (tasks.knobs_of)

    def haystack(self, exclude=()) -> Haystack:
        """Wikipedia filler from the split's passages, in a seeded order."""
        return Haystack(self.rng, self.corpus.nq, exclude)
