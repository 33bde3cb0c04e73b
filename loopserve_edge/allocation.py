"""Budget allocation of a head-wise cut: how many tokens each KV head keeps
(LoopServeConfig.allocation).

- uniform  every head `budget` (eviction.choose_keep_rows alone).
- pyramid  PyramidKV: per layer, falling linearly from the first scored layer to the last
           (the last keeps 1/PYRAMID_BETA of the mean share), the same mean.
- ada      Ada-KV: per head by score mass within each layer: every head first keeps its best
           ADA_FLOOR of the mean share, then the layer's best remaining scores, whichever head
           they belong to, fill the layer's total; a head keeps at most the cells' room.

Shares count the tokens between the sinks and the recent cells, which every head keeps. Scores
are comparable across the heads of a layer: each KV head's row sums the probabilities of the
same window rows over the same number of query heads.

llama.cpp's cells hold a row for every head, so the cut keeps as many cells as the head that
keeps the most (each head its best, as a uniform cut of that many would) and hides, in each
head, the rows beyond its share (llama_loopserve_seq_hide): those keep their tokens but not
that head's attention."""
from __future__ import annotations

import numpy as np

from .config import PYRAMID_BETA, LoopServeConfig

ADA_FLOOR = 0.2  # Ada-KV's safeguard: the part of the mean share every head keeps


def layer_shares_pyramid(n_layers: int, free: int) -> np.ndarray:
    """PyramidKV's per-layer shares (tokens beside the fixed cells) for a mean of `free`."""
    lo = free // PYRAMID_BETA
    hi = 2 * free - lo
    if n_layers == 1:
        return np.array([free])
    share = np.floor(hi - (hi - lo) * np.arange(n_layers) / (n_layers - 1)).astype(np.int64)
    # Rounding: the layers after the first take one more each (the first is already at hi,
    # the cap cfg.cells is built on; the middle layers lose under one each, so short <= n - 2).
    short = n_layers * free - int(share.sum())
    share[1 : short + 1] += 1
    return share


def row_shares(s_mid: np.ndarray, layer_heads: list[int], cfg: LoopServeConfig) -> np.ndarray:
    """Tokens beside the fixed cells each row (KV head, layers in order) keeps, from the pooled
    scores of the cells between the sinks and the recent ones, s_mid [rows, n_mid]."""
    free = cfg.budget - cfg.sink - cfg.recent
    cap = cfg.cells - cfg.sink - cfg.recent
    n_mid = s_mid.shape[1]
    if cfg.allocation == "pyramid":
        shares = np.repeat(layer_shares_pyramid(len(layer_heads), free), layer_heads)
        return np.minimum(shares, n_mid)
    if cfg.allocation != "ada":
        return np.full(len(s_mid), min(free, n_mid), np.int64)
    floor = min(int(ADA_FLOOR * free), n_mid)
    room = min(cap, n_mid)
    best = -np.sort(-s_mid, axis=1)[:, :room]  # each row's scores, best first
    shares = np.empty(len(s_mid), np.int64)
    r0 = 0
    for h in layer_heads:
        extra = best[r0:r0 + h, floor:]  # what each head may take beyond its floor
        want = min(h * (free - floor), extra.size)
        take = np.zeros(extra.shape, bool)
        if want > 0:
            flat = np.argpartition(-extra.ravel(), want - 1)[:want]
            take.ravel()[flat] = True
        shares[r0:r0 + h] = floor + take.sum(axis=1)
        r0 += h
    return shares


def hide_beyond(s: np.ndarray, sel: np.ndarray, lo: int, hi: int, keep: np.ndarray) -> np.ndarray | None:
    """Of the cells sel [rows, K] that a cut keeps (ascending indices), those each row hides:
    all but its `keep` best by pooled score s [rows, n_cells] (the sinks, below lo, and the
    recent cells, from hi on, first; the latest among ties). [rows, K] uint8, None if none."""
    k = sel.shape[1]
    vals = np.take_along_axis(s, sel, axis=1)
    vals[(sel < lo) | (sel >= hi)] = np.inf
    order = np.lexsort((-sel, -vals), axis=-1)  # best first, the latest among ties
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(k), order.shape), axis=1)
    hidden = (rank >= keep[:, None]).astype(np.uint8)
    return hidden if hidden.any() else None
