"""Dev-split ablation for issue 15 ("LoopServe's phase in every turn": a cut at the end of every
reply): `d64h`, loopserve-d32-head with defer_cut 64. The benchmark's replies have at most 48
tokens, so its cut after each prefill waits for the whole reply and is scored by all of it (the
end of the turn makes it). Registered before the bench CLI runs (not in the package)."""
import sys
from loopserve_edge import cli
from loopserve_edge.bench import methods as M
base = M.METHODS["loopserve-d32-head"]
M.METHODS["d64h"] = M.Method("d64h", "loopserve", describe="loopserve-d32-head with defer_cut 64 (the cut at the end of each reply here)",
                             options=tuple({**dict(base.options), "defer_cut": 64}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
