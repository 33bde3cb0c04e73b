"""Ablation for issue 15: evicted KV brought back at the next question (recall).

Most of the head-wise loss on the benchmark is in the turns after the first: the cut at the end
of turn 1 chose its cells by what question 1 and its reply looked at, and question 2 may need
others. These variants keep the sequence state from before that cut and restore it when the next
prefill starts. With `defer_cut` 32 and replies shorter than that, a turn's cut comes after its
reply, so the first three decode the next reply over the restored cells (README.md says what
that does and does not measure); `d32h-recall-cut` cuts before the reply.
Registered before the bench CLI runs (not in the package):
- `d32h-recall`: loopserve-d32-head; when a reply ends before its deferred cut (`defer_cut`
  32; the benchmark's replies are shorter), the sequence state before that cut is kept, and
  the next prefill starts by restoring it (tokens and positions as before the cut).
  Marked by `chunk_probe` 1 (read by budgeted prefill only, which the bench's 2K dialogues do
  not reach: n_ctx holds each whole dialogue).
- `d32h-recall2b`: the same with what is restored capped at twice the budget: the history is
  cut cell-wise to 2 x budget cells by the cut's own scores (aggregated over the heads) right
  after it is restored, before the next prefill (`chunk_probe` 2): a bounded archive.
  `d32h-recall4b`: capped at 4 x budget (`chunk_probe` 4).
- `d32h-recall-cut`: d32h-recall whose restored history is cut back to the budget right after
  the next prefill (scored by that input's last tokens, SnapKV's cut), not after the first 32
  reply tokens (`chunk_probe` 5). With the benchmark's short replies, the other forms decode
  each later reply over the restored cells (their cut comes after it); this one decodes it over
  the budget's cells, chosen by the new question from the whole history.
- `d32h-recall-d4`: d32h-recall-cut whose cut waits for the reply's first 4 tokens and is scored
  by them too (`defer_cut` 4's cut, `chunk_probe` 6)."""
import sys

import numpy as np

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

E = eviction.Evictor
_begin, _end, _after, _after_token = E.begin_prefill, E.end_turn, E.after_prefill, E.after_token


def marked(cfg):
    return cfg.policy == "loopserve" and cfg.chunk_probe in (1, 2, 4, 5, 6)


def end_turn(self, dlg):
    if getattr(dlg, "_defer4", False):  # a reply shorter than 4 tokens
        dlg._defer4 = False
        self.compress(dlg)
    dlg._stash = None
    if marked(self.cfg) and id(dlg) in self.deferred:  # the cut is about to happen here
        self.llm.make_resident(dlg)
        keep = None
        if self.cfg.chunk_probe in (2, 4):  # the archive cut cell-wise to 2 or 4 x budget by the same scores
            _, rows = self.llm.attention_scores_by_head(dlg)
            keep = eviction.choose_keep(len(dlg.positions), eviction.aggregate(rows, "mean"), self.cfg,
                                        self.cfg.chunk_probe * self.cfg.budget)
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
        dlg._recalled = self.cfg.chunk_probe in (5, 6)
    _begin(self, dlg, n_new)


def after_prefill(self, dlg):
    if getattr(dlg, "_recalled", False):  # cut now, by the new input's last tokens, before the reply
        dlg._recalled = False
        if self.cfg.chunk_probe == 6:  # or after the reply's first 4 tokens, scored by them too
            dlg._defer4 = True
            self._window(dlg, 1)
            return
        self.compress(dlg)
        self._watch(dlg, 0)
        return
    _after(self, dlg)


def after_token(self, dlg, n_generated):
    if getattr(dlg, "_defer4", False):
        if n_generated < 4:
            return
        dlg._defer4 = False
        self.compress(dlg)
        self._window(dlg, 0)
    _after_token(self, dlg, n_generated)


E.begin_prefill, E.end_turn, E.after_prefill, E.after_token = begin_prefill, end_turn, after_prefill, after_token
opts = dict(M.METHODS["loopserve-d32-head"].options)
M.METHODS["d32h-recall"] = M.Method("d32h-recall", "loopserve", describe="loopserve-d32-head, the uncut history "
                                    "restored at the next prefill", options=tuple({**opts, "chunk_probe": 1}.items()))
M.METHODS["d32h-recall-cut"] = M.Method("d32h-recall-cut", "loopserve", describe="d32h-recall whose restored "
                                       "history is cut right after the next prefill, before the reply",
                                       options=tuple({**opts, "chunk_probe": 5}.items()))
M.METHODS["d32h-recall-d4"] = M.Method("d32h-recall-d4", "loopserve", describe="d32h-recall-cut whose cut waits "
                                      "for the reply's first 4 tokens", options=tuple({**opts, "chunk_probe": 6}.items()))
for k in (2, 4):
    M.METHODS[f"d32h-recall{k}b"] = M.Method(f"d32h-recall{k}b", "loopserve", describe=f"d32h-recall with the restored "
                                             f"history cut to {k} x the budget, cell-wise",
                                             options=tuple({**opts, "chunk_probe": k}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
