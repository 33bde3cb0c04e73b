"""A dialogue's attention scores kept on the host across a state round trip of its cells.

The runtime accumulates scores per KV cell, and a sequence state loaded into the cache starts
with none: swapping a dialogue out of the pool and back, packing its cells after a cut
(Context.compact) and the batch-invariant repack all go through one, and zeroed the scores a
coming cut was to be ranked by (a reply's deferred cut, H2O's history). Before such a round trip
the scores read so far are held on the dialogue, by position, while its cells are out (the
operations that drop or move cells drop or move them too), and put back into the runtime with its
count of rows when they are in again (Context._put_back_scores), so that the sums go on from the
same floats as without the round trip. Positions identify a dialogue's cells: a round trip keeps
them, and only position compaction renumbers them (in order)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class HeldScores:
    pos: np.ndarray    # int32 [n], ascending: the cells' positions when held
    rows: np.ndarray   # float32 [n_heads, n]: attention_scores_by_head's rows
    n_rows: int        # query rows accumulated into them


def add_to(held: HeldScores | None, pos: np.ndarray, rows: np.ndarray) -> None:
    """Add the held scores into rows [n_heads, len(pos)] (the runtime's, of the cells at pos),
    where their positions are still the dialogue's."""
    if held is None or not len(held.pos) or not len(pos):
        return
    idx = np.minimum(np.searchsorted(pos, held.pos), len(pos) - 1)
    ok = pos[idx] == held.pos
    rows[:, idx[ok]] += held.rows[:, ok]


def without(held: HeldScores | None, drop) -> HeldScores | None:
    """The held scores less the positions for which drop(pos) is true."""
    if held is None:
        return None
    keep = ~drop(held.pos)
    return HeldScores(held.pos[keep], held.rows[:, keep], held.n_rows)


def renumbered(held: HeldScores | None, before: np.ndarray, after: np.ndarray) -> HeldScores | None:
    """The held scores after the cells at positions `before` (ascending) got `after`, in order."""
    if held is None or not len(before):
        return None
    idx = np.minimum(np.searchsorted(before, held.pos), len(before) - 1)
    ok = before[idx] == held.pos
    return HeldScores(np.asarray(after)[idx[ok]], held.rows[:, ok], held.n_rows)


def kept_per_head(held: HeldScores | None, pos: np.ndarray, sel: np.ndarray, new_pos: np.ndarray) -> HeldScores | None:
    """The held scores after a head-wise cut moved, in each head, the rows of its cells sel[h]
    (indices into the cells at `pos`) into the first cells, now at `new_pos`: each head's scores
    follow its tokens, as the runtime's do."""
    if held is None:
        return None
    aligned = np.zeros((held.rows.shape[0], len(pos)), np.float32)
    add_to(held, pos, aligned)
    return HeldScores(np.asarray(new_pos, np.int32), np.take_along_axis(aligned, sel, axis=1), held.n_rows)
