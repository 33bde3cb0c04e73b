"""Ablation for issue 15: each head keeps whole chunks of consecutive tokens (ChunkKV) instead
of single tokens.

A head-wise cut ranks each cell by its scores pooled over 7 neighbouring positions and keeps
each head's best cells one by one. Pooling by the mean favoured runs of tokens a head attends to
together over sharp single peaks (../maxpool-dev/: the maximum kept less). ChunkKV (Liu et al.,
2025) goes further: it splits the context into fixed chunks, ranks each chunk by the sum of its
tokens' scores and keeps whole chunks, so that a kept fact keeps its neighbours (the name with
its value, a number with all its digits).

Registered before the bench CLI runs (not in the package): `d64h-chunkC` is loopserve-d64-head
whose head-wise choice gives each cell between the sinks and the recent cells the sum of its
chunk's raw scores (chunks of C cells counted from the first cell after the sinks; no pooling),
then keeps each row's best cells as before: whole chunks, and of the last one chosen its latest
cells (ties go to recency). Marked by `chunk_probe` 40 + C (budgeted prefill alone reads it;
the bench's 2K dialogues never need it). `d64h-pchunkC` does the same over the pooled scores
(`chunk_probe` 80 + C).
"""
import sys

import numpy as np

from loopserve_edge import cli, eviction  # isort: skip  (the package before numpy's use)
from loopserve_edge.bench import methods as M  # noqa: E402

_choose = eviction.choose_keep_rows
SIZES = (4, 8, 16, 32)


def chunk_sums(s: np.ndarray, lo: int, hi: int, size: int) -> np.ndarray:
    """Each cell of s[:, lo:hi] given the sum over its chunk of `size` cells (from lo)."""
    mid = s[:, lo:hi]
    n = mid.shape[1]
    pad = (-n) % size
    padded = np.pad(mid, [(0, 0), (0, pad)])
    sums = padded.reshape(len(s), -1, size).sum(axis=2)
    out = s.copy()
    out[:, lo:hi] = np.repeat(sums, size, axis=1)[:, :n]
    return out


def choose_keep_rows(rows, cfg, budget):
    mark = cfg.chunk_probe
    if not (40 < mark <= 40 + max(SIZES) or 80 < mark <= 80 + max(SIZES)):
        return _choose(rows, cfg, budget)
    size, pooled = (mark - 80, True) if mark > 80 else (mark - 40, False)
    h, n = rows.shape
    lo, hi = min(cfg.sink, n), max(0, n - cfg.recent)
    if n <= budget or budget - lo - (n - max(lo, hi)) <= 0 or hi <= lo:
        return _choose(rows, cfg, budget)
    s = rows.astype(np.float64)
    if pooled:
        s = eviction.pool(s, cfg.pooling)
    s = chunk_sums(s, lo, hi, size)
    s[:, :lo] = np.inf
    s[:, hi:] = np.inf
    return eviction.top_per_row(s, budget)


eviction.choose_keep_rows = choose_keep_rows
opts = dict(M.METHODS["loopserve-d64-head"].options)
for c in SIZES:
    M.METHODS[f"d64h-chunk{c}"] = M.Method(f"d64h-chunk{c}", "loopserve", describe=f"loopserve-d64-head keeping "
                                           f"whole chunks of {c} cells, ranked by their summed raw scores",
                                           options=tuple({**opts, "chunk_probe": 40 + c}.items()))
    M.METHODS[f"d64h-pchunk{c}"] = M.Method(f"d64h-pchunk{c}", "loopserve", describe=f"loopserve-d64-head keeping "
                                            f"whole chunks of {c} cells, ranked by their summed pooled scores",
                                            options=tuple({**opts, "chunk_probe": 80 + c}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
