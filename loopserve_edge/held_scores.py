"""A dialogue's attention scores kept on the host across a state round trip of its cells.

The runtime accumulates scores per KV cell, and a sequence state loaded into the cache starts
with none: swapping a dialogue out of the pool and back, packing its cells after a cut
(Context.compact) and the batch-invariant repack all go through one, and zeroed the scores a
coming cut was to be ranked by (a reply's deferred cut, H2O's history). Before such a round trip
the scores read so far are held on the dialogue, by position, while its cells are out, and put
back into the runtime with its count of rows as soon as they are in again
(Context._put_back_scores), so that the sums go on from the same floats as without the round trip
and every operation on a resident dialogue's cells (a cut, position compaction) finds its scores
in the runtime, which moves them with the cells. Positions identify a dialogue's cells: a round
trip keeps them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class HeldScores:
    pos: np.ndarray    # int32 [n], ascending: the cells' positions when held
    rows: np.ndarray   # float32 [n_heads, n]: attention_scores_by_head's rows
    n_rows: int        # query rows accumulated into them


def add_to(held: HeldScores | None, pos: np.ndarray, rows: np.ndarray) -> None:
    """Add the held scores into rows [n_heads, len(pos)] (the cells at pos), where their
    positions are still the dialogue's."""
    if held is None or not len(held.pos) or not len(pos):
        return
    idx = np.minimum(np.searchsorted(pos, held.pos), len(pos) - 1)
    ok = pos[idx] == held.pos
    rows[:, idx[ok]] += held.rows[:, ok]
