"""Dev-split ablation for issue 15: what recalling the evicted KV at the next question is worth.

Most of the head-wise loss on the benchmark is in the turns after the first: the cut at the end
of turn 1 chose its cells by what question 1 and its reply looked at, and question 2 may need
others. An upper bound for bringing evicted KV back: keep the uncut history's sequence state on
the host, and at the next turn's prefill put it back whole, so that the next cut is chosen by
the new question and reply over the whole history (the device then holds the whole history
during the turn: a bound on what a bounded-memory recall, chunk by chunk, could give).
Registered before the bench CLI runs (not in the package):
- `d32h-recall`: loopserve-d32-head; when a reply ends before its deferred cut (`defer_cut`
  32; the benchmark's replies are shorter), the sequence state before that cut is kept, and
  the next prefill starts by restoring it (tokens and positions as before the cut).
  Marked by `chunk_probe` 1 (read by budgeted prefill only, which the bench's 2K dialogues do
  not reach: n_ctx holds each whole dialogue).
- `d32h-recall2b`: the same with what is restored capped at twice the budget: the history is
  cut cell-wise to 2 x budget cells by the cut's own scores (aggregated over the heads) right
  after it is restored, before the next prefill (`chunk_probe` 2). What a recall that keeps a
  bounded archive could give."""
import sys

import numpy as np

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

E = eviction.Evictor
_begin, _end = E.begin_prefill, E.end_turn


def marked(cfg):
    return cfg.policy == "loopserve" and cfg.chunk_probe in (1, 2)


def end_turn(self, dlg):
    dlg._stash = None
    if marked(self.cfg) and id(dlg) in self.deferred:  # the cut is about to happen here
        self.llm.make_resident(dlg)
        keep = None
        if self.cfg.chunk_probe == 2:  # the archive cut cell-wise to 2 x budget by the same scores
            _, rows = self.llm.attention_scores_by_head(dlg)
            keep = eviction.choose_keep(len(dlg.positions), eviction.aggregate(rows, "mean"), self.cfg,
                                        2 * self.cfg.budget)
        dlg._stash = (self.llm.sequence_state(dlg._seq), list(dlg.tokens), list(dlg.positions), keep)
    _end(self, dlg)


def begin_prefill(self, dlg, n_new):
    stash = getattr(dlg, "_stash", None)
    if stash is not None:
        state, tokens, positions, keep = stash
        assert positions[-1] == dlg.positions[-1]  # the last token is always kept (recent)
        self.llm.restore(dlg, state)
        dlg.tokens, dlg.positions, dlg.layout = tokens, positions, "cell"
        if keep is not None:
            pos = np.asarray(positions)
            self.llm.remove_cells(dlg._seq, pos[~keep])
            dlg.tokens = [t for t, k in zip(tokens, keep) if k]
            dlg.positions = [int(p) for p in pos[keep]]
        dlg._stash = None
    _begin(self, dlg, n_new)


E.begin_prefill, E.end_turn = begin_prefill, end_turn
opts = dict(M.METHODS["loopserve-d32-head"].options)
M.METHODS["d32h-recall"] = M.Method("d32h-recall", "loopserve", describe="loopserve-d32-head, the uncut history "
                                    "restored at the next prefill", options=tuple({**opts, "chunk_probe": 1}.items()))
M.METHODS["d32h-recall2b"] = M.Method("d32h-recall2b", "loopserve", describe="d32h-recall with the restored history "
                                      "cut to twice the budget, cell-wise", options=tuple({**opts, "chunk_probe": 2}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
