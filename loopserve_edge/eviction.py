"""KV eviction: which cells of a dialogue to keep, and when to cut back to the budget.

Policies (LoopServeConfig.policy):
- full       never evicts.
- streaming  keeps the `sink` first and the most recent cells (no scores).
- snapkv     compresses once after each prefill, scored by the input's last
             `prefill_window` tokens (no decode-time scoring).
- h2o        scores with every token seen (prefill window and all generated tokens,
             never reset) and compresses every `interval` generated tokens.
- loopserve  scores with the most recent `window` output tokens and compresses every
             `interval` generated tokens (progressive: each turn builds on the last).
             After a prefill it cuts at once, scored by the input's last `prefill_window` tokens,
             or, with `defer_cut` > 0, after that many generated tokens, scored by them too
             (by the first `defer_scored` of them when set).

An input that does not fit in n_ctx beside the history (with a policy that evicts) is
prefilled in chunks that fill the free cells, each cut back to the budget (streaming: by
recency), so any input passes through the budget's cells. A chunk's cut is scored by the
input's own last tokens, decoded after the chunk and removed again (`chunk_probe`), so it
sees the question the input ends with, as the cut after a whole input does.

Always kept: the first `sink` cells and the last `recent` cells. The rest of the budget
goes to the cells with the highest pooled score, or with `span` > 1 to whole spans of that many
consecutive cells with the highest summed score (ChunkKV). New tokens continue after the highest kept
position; once that passes half the trained context (`compact_positions="auto"`; "always":
at every cut) a cut gives the kept cells consecutive positions again, their keys re-rotated,
so a dialogue's positions stay within the trained range however long it grows. Gemma 3 with
its window-sized window cache compacts only when the next tokens would pass the trained
context.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import allocation, bindings, cupy_device
from .config import LoopServeConfig
from .errors import ContextFullError, LoopServeError

if TYPE_CHECKING:
    from .context import Context

SCORED = ("snapkv", "h2o", "loopserve")
# cupy_select="auto" chooses on the host: since session 32's C++ choice (the k-th highest from a
# sample's bound, pooling in one pass) it was faster than cupy on the device at every size
# measured, on an H100 box's 8 host threads 1.4 against 5.4 ms for the 135M shape's periodic cut
# (90 rows x 2176 cells), 34 against 44 ms at 128 x 131072, 54 against 62 ms at 256 x 131072
# (benchmarks/results/cut-select.md, session 33; session 18's slower C++ had set a threshold of
# 2^24 scores above which the device was used)
CUPY_BLOCK = 1 << 23  # scores per block on the device: a few hundred MB at most, beside the model's
# threads of the host's choice (llama_loopserve_select_rows), which uses them from 2^16 scores on
HOST_THREADS = max(1, min(8, os.cpu_count() or 1))


def pool(scores, kernel: int, xp=np):
    """Average over a window of `kernel` neighbouring positions along the last axis (SnapKV's
    smoothing: a token next to an important one tends to matter too); rows of a 2D array each
    as alone. Shifted sums rather than a running sum: numpy and cupy (xp) then round alike,
    so the host and the device choose the same cells, ties included."""
    if kernel <= 1 or scores.size == 0:
        return scores
    pad, n = kernel // 2, scores.shape[-1]
    padded = xp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(pad, pad)], mode="edge")
    out = padded[..., :n].copy()
    for j in range(1, kernel):
        out += padded[..., j:j + n]
    out /= kernel
    return out


def span_sums(scores: np.ndarray, lo: int, hi: int, span: int) -> np.ndarray:
    """ChunkKV's ranking: [rows, n] float32 scores in which each cell between lo and hi holds
    the sum of its span's scores (spans of `span` consecutive cells counted from lo, the last one
    shorter where hi - lo is not a multiple), so that the best cells of a row are whole spans.
    Summed in float64 and rounded to float32 once, so that the host's choice, the device's and
    the cell-wise one rank the same values (ties included)."""
    scores = np.asarray(scores)
    out = scores.astype(np.float32)  # a copy
    n, rows = max(0, hi - lo), len(out)
    if span > 1 and n > 0:
        mid, whole = scores[:, lo:hi].astype(np.float64), n // span * span
        sums = mid[:, :whole].reshape(rows, -1, span).sum(axis=2)
        if whole < n:  # the last, shorter span
            sums = np.concatenate([sums, mid[:, whole:].sum(axis=1, keepdims=True)], axis=1)
        out[:, lo:hi] = np.repeat(sums.astype(np.float32), span, axis=1)[:, :n]
    return out


def top_per_row(s, k: int, xp=np):
    """[rows, k] ascending indices of each row's k highest values of s [rows, n]; among
    values tied at a row's k-th highest, the latest positions (recency breaks ties)."""
    rows = s.shape[0]
    t = -xp.partition(-s, k - 1, axis=1)[:, k - 1:k]
    above, tied = s > t, s == t
    need = k - above.sum(axis=1, keepdims=True)
    from_end = xp.cumsum(tied[:, ::-1], axis=1)[:, ::-1]
    keep = above | (tied & (from_end <= need))
    return xp.nonzero(keep)[1].reshape(rows, k)


