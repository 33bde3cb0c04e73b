"""Ablation for issue 15: each head's scores smoothed by a maximum over neighbouring positions
instead of a mean.

A cut ranks each cell by its scores pooled over `pooling` (7) neighbouring positions: the mean,
as SnapKV's and PyramidKV's reference code do by default ("avgpool"); both offer "maxpool"
as well, and KVCache-Factory's LongBench settings use it. A maximum keeps the neighbours of a
sharply attended token as high as the token itself, where the mean lowers a lone peak by 7x
against a broad run of moderate scores.

Registered before the bench CLI runs (not in the package):
- `d64h-maxpool`: loopserve-d64-head whose head-wise choice pools each row by the maximum over 7
  positions (marked by `chunk_probe` 7, which budgeted prefill alone reads; the bench's 2K
  dialogues never need it). The sink and recent cells stay as in every cut."""
import sys

import numpy as np

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

_choose = eviction.choose_keep_rows


def max_pool(rows: np.ndarray, kernel: int) -> np.ndarray:
    pad, n = kernel // 2, rows.shape[1]
    padded = np.pad(rows, [(0, 0), (pad, pad)], mode="edge")
    out = padded[:, :n].copy()
    for j in range(1, kernel):
        np.maximum(out, padded[:, j:j + n], out=out)
    return out


def choose_keep_rows(rows, cfg, budget):
    if cfg.chunk_probe != 7:
        return _choose(rows, cfg, budget)
    h, n = rows.shape
    lo, hi = min(cfg.sink, n), max(0, n - cfg.recent)
    if n <= budget or budget - lo - (n - max(lo, hi)) <= 0 or hi <= lo:
        return _choose(rows, cfg, budget)
    s = max_pool(rows.astype(np.float64), cfg.pooling)
    s[:, :lo] = np.inf
    s[:, hi:] = np.inf
    return eviction.top_per_row(s, budget)


eviction.choose_keep_rows = choose_keep_rows
opts = dict(M.METHODS["loopserve-d64-head"].options)
M.METHODS["d64h-maxpool"] = M.Method("d64h-maxpool", "loopserve", describe="loopserve-d64-head, each head's "
                                     "scores pooled by the maximum over 7 positions",
                                     options=tuple({**opts, "chunk_probe": 7}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
