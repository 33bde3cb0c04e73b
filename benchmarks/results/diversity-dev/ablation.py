"""Ablation for issue 15: a head-wise cut that spreads the heads over more of the history, by
discounting the cells many heads would keep anyway.

Each KV head keeps its own best cells by its own attention row. Where most heads rank the same
cells first (the item question 1 asked about, the reply's neighbours), the union of what the
heads keep covers little of the rest of the text, which is where question 2 looks
(../oracle-cpu/). Blending each head toward the shared score (../head-blend-dev/) went the other
way and was not better; spreading part of each head's budget evenly over the history
(../cover-dev/) did not help either. Here each row r's scores (normalised to sum 1) are
multiplied by 1 - lam * c_i / R, where c_i counts the rows whose top `budget` cells (by their own
raw scores) hold cell i and R is the number of rows: a cell every head would keep loses lam of
its weight in every head, so a head's close second choices that few others keep move up. Then the
cut chooses as usual (pooling, sinks, recent cells). Every head-wise cut is changed.

Not in the package. Registered before the bench CLI runs, each marked by a `chunk_probe` value
(only budgeted prefill reads it; the bench's 2K dialogues never need it; 32 is the default):
`d64h-div25`, `d64h-div50`, `d64h-div75`, `d64h-div100` (lam = 0.25, 0.5, 0.75, 1)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (loopserve_edge first, as tests/conftest.py)
from loopserve_edge import cli, eviction  # noqa: E402

import numpy as np  # noqa: E402

LAMS = {51: 0.25, 52: 0.5, 53: 0.75, 54: 1.0}  # chunk_probe -> lam

_cut_heads = eviction.Evictor._cut_heads


def cut_heads(self, dlg, rows, budget):
    lam = LAMS.get(self.cfg.chunk_probe)
    if lam is None or self.cfg.allocation != "uniform" or budget >= rows.shape[1]:
        return _cut_heads(self, dlg, rows, budget)
    att = rows.astype(np.float64)
    att /= np.maximum(att.sum(axis=1, keepdims=True), 1e-30)
    top = np.argpartition(-att, budget - 1, axis=1)[:, :budget]
    c = np.bincount(top.ravel(), minlength=att.shape[1]) / att.shape[0]
    return _cut_heads(self, dlg, (att * (1.0 - lam * c)[None, :]).astype(np.float32), budget)


eviction.Evictor._cut_heads = cut_heads
for mark, name in [(51, "d64h-div25"), (52, "d64h-div50"), (53, "d64h-div75"), (54, "d64h-div100")]:
    env_ablation.variant("loopserve-d64-head", name, f"loopserve-d64-head with the cells many heads keep "
                         f"discounted by {LAMS[mark]:g}", chunk_probe=mark)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
