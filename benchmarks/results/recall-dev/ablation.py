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
  not reach: n_ctx holds each whole dialogue)."""
import sys

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

E = eviction.Evictor
_begin, _end = E.begin_prefill, E.end_turn


def marked(cfg):
    return cfg.policy == "loopserve" and cfg.chunk_probe == 1


def end_turn(self, dlg):
    dlg._stash = None
    if marked(self.cfg) and id(dlg) in self.deferred:  # the cut is about to happen here
        self.llm.make_resident(dlg)
        dlg._stash = (self.llm.sequence_state(dlg._seq), list(dlg.tokens), list(dlg.positions))
    _end(self, dlg)


def begin_prefill(self, dlg, n_new):
    stash = getattr(dlg, "_stash", None)
    if stash is not None:
        state, tokens, positions = stash
        assert positions[-1] == dlg.positions[-1]  # the last token is always kept (recent)
        self.llm.restore(dlg, state)
        dlg.tokens, dlg.positions, dlg.layout = tokens, positions, "cell"
        dlg._stash = None
    _begin(self, dlg, n_new)


E.begin_prefill, E.end_turn = begin_prefill, end_turn
opts = dict(M.METHODS["loopserve-d32-head"].options)
M.METHODS["d32h-recall"] = M.Method("d32h-recall", "loopserve", describe="loopserve-d32-head, the uncut history "
                                    "restored at the next prefill", options=tuple({**opts, "chunk_probe": 1}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
