"""Ablation for issue 15: part of each head's budget spread over the whole history (one cell per
stretch of positions) instead of all of it going to the highest pooled scores.

The gap to the oracle (benchmarks/results/oracle-cpu/) is in the turns after the first: the cut that
ends a turn ranks by that turn's attention, so a later question about another part of the text
finds that part gone. A head that keeps a few cells in every stretch of the text keeps something
of every part. A fraction `cover` of each head's budget between the sink and the recent cells goes
to the best pooled cell of each of that many equal stretches of the evictable range; the rest to
the highest pooled scores among the cells left, as in every cut.

Registered before the bench CLI runs (not in the package):
- `d64h-cover8`: loopserve-d64-head with 1/8 of each head's free budget spread (marked by
  `chunk_probe` 8, which budgeted prefill alone reads; the bench's 2K dialogues never need it);
- `d64h-cover4`: the same with 1/4 (`chunk_probe` 4)."""
import sys

import numpy as np

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

_choose = eviction.choose_keep_rows
COVER = {8: 1 / 8, 4: 1 / 4}


def covered(s: np.ndarray, lo: int, hi: int, n_cover: int) -> np.ndarray:
    """[rows, n_cover] the best cell of each of n_cover equal stretches of [lo, hi)."""
    edges = np.linspace(lo, hi, n_cover + 1).round().astype(int)
    return np.stack([lo_ + np.argmax(s[:, lo_:hi_], axis=1) for lo_, hi_ in zip(edges[:-1], edges[1:])], axis=1)


def choose_keep_rows(rows, cfg, budget):
    frac = COVER.get(cfg.chunk_probe)
    if frac is None:
        return _choose(rows, cfg, budget)
    h, n = rows.shape
    lo, hi = min(cfg.sink, n), max(0, n - cfg.recent)
    left = budget - lo - (n - max(lo, hi))
    n_cover = int(left * frac)
    if n <= budget or left <= 0 or hi <= lo or n_cover < 1 or hi - lo < n_cover:
        return _choose(rows, cfg, budget)
    s = eviction.pool(rows.astype(np.float64), cfg.pooling)
    pick = covered(s, lo, hi, n_cover)
    s[:, :lo] = np.inf
    s[:, hi:] = np.inf
    np.put_along_axis(s, pick, np.inf, axis=1)
    return eviction.top_per_row(s, budget)


eviction.choose_keep_rows = choose_keep_rows
opts = dict(M.METHODS["loopserve-d64-head"].options)
for mark, frac in COVER.items():
    name = f"d64h-cover{mark}"
    M.METHODS[name] = M.Method(name, "loopserve", describe=f"loopserve-d64-head with {frac:g} of each head's "
                               "free budget spread over equal stretches of the history",
                               options=tuple({**opts, "chunk_probe": mark}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
