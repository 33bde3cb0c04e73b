"""Dev-split ablation for issue 15: head-wise selection with each head's scores blended with
the score every head shares (the cell-wise aggregate), so that the heads keep a common core
of tokens beside their own. A method registered before the bench CLI runs (not in the
package): `d32h-blend` is loopserve-d32-head whose head-wise cut ranks each row by
    row / row.sum() + BLEND * mean over rows of (row / row.sum())
The method is marked by aggregate="max", a field the head-wise cut does not read otherwise."""
import os
import sys

import numpy as np

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

BLEND = float(os.environ.get("BLEND", "1.0"))
_cut_heads = eviction.Evictor._cut_heads


def cut_heads(self, dlg, rows, budget):
    if self.cfg.aggregate == "max":
        norm = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-30)
        rows = norm + BLEND * norm.mean(axis=0, keepdims=True)
    return _cut_heads(self, dlg, rows, budget)


eviction.Evictor._cut_heads = cut_heads
base = dict(M.METHODS["loopserve-d32-head"].options)
M.METHODS["d32h-blend"] = M.Method("d32h-blend", "loopserve", describe=f"blend {BLEND}",
                                   options=tuple({**base, "aggregate": "max"}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
