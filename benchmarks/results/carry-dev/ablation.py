"""Ablation for issue 15: the previous turns' scores carried into the next turn's cut.

Issue 15 names three ways for the reply's own tokens to shape what is kept in short-reply
chat: `defer_cut` on by default, a cut at the end of every reply (both measured; `defer_cut`
64 is the default since session 22), and "the previous reply's observation rows carried into
the next turn's cut", not tried until now. A loopserve cut ranks the cells by the scores of
its own turn only: the input's last `prefill_window` tokens and the reply's tokens until the
cut; every prefill starts them over (`Evictor.begin_prefill` resets them). The runtime already
moves each kept cell's sums with it through a cut (`llama_loopserve_scores_moved`), so the
carry is to leave them: the cut that ends turn t then ranks by what turns 1..t looked at
(their rows summed with equal weight per row), and keeps for later questions what earlier
questions needed.

Registered before the bench CLI runs (not in the package):
- `d64h-carry`: loopserve-d64-head whose prefills do not reset the scores (marked by
  `chunk_probe` 3, which budgeted prefill alone reads; the bench's 2K dialogues never need it).

Only a cut before a third question can differ (the cut that ends turn 1 has nothing before it to
carry), so the benchmark runs with 3 question turns."""
import sys

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

E = eviction.Evictor
_begin = E.begin_prefill


def begin_prefill(self, dlg, n_new):
    if self.cfg.policy == "loopserve" and self.cfg.chunk_probe == 3 and self.scored:
        self.llm.reset_scores = lambda *a, **k: None  # the earlier turns' sums stay
        try:
            _begin(self, dlg, n_new)
        finally:
            del self.llm.reset_scores  # the class's method again
        return
    _begin(self, dlg, n_new)


E.begin_prefill = begin_prefill
opts = dict(M.METHODS["loopserve-d64-head"].options)
M.METHODS["d64h-carry"] = M.Method("d64h-carry", "loopserve", describe="loopserve-d64-head, the earlier "
                                   "turns' scores kept for the next turn's cut",
                                   options=tuple({**opts, "chunk_probe": 3}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
