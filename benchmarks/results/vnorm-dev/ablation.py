"""Dev-split ablation for issue 15: scores weighted by the norm of each token's V row.

Attention mass alone favours tokens that many queries look at, including ones whose values
add little to the output (a sink's V row is small: the head attends there to attend nowhere).
VATP ("value also matters") and CriticalKV weight each token's score by its value's norm.
Methods registered before the bench CLI runs (not in the package):
- `d32h-vn`: loopserve-d32-head whose head-wise cut ranks each head's row by
  score * |v|^VN_POWER, |v| the L2 norm of that head's V row at the cell
  (llama_loopserve_value_norms);
- `d32-vn`: the cell-wise loopserve-d32 with the same weighting per head before the rows are
  aggregated into one score per cell (normalised per row, then the mean, as
  the cell-wise cut does).
They are marked by aggregate="max", a field the head-wise cut does not read otherwise; for
the cell-wise one the override aggregates the weighted rows itself."""
import os
import sys

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

POWER = float(os.environ.get("VN_POWER", "1.0"))
_cut_heads = eviction.Evictor._cut_heads
_aggregate = eviction.aggregate


def weighted(self, dlg, rows):
    return rows * self.llm.value_norms(dlg) ** POWER


def cut_heads(self, dlg, rows, budget):
    if self.cfg.aggregate == "max":
        rows = weighted(self, dlg, rows)
    return _cut_heads(self, dlg, rows, budget)


def compress(self, dlg):
    if self.cfg.aggregate == "max" and self.cfg.granularity == "cell" and len(dlg.positions) > self.cfg.budget:
        pos, rows = self.llm.attention_scores_by_head(dlg)
        return self._compress(dlg, _aggregate(weighted(self, dlg, rows), "mean"), self.cfg.budget)
    return _evictor_compress(self, dlg)


_evictor_compress = eviction.Evictor.compress
eviction.Evictor._cut_heads = cut_heads
eviction.Evictor.compress = compress
for name, base in {"d32h-vn": "loopserve-d32-head", "d32-vn": "loopserve-d32"}.items():
    opts = dict(M.METHODS[base].options)
    M.METHODS[name] = M.Method(name, "loopserve", describe=f"{base}, scores x |v|^{POWER}",
                               options=tuple({**opts, "aggregate": "max"}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
