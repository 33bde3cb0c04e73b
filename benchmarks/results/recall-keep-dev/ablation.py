"""Ablation for issue 15: the history brought back at the next question and cut by it, the new
input kept whole (recall, measured fairly).

../recall-dev/ restored the uncut history at the next prefill and cut the whole cache back to the
budget by the new question: the later reply then ran over B cells where the method's runs over
B + the new input, and it was level or worse. ../oracle-cpu/ found that a turn-1 cut ranked by
turn 2's attention keeps ~3 points more. Here the restored history alone is cut back to B (its
sinks, its last `recent` cells and the best of the rest, per head), by the attention question 2's
last `prefill_window` tokens pay it during their prefill over the whole history; the new input
stays whole, so the reply runs over as many cells as the method's. Registered before the bench
CLI runs (not in the package):
- `d64h-recall-q`: loopserve-d64-head; when a reply ends before its deferred cut, the sequence
  state before that cut is kept (what the cut then frees stays in host memory: the archive), and
  the next prefill starts by restoring it; right after that prefill, the history is cut as above.
  The next turn's own deferred cut is the method's. Marked by `chunk_probe` 10.
- `d64h-recall-q32`: the same, the history ranked by the new input's last 32 tokens (the question
  itself, not only the chat template's last tokens) instead of `prefill_window` (4). `chunk_probe` 11.
What it costs, which the benchmark does not count: the whole history back on the device for the
next prefill (peak cells = history + input, as without eviction), and the host copy between turns.
"""
import dataclasses
import sys
from pathlib import Path

# the package (llama.cpp's library) before numpy: tests/conftest.py
from loopserve_edge import cli, eviction  # isort: skip

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402

E = eviction.Evictor
_begin, _end, _after = E.begin_prefill, E.end_turn, E.after_prefill


def marked(cfg) -> bool:
    return cfg.policy == "loopserve" and cfg.chunk_probe in (10, 11)


def end_turn(self, dlg):
    dlg._stash = None
    # the deferred cut is about to happen here; only an uncut history is kept (the first
    # turn's: after a recall the cache is cut head-wise, and the benchmark has 2 turns)
    if marked(self.cfg) and id(dlg) in self.deferred and dlg.layout == "cell":
        self.llm.make_resident(dlg)
        dlg._stash = (self.llm.sequence_state(dlg._seq), list(dlg.tokens), list(dlg.positions))
    _end(self, dlg)


def begin_prefill(self, dlg, n_new):
    stash = getattr(dlg, "_stash", None)
    dlg._recall_n = 0
    if stash is not None:
        state, tokens, positions = stash
        assert positions[-1] == dlg.positions[-1]  # the last token is always kept (recent)
        self.llm.restore(dlg, state)
        dlg.tokens, dlg.positions, dlg.layout = tokens, positions, "cell"
        dlg._stash = None
        dlg._recall_n = len(positions)
    _begin(self, dlg, n_new)
    if dlg._recall_n and self.cfg.chunk_probe == 11:
        self._window(dlg, min(32, n_new))


def after_prefill(self, dlg):
    n_hist = getattr(dlg, "_recall_n", 0)
    if marked(self.cfg) and n_hist > self.cfg.budget:  # cut the history by the new input's window rows, keep the input
        dlg._recall_n = 0
        n_tail = len(dlg.positions) - n_hist
        pos, rows = self.llm.attention_scores_by_head(dlg)
        assert np.array_equal(pos, dlg.positions)
        cfg = self.cfg
        self.cfg = dataclasses.replace(cfg, budget=cfg.budget + n_tail, recent=cfg.recent + n_tail)
        try:
            self._cut_heads(dlg, rows, self.cfg.budget)
        finally:
            self.cfg = cfg
    _after(self, dlg)


E.begin_prefill, E.end_turn, E.after_prefill = begin_prefill, end_turn, after_prefill
env_ablation.variant("loopserve-d64-head", "d64h-recall-q", "loopserve-d64-head whose history is restored "
                     "at the next prefill and cut by it, the new input kept whole", chunk_probe=10)
env_ablation.variant("loopserve-d64-head", "d64h-recall-q32", "d64h-recall-q ranking the history by the "
                     "new input's last 32 tokens", chunk_probe=11)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
