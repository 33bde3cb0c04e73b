"""Dev-split ablation for issue 15: the cut after a prefill also scored by every row of the input.

LoopServe's deferred cut is scored by the input's last `prefill_window` tokens and the reply's
first `defer_cut` ones: what the current question and its answer look at. The next question
may ask about something else, and most of the head-wise loss on the benchmark is in the turns
after the first. A query-agnostic part (as in KVzip or H2O over the whole input: what the
text's own tokens attend to) keeps what the text itself leans on. Methods registered before
the bench CLI runs (not in the package):
- `d32h-qaNN`: loopserve-d32-head whose prefill is scored by all of its input's rows; those
  scores are read when the prefill ends, each key's sum divided by the number of rows that
  could see it (a mean, so early tokens are not favoured for being seen more often), each
  (layer, KV head) row normalised to sum 1, and the scores reset; the deferred cut then ranks
  each head's cells by (1 - NN/100) x its reply-scored row (normalised to sum 1) + NN/100 x
  that input row (0 for the reply's cells).
The share NN travels in `chunk_probe` (read by budgeted prefill only, which the bench's 2K
dialogues do not reach: n_ctx holds each whole dialogue)."""
import sys

import numpy as np

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

E = eviction.Evictor
_begin, _after, _cut = E.begin_prefill, E.after_prefill, E._cut_heads


def share(cfg):
    return cfg.chunk_probe / 100 if cfg.policy == "loopserve" and cfg.chunk_probe not in (0, 32) else None


def begin_prefill(self, dlg, n_new):
    _begin(self, dlg, n_new)
    if share(self.cfg) is not None and self.scored:
        self._window(dlg, min(n_new, self.llm.n_batch))  # every row of the input scores
        dlg._qa_rows = min(n_new, self.llm.n_batch)


def after_prefill(self, dlg):
    w = getattr(dlg, "_qa_rows", 0)
    if w and self.active and len(dlg.positions) > self.cfg.budget:
        pos, rows = self.llm.attention_scores_by_head(dlg)
        n = len(pos)
        seen = n - np.maximum(np.arange(n), n - w)  # rows that could attend to each cell
        q = rows / np.maximum(seen, 1)
        q /= np.maximum(q.sum(axis=1, keepdims=True), 1e-30)
        dlg._qa = (np.asarray(pos), q)
        self.llm.reset_scores(dlg)
    dlg._qa_rows = 0
    _after(self, dlg)


def cut_heads(self, dlg, rows, budget):
    qa = getattr(dlg, "_qa", None)
    lam = share(self.cfg)
    if qa is not None and lam is not None:
        pos, q = qa
        idx = np.searchsorted(np.asarray(dlg.positions), pos)
        r = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-30)
        full = np.zeros_like(r)
        full[:, idx] = q
        rows = ((1 - lam) * r + lam * full).astype(rows.dtype)
    dlg._qa = None
    return _cut(self, dlg, rows, budget)


E.begin_prefill, E.after_prefill, E._cut_heads = begin_prefill, after_prefill, cut_heads
for nn in (25, 50):  # the two shares run (qa-dev/README.md)
    opts = dict(M.METHODS["loopserve-d32-head"].options)
    M.METHODS[f"d32h-qa{nn}"] = M.Method(f"d32h-qa{nn}", "loopserve", describe=f"loopserve-d32-head, cut also "
                                         f"scored by every input row ({nn}%)",
                                         options=tuple({**opts, "chunk_probe": nn}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
