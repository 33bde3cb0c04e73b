"""Dev-split ablation for issue 15: LoopServe's decode-time window, now that scoring is cheap.

`window` (4) is how many generated tokens before each periodic cut score it. It was 4 for speed:
a scored step used to cost about half a plain one on the GPU. With saved query rows
(LoopServeConfig.saved_queries, session 21) a scored step costs ~+0.08 ms there, so the question
is whether more of each interval's tokens should score the cut. Method registered before the
bench CLI runs (not in the package):
- `d32h-w16`: loopserve-d32-head with window 16 (at budget 256 the interval is 16: every
  generated token scores the next periodic cut), prefill_window kept at 4 (the input's window,
  which `window` sets by default)."""
import sys

from loopserve_edge import cli
from loopserve_edge.bench import methods as M

base = M.METHODS["loopserve-d32-head"]
M.METHODS["d32h-w16"] = M.Method("d32h-w16", "loopserve", describe="loopserve-d32-head, window 16",
                                 options=tuple({**dict(base.options), "window": 16, "prefill_window": 4}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
