"""KV eviction: which cells of a dialogue to keep, and when to cut back to the budget.

Policies (LoopServeConfig.policy):
- full       never evicts.
- streaming  keeps the `sink` first and the most recent cells (no scores).
- snapkv     compresses once after each prefill, scored by the input's last `window`
             tokens (no decode-time scoring).
- h2o        scores with every token seen (prefill window and all generated tokens,
             never reset) and compresses every `interval` generated tokens.
- loopserve  scores with the most recent `window` output tokens and compresses every
             `interval` generated tokens (progressive: each turn builds on the last).

Always kept: the first `sink` cells and the last `recent` cells. The rest of the budget
goes to the cells with the highest pooled score. Kept cells keep their positions; new
tokens continue after the highest position.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .config import LoopServeConfig

if TYPE_CHECKING:
    from .dialogue import Dialogue
    from .llama import Llama

SCORED = ("snapkv", "h2o", "loopserve")


def pool(scores: np.ndarray, kernel: int) -> np.ndarray:
    """Average over a window of `kernel` neighbouring positions (SnapKV's smoothing: a
    token next to an important one tends to matter too)."""
    if kernel <= 1 or scores.size == 0:
        return scores
    pad = kernel // 2
    padded = np.pad(scores, pad, mode="edge")
    c = np.cumsum(np.concatenate([[0.0], padded]))
    return (c[kernel:] - c[:-kernel])[: scores.size] / kernel


def aggregate(per_layer: dict[int, np.ndarray], how: str) -> np.ndarray:
    """One score per cell from [n_head_kv, n_cells] arrays: each (layer, head) row is
    normalised to sum 1 first so that no layer dominates, then mean or max over rows."""
    rows = np.concatenate(list(per_layer.values()), axis=0).astype(np.float64)
    rows /= np.maximum(rows.sum(axis=1, keepdims=True), 1e-30)
    return rows.max(axis=0) if how == "max" else rows.mean(axis=0)


def choose_keep(n: int, scores: np.ndarray | None, cfg: LoopServeConfig, budget: int) -> np.ndarray:
    """Boolean mask over a dialogue's cells (in position order) of those to keep."""
    keep = np.zeros(n, dtype=bool)
    if n <= budget:
        keep[:] = True
        return keep
    keep[: cfg.sink] = True
    keep[max(0, n - cfg.recent):] = True
    left = budget - int(keep.sum())
    if left > 0:
        if scores is None:  # recency: the cells just before the recent window
            free = np.flatnonzero(~keep)
            keep[free[-left:]] = True
        else:
            s = pool(np.asarray(scores, dtype=np.float64), cfg.pooling)
            s[keep] = -np.inf
            keep[np.argpartition(-s, left - 1)[:left]] = True
    return keep


def drop_runs(positions: np.ndarray, keep: np.ndarray) -> list[tuple[int, int]]:
    """[p0, p1) position ranges to remove: runs of dropped cells that are adjacent in
    the dialogue's order, so each run is one llama_memory_seq_rm call."""
    edges = np.diff(np.concatenate([[0], (~keep).astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    positions = np.asarray(positions)
    return [(int(positions[s]), int(positions[e - 1]) + 1) for s, e in zip(starts, ends)]


class Evictor:
    """Runs one LoopServeConfig's policy for the dialogues of one Llama."""

    def __init__(self, llm: "Llama", cfg: LoopServeConfig):
        self.llm = llm
        self.cfg = cfg
        self.active = cfg.policy != "full" and cfg.budget is not None
        self.scored = self.active and cfg.policy in SCORED

    # -- turn hooks ----------------------------------------------------------------------

    def make_room(self, dlg: "Dialogue", n_new: int) -> None:
        """Before a prefill that would not fit in the context, cut the history back by
        recency (the new input cannot be scored before it is computed)."""
        if not self.active:
            return
        target = min(self.cfg.budget, self.llm.n_ctx - n_new - 1)
        if len(dlg.positions) + n_new >= self.llm.n_ctx and target >= self.cfg.sink + self.cfg.recent:
            self._compress(dlg, None, target)

    def begin_prefill(self, dlg: "Dialogue", n_new: int) -> None:
        if not self.scored:
            return
        if self.cfg.policy != "h2o":
            self.llm.reset_scores(dlg)
        self.llm.set_score_window(min(self.cfg.window, n_new))

    def after_prefill(self, dlg: "Dialogue") -> None:
        if not self.active:
            return
        self.compress(dlg)
        if self.cfg.policy == "h2o":
            self.llm.set_score_window(1)  # every generated token adds to the scores
        elif self.cfg.policy == "loopserve":
            self._watch(dlg, 0)
        elif self.scored:
            self.llm.set_score_window(0)  # snapkv: no decode-time scoring

    def after_token(self, dlg: "Dialogue", n_generated: int) -> None:
        if not self.active or self.cfg.policy == "snapkv":
            return
        if n_generated % self.cfg.interval == 0:
            self.compress(dlg)
        if self.cfg.policy == "loopserve":
            self._watch(dlg, n_generated)

    def _watch(self, dlg: "Dialogue", n_generated: int) -> None:
        """LoopServe scores with the `window` tokens just before each compression only:
        scoring is switched on for those and off for the rest of the interval (scoring a
        token costs about as much as its attention)."""
        cfg = self.cfg
        phase = n_generated % cfg.interval
        start = (cfg.interval - min(cfg.window, cfg.interval)) % cfg.interval
        if phase == start:
            self.llm.reset_scores(dlg)
            # no cut is due at the coming compression: leave the decodes unscored
            due = len(dlg.positions) + cfg.interval - phase > cfg.budget
            self.llm.set_score_window(1 if due else 0)
        elif phase == 0:
            self.llm.set_score_window(0)

    def end_turn(self, dlg: "Dialogue") -> None:
        if self.scored:
            self.llm.set_score_window(0)

    # -- compression ---------------------------------------------------------------------

    def compress(self, dlg: "Dialogue") -> None:
        if len(dlg.positions) <= self.cfg.budget:
            return
        scores = None
        if self.scored:
            pos, per_layer = self.llm.attention_scores_by_layer(dlg)
            if len(pos) != len(dlg.positions) or not np.array_equal(pos, dlg.positions):
                raise RuntimeError("attention scores do not cover the dialogue's cells")
            scores = aggregate(per_layer, self.cfg.aggregate) if per_layer else None
        self._compress(dlg, scores, self.cfg.budget)

    def _compress(self, dlg: "Dialogue", scores: np.ndarray | None, budget: int) -> None:
        t0 = time.perf_counter()
        positions = np.asarray(dlg.positions)
        keep = choose_keep(len(positions), scores, self.cfg, budget)
        self.llm.make_resident(dlg)
        for p0, p1 in drop_runs(positions, keep):
            self.llm.remove_positions(dlg._seq, p0, p1)
        dropped = int((~keep).sum())
        if dropped > keep.sum():  # a big cut (typically after a prefill) leaves big holes
            self.llm.compact(dlg)
        dlg.tokens = [t for t, k in zip(dlg.tokens, keep) if k]
        dlg.positions = [int(p) for p in positions[keep]]
        dlg.evicted += dropped
        dlg.evict_s += time.perf_counter() - t0