def aggregate(rows: np.ndarray, how: str) -> np.ndarray:
    """One score per cell from [n_heads, n_cells] scores (a row per layer and KV head):
    each row is normalised to sum 1 first so that no layer dominates, then mean or max
    over rows."""
    inv = (1.0 / np.maximum(rows.sum(axis=1), 1e-30)).astype(rows.dtype)
    if how == "max":
        return (rows * inv[:, None]).max(axis=0)
    return inv @ rows / len(rows)  # the mean of the normalised rows, one product


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
            s = np.array(scores, dtype=np.float64)[None]
            lo = min(cfg.sink, n)
            if cfg.span > 1:
                s = span_sums(s, lo, max(lo, n - cfg.recent), cfg.span).astype(np.float64)
            else:
                s = pool(s, cfg.pooling)
            s[:, keep] = -np.inf
            keep[top_per_row(s, left)[0]] = True
    return keep


def choose_keep_rows(rows: np.ndarray, cfg: LoopServeConfig, budget: int) -> np.ndarray:
    """choose_keep for each row of [n_heads, n_cells] scores: [n_heads, budget] ascending cell
    indices, row for row the cells choose_keep keeps. On the device (cupy) where cfg.cupy_select
    is "on" and cupy sees one, else on the host."""
    h, n = rows.shape
    lo, hi = min(cfg.sink, n), max(0, n - cfg.recent)
    left = budget - lo - (n - max(lo, hi))
    if n <= budget or left <= 0 or hi <= lo:
        return np.tile(np.flatnonzero(choose_keep(n, None, cfg, budget)), (h, 1))
    kernel = cfg.pooling
    if cfg.span > 1:  # whole spans: their sums, rounded to the scores' type, ranked without pooling
        rows, kernel = span_sums(rows, lo, hi, cfg.span), 1
    cp = cupy_device.module() if cfg.cupy_select == "on" else None
    if cp is not None:
        try:
            step = max(1, CUPY_BLOCK // n)
            return np.concatenate([cp.asnumpy(_keep_rows(cp.asarray(rows[i:i + step]), kernel, lo, hi, budget, cp))
                                   for i in range(0, h, step)])
        except cp.cuda.memory.OutOfMemoryError:
            pass  # this cut the host's way, below
        except Exception as e:  # noqa: BLE001  (any other failure: never cupy again, said once)
            cupy_device.disable(e)
        finally:
            cupy_device.release(cp)
    return _select_host(rows, kernel, lo, hi, budget)


def _select_host(rows: np.ndarray, kernel: int, lo: int, hi: int, budget: int) -> np.ndarray:
    """_keep_rows on the host, in the runtime's C++ (llama_loopserve_select_rows): the same
    cells, rounding and ties included, in one pass per row on up to HOST_THREADS threads,
    where numpy's passes over blocks of rows took ~10 ms for a periodic cut at budget 2048."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.empty((rows.shape[0], budget), np.int32)
    rc = bindings.llama_loopserve_select_rows(rows.ctypes.data_as(bindings._f32p), rows.shape[0], rows.shape[1],
                                              kernel, lo, hi, budget, HOST_THREADS,
                                              out.ctypes.data_as(bindings._i32p))
    if rc != 0:
        raise LoopServeError("a cut's scores cannot be ranked (NaN among them?)")
    return out


_warm = False


def warm_device(cfg: LoopServeConfig) -> None:
    """Once a process, where cupy is there: one small selection on the device, so that the
    first cut does not pay for cupy's start (0.23 s on the H200 with its kernels cached on disk;
    the first time on a machine it compiles them: 6 s; benchmarks/results/cut-select.md)."""
    global _warm
    if not _warm and cupy_device.module() is not None:
        _warm = True
        budget = cfg.sink + cfg.recent + 8  # room beside the sinks and the recent cells
        choose_keep_rows(np.zeros((1, budget + 64), np.float32), dataclasses.replace(cfg, cupy_select="on"), budget)


def _keep_rows(rows, kernel: int, lo: int, hi: int, budget: int, xp=np):
    """The cells choose_keep_rows keeps of a block of rows, on xp's arrays: the sink and recent
    cells (scored +inf here) and the best pooled scores between them."""
    s = pool(rows.astype(xp.float64), kernel, xp)  # a copy either way: edited below
    s[:, :lo] = np.inf
    s[:, hi:] = np.inf
    return top_per_row(s, budget, xp)


class Tracked(Protocol):
    """What the evictor works on: the KV cells of one sequence owner (a dialogue), as
    token and position lists in cell order, with its sequence in the context."""

    tokens: list[int]
    positions: list[int]
    spans: list[tuple[int, int]]  # each cell's token as a byte span of the dialogue's text (text_spans)
    evicted: int      # cells removed so far
    layout: str       # "cell", or "head" after a head-wise cut
    hidden: np.ndarray | None  # rows hidden by a cut's allocation ([n_heads, K] of the first K cells)
    score_window: int  # the scoring its next decodes want (Evictor._window)
    evict_s: float    # time spent evicting, this turn
    _seq: int | None
    _swapped: bytes | None


class Evictor:
    """Runs one LoopServeConfig's policy over the sequences of one context: it reads their
    attention scores and removes their cells there."""

    def __init__(self, llm: "Context", cfg: LoopServeConfig):
        self.llm = llm
        self.cfg = cfg
        self.active = cfg.policy != "full" and cfg.budget is not None
        self.scored = self.active and cfg.policy in SCORED
        # the dialogues whose post-prefill cut waits (defer_cut), by id: several may be
        # generating at once (a server decoding them in one batch)
        self.deferred: set[int] = set()
        if self.active:
            # a dialogue cut back to its cells must leave room for new input (next_chunk's
            # least: one token and the chunk's probe); refused here, not at the first long input
            probe = cfg.chunk_probe if self.scored and not llm.sliding_window else 0
            least = cfg.cells + 2 + max(1, probe)
            if llm.n_ctx < least:
                raise LoopServeError(
                    f"n_ctx={llm.n_ctx} leaves no cells for new input beside the KV budget of {cfg.budget}"
                    + (f" ({cfg.cells} cells with allocation {cfg.allocation!r})" if cfg.cells != cfg.budget else "")
                    + f": use an n_ctx well above the budget (about twice it; at least {least})")
        if self.scored and cfg.granularity == "head" and cfg.cupy_select == "on":
            warm_device(cfg)

    # -- turn hooks ----------------------------------------------------------------------

    def chunk_probe(self, new: list[int]) -> list[int]:
        """The tokens decoded after each chunk of this input to score its cut (none: the
        chunk's own last tokens score it)."""
        if not self.scored or self.cfg.chunk_probe == 0 or self.llm.sliding_window:
            return []
        return new[-self.cfg.chunk_probe:]

    def next_chunk(self, dlg: Tracked, n_rest: int, n_probe: int = 0) -> int:
        """Budgeted prefill (an input that does not fit beside the history): how many of its
        remaining `n_rest` tokens go in next. As many as the free cells take, less the few
        the reply needs before its first cut (where the context has room for them) and the
        probe's; each chunk but the last is followed by after_chunk. If the history leaves too
        little room, it is first cut back to the budget by recency (the input cannot be scored
        before it is computed)."""
        cfg, n_ctx = self.cfg, self.llm.n_ctx

        def room(reserve: int) -> int:
            return n_ctx - 1 - len(dlg.positions) - reserve

        reserve = max(1 + (cfg.defer_cut if cfg.policy == "loopserve" else 0), n_probe)
        free = room(reserve)
        if free < min(n_rest, cfg.prefill_window) and len(dlg.positions) > cfg.budget:
            self._compress(dlg, None, cfg.budget)
            free = room(reserve)
        if free < 1:
            # no room for the reply's tokens before its deferred cut as well: that cut then
            # comes when the context fills (make_room), with fewer of them to score it
            free = room(max(1, n_probe))
        if free < 1:
            raise ContextFullError(
                f"n_ctx={n_ctx} leaves no cells for new input beside the KV budget of {cfg.budget}: "
                f"use an n_ctx well above the budget (the room beyond it is the prefill chunk)")
        return min(n_rest, free)

    def after_chunk(self, dlg: Tracked, probe: list[int]) -> None:
        """The cut after a chunk of a budgeted prefill: scored by the last `prefill_window`
        tokens of the probe (chunk_probe), decoded after the chunk and removed again, else by
        the chunk's last tokens."""
        if probe:
            if self.cfg.policy != "h2o":
                self.llm.reset_scores(dlg)
            self._window(dlg, min(self.cfg.prefill_window, len(probe)))
            start = dlg.positions[-1] + 1
            self.llm.decode(dlg, probe, list(range(start, start + len(probe))))
            self.llm.remove_positions(dlg._seq, start)
        self.compress(dlg)

    def begin_prefill(self, dlg: Tracked, n_new: int) -> None:
        """Before an input's tokens are given their positions (after the last one kept)."""
        if self.active and dlg.positions and dlg.positions[-1] + 1 + n_new > self.llm.n_ctx_train:
            if not self.llm.can_compact:
                raise LoopServeError(
                    f"this model's position encoding cannot be shifted, so eviction cannot take a "
                    f"dialogue past its trained context ({self.llm.n_ctx_train} positions; this turn "
                    f"would reach {dlg.positions[-1] + 1 + n_new}): start a new dialogue")
            if self.cfg.compact_positions != "never" and not self.llm.can_shift:
                self._compact(dlg)  # a window-sized window cache compacts when it must (below)
        if not self.scored:
            return
        if self.cfg.policy != "h2o":
            self.llm.reset_scores(dlg)
        self._window(dlg, min(self.cfg.prefill_window, n_new))

    def after_prefill(self, dlg: Tracked) -> None:
        if not self.active:
            return
        if (self.cfg.policy == "loopserve" and self.cfg.defer_cut > 0
                and len(dlg.positions) > self.cfg.budget):
            # the first generated tokens (defer_scored of them) add to the input window's
            # scores, then the cut
            self.deferred.add(id(dlg))
            self._window(dlg, 0 if self.cfg.defer_scored == 0 else 1)
            return
        self.compress(dlg)
        if self.cfg.policy == "h2o":
            self._window(dlg, 1)  # every generated token adds to the scores
        elif self.cfg.policy == "loopserve":
            self._watch(dlg, 0)
        elif self.scored:
            self._window(dlg, 0)  # snapkv: no decode-time scoring

    def after_token(self, dlg: Tracked, n_generated: int) -> None:
        if not self.active or self.cfg.policy == "snapkv":
            return
        if id(dlg) in self.deferred:
            if n_generated < self.cfg.defer_cut:
                if n_generated == self.cfg.defer_scored:
                    self._window(dlg, 0)  # the rest of the wait decodes unscored
                return
            self._deferred_cut(dlg)
        if n_generated % self.cfg.interval == 0:
            self.compress(dlg)
        if self.cfg.policy == "loopserve":
            self._watch(dlg, n_generated)

    def make_room(self, dlg: Tracked) -> bool:
        """The context is full while a reply waits for its deferred cut (an input that fitted
        but left fewer than `defer_cut` cells free): cut now, scored by the tokens generated so
        far, rather than end the reply. False when there is no such cut to make, or it freed
        nothing."""
        if id(dlg) not in self.deferred:
            return False
        self._deferred_cut(dlg)
        return len(dlg.positions) + 1 < self.llm.n_ctx

    def _deferred_cut(self, dlg: Tracked) -> None:
        self.deferred.discard(id(dlg))
        self.compress(dlg)
        self._window(dlg, 0)  # until the window before the next compression

    def _watch(self, dlg: Tracked, n_generated: int) -> None:
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
            self._window(dlg, 1 if due else 0)
        elif phase == 0:
            self._window(dlg, 0)

    def end_turn(self, dlg: Tracked) -> None:
        if id(dlg) in self.deferred:  # a reply shorter than defer_cut: cut with what was scored
            self._deferred_cut(dlg)
        if self.scored:
            self._window(dlg, 0)

    def _window(self, dlg: Tracked, n: int) -> None:
        """Score the next decodes of dlg with their last n tokens (0: not at all). Recorded on the
        dialogue as well: a batch of several dialogues' tokens is scored if any of them wants it
        (Context.decode_batch)."""
        dlg.score_window = n
        self.llm.set_score_window(n)

    # -- compression ---------------------------------------------------------------------

    def compress(self, dlg: Tracked) -> None:
        if len(dlg.positions) <= self.cfg.budget:
            return
        # swapped out between its reply's decode and this cut (the server prefills another
        # request there): back into the pool, its scores held meanwhile (held_scores)
        self.llm.make_resident(dlg)
        t0 = time.perf_counter()
        rows = None
        if self.scored:
            pos, rows = self.llm.attention_scores_by_head(dlg)
            if len(pos) != len(dlg.positions) or not np.array_equal(pos, dlg.positions):
                raise RuntimeError("attention scores do not cover the dialogue's cells")
            rows = rows if len(rows) else None
        dlg.evict_s += time.perf_counter() - t0  # the cut adds its own part
        if rows is not None and self.cfg.granularity == "head":
            self._cut_heads(dlg, rows, self.cfg.budget)
        else:
            self._compress(dlg, None if rows is None else aggregate(rows, self.cfg.aggregate), self.cfg.budget)

    def _should_compact(self, dlg: Tracked) -> bool:
        mode = self.cfg.compact_positions
        if mode == "never" or not self.llm.can_compact or not dlg.positions:
            return False
        if mode == "always":
            return True
        if self.llm.can_shift:  # measured on the default model (README: positions)
            return dlg.positions[-1] >= self.llm.n_ctx_train // 2
        # Gemma 3's window-sized window cache: only when the next tokens would pass the trained
        # context (a reply runs `interval` tokens between cuts; an input compacts first, in
        # begin_prefill), as its benchmark figures within that context were made without it
        return dlg.positions[-1] + self.cfg.interval >= self.llm.n_ctx_train

    def _compact(self, dlg: Tracked) -> None:
        self.llm.compact_positions(dlg)
        # 0, 1, ... but where a sliding-window cache holds tokens a cut took (their ranks)
        dlg.positions = self.llm.cell_positions(dlg)

    def _compress(self, dlg: Tracked, scores: np.ndarray | None, budget: int) -> None:
        """Cell-wise: every layer and head keeps the same cells."""
        t0 = time.perf_counter()
        positions = np.asarray(dlg.positions)
        keep = choose_keep(len(positions), scores, self.cfg, budget)
        self.llm.make_resident(dlg)
        self.llm.remove_cells(dlg._seq, positions[~keep])
        if getattr(dlg, "hidden", None) is not None:  # the hidden rows of the cells that stay
            self.llm.set_hidden(dlg, dlg.hidden[:, keep[:dlg.hidden.shape[1]]])
        kept = np.flatnonzero(keep)
        self._after_cut(dlg, kept, len(positions) - len(kept), t0)

    def _cut_heads(self, dlg: Tracked, rows: np.ndarray, budget: int) -> None:
        """Head-wise: each KV head of each scored layer keeps its own `budget` tokens, by its
        own row of scores; they move into the dialogue's lowest `budget` cells. The j-th cell's
        bookkeeping (position, token) is that of the latest token any head keeps there, which
        is what the runtime gives the cell as its position. With a non-uniform allocation each
        head keeps its own share (allocation.py): the cells are as many as the largest share
        needs, and each head's rows beyond its share are hidden from it."""
        t0 = time.perf_counter()
        n = len(dlg.positions)
        hidden = None
        if self.cfg.allocation == "uniform":
            sel = choose_keep_rows(rows, self.cfg, budget)
        else:
            lo, hi = min(self.cfg.sink, n), max(min(self.cfg.sink, n), n - self.cfg.recent)
            s = pool(rows.astype(np.float64), self.cfg.pooling)
            keep = lo + (n - hi) + allocation.row_shares(s[:, lo:hi], self.llm.layer_heads(), self.cfg)
            sel = choose_keep_rows(rows, self.cfg, min(n, int(keep.max())))
            hidden = allocation.hide_beyond(s, sel, lo, hi, keep)
        self.llm.keep_per_head(dlg, sel)
        dlg.layout = "head"
        self.llm.set_hidden(dlg, hidden)
        # the cells are in position order and each head's row ascends, so the latest token kept
        # in column j is the highest index there (4 ms less a cut than a gather and an argmax
        # over [heads, budget] positions at the 1B shape's 128 x 2048)
        latest = sel.max(axis=0)
        # the rows went to the dialogue's lowest cells: no holes to pack, but in the window
        # cache of a sliding-window model, which is cut cell-wise
        self._after_cut(dlg, latest, n - sel.shape[1], t0, pack=self.llm.sliding_window)

    def _after_cut(self, dlg: Tracked, kept: np.ndarray, dropped: int, t0: float, pack: bool = True) -> None:
        """The dialogue's token and position lists after a cut kept the cells `kept` (indices
        into the lists before it), then packing and position compaction as due."""
        if pack and dropped > len(kept):  # a big cut (typically after a prefill) leaves big holes
            self.llm.compact(dlg)
        # picked from the lists (not converted whole to arrays: ~3 ms at 64K cells on the dev box)
        idx = np.asarray(kept).tolist()
        dlg.tokens = [dlg.tokens[i] for i in idx]
        dlg.positions = [dlg.positions[i] for i in idx]
        dlg.spans = [dlg.spans[i] for i in idx]
        if self._should_compact(dlg):
            self._compact(dlg)
        dlg.evicted += dropped
        dlg.evict_s += time.perf_counter() - t0
