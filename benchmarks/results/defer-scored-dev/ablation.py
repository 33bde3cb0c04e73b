"""Dev-split ablation for issue 15's decode target: fewer scored steps before the deferred cut.

Past the budget, the cut after a turn's prefill waits for the reply's first `defer_cut` (32)
tokens and every one of them is scored, so a turn's first 32 decode steps each pay the scoring
(+0.6-0.9 ms on the H200 at 2304 cells, ~+5 ms on the 2-core CPU: scored-step.md). The dev split
chose 32 over 12 and 4, but "much of that is the short replies decoded before the cut" (config.py):
the reply decoding over the whole input. `d32h-sN` keeps the cut at 32 and scores only the first
`DEFER_SCORED` (N, 4 by default) generated tokens (with the input's last tokens, as before); registered before the
bench CLI runs (not in the package), marked by aggregate="max", which head-wise cuts do not read."""
import os
import sys

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

N = int(os.environ.get("DEFER_SCORED", "4"))  # one N a process: the methods' configs are alike
_after_token = eviction.Evictor.after_token


def after_token(self, dlg, n_generated):
    # the deferred cut's window stops after the first N generated tokens' decodes; the cut
    # itself still comes at defer_cut (or at the end of a shorter reply)
    if self.cfg.aggregate == "max" and id(dlg) in self.deferred and n_generated == N:
        self._window(dlg, 0)
    return _after_token(self, dlg, n_generated)


eviction.Evictor.after_token = after_token
base = M.METHODS["loopserve-d32-head"]
M.METHODS[f"d32h-s{N}"] = M.Method(f"d32h-s{N}", "loopserve", describe=f"loopserve-d32-head, the deferred cut "
                                f"scored by the first {N} generated tokens only",
                                options=tuple({**dict(base.options), "aggregate": "max"}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
