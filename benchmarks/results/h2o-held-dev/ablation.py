"""H2O's accumulated scores before and after session 48's held scores (not in the package).

Until session 48 a state round trip of a dialogue's cells (the packing after a big cut, a swap
out of the pool and back, the batch-invariant repack) started them with no scores in the runtime.
H2O accumulates its scores over the whole dialogue, but after every cut that dropped more cells
than it kept (the cut after a long input) the packing zeroed them: its ranking started over at
each such cut. The package now holds the scores through the round trip (held_scores.py). This
registers the package's `h2o-head` and `h2o` as they were (`-zeroed`, marked by `chunk_probe` 13:
the context holds nothing for their dialogues) beside them."""
import sys
from pathlib import Path

# the package (llama.cpp's library) before numpy: tests/conftest.py
from loopserve_edge import cli, context  # isort: skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402

_hold = context.Context._hold_scores


def hold(self, dlg) -> None:
    ev = getattr(dlg, "evictor", None)
    if ev is not None and ev.cfg.chunk_probe == 13:
        return   # as before: the round trip's scores are gone
    _hold(self, dlg)


context.Context._hold_scores = hold
for base in ("h2o-head", "h2o"):
    env_ablation.variant(base, f"{base}-zeroed", f"{base} with the scores zeroed by each state round trip "
                         "(before session 48)", chunk_probe=13)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
