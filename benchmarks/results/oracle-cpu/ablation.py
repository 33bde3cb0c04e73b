"""Ablation for issue 15: how much of full's greedy tokens an attention-scored cut could keep
in the turns after the first if it knew the next turn (an oracle; not a method).

Head-wise LoopServe keeps ~100% of full's greedy tokens in the first turn (the reply is decoded
over the uncut input) and ~85% in the later ones at 2K and budget 1/8 (test split,
../d64-test-gpu/). The cut that ends turn 1 is scored by question 1 and its reply; turn 2 may need
other tokens. Bringing the history back at question 2 and cutting it by that question and the
reply's first 4 tokens kept no more (../recall-dev/), nor did query-agnostic scores (../qa-dev/,
../kvzip-dev/). This measures the ceiling of scoring itself: the cut that ends turn 1 ranked by
the attention that question 2 and full's own reply 2 pay the turn-1 cells, over the uncut history.

Registered before the bench CLI runs (not in the package); the bench must list them in this
order, after `full`, at one budget at a time or more (the lookahead does not depend on it):
- `d64h-look`: loopserve-d64-head that skips the cut ending turn 1 (so turn 2 runs over the whole
  history, as full does) and, at the cut ending turn 2, records each head's scores of the turn-1
  cells (question 2's last `prefill_window` tokens and reply 2's tokens, which are full's: the
  cache is full's through that reply). Marked by `chunk_probe` 7. Its fidelity is full's by
  construction (a check).
- `d64h-oracle`: loopserve-d64-head whose cut ending turn 1 ranks each head's cells by those
  recorded scores instead of its own (`chunk_probe` 8); every other cut is the method's own. The
  record is found by the turn-1 tokens, which are full's in both (turn 1 is decoded uncut).
- `d64h-oracle-mix`: the same, ranking by the sum of the two, each normalised to sum 1 per head
  over the cells between the sinks and the recent window (`chunk_probe` 9).
"""
import json
import os
import sys
from pathlib import Path

# the package (llama.cpp's library) before numpy: tests/conftest.py
from loopserve_edge import cli, eviction  # isort: skip

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402

E = eviction.Evictor
_compress = E.compress
LOOK: dict[int, np.ndarray] = {}  # hash of the turn-1 tokens -> [heads, turn-1 cells] scores


def marked(cfg) -> int | None:
    return cfg.chunk_probe if cfg.policy == "loopserve" and cfg.chunk_probe in (7, 8, 9) else None


def normalised(rows: np.ndarray, sink: int, recent: int) -> np.ndarray:
    r = rows.astype(np.float64)
    mid = r[:, sink:max(sink, r.shape[1] - recent)]
    return r / np.maximum(mid.sum(axis=1, keepdims=True), 1e-30)


def record_cut(self, dlg, look: np.ndarray, out: str) -> None:
    """ORACLE_CUTS=FILE (session 55): append what each head keeps at the oracle's cut ending
    turn 1 and what the method's own scores would have kept there, with the tokens, for
    regions.py."""
    _, own = self.llm.attention_scores_by_head(dlg)
    rec = {"n": len(dlg.tokens), "budget": self.cfg.budget, "tokens": [int(t) for t in dlg.tokens],
           "pieces": [self.llm.detokenize([t]) for t in dlg.tokens],
           "method": eviction.choose_keep_rows(own, self.cfg, self.cfg.budget).tolist(),
           "oracle": eviction.choose_keep_rows(look.astype(np.float32), self.cfg, self.cfg.budget).tolist()}
    rec["starts"] = [i for i, p in enumerate(rec["pieces"]) if p == "<|im_start|>"]
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def compress(self, dlg) -> None:
    mark = marked(self.cfg)
    n_cut = getattr(dlg, "_oracle_cuts", 0)
    if mark is None or len(dlg.positions) <= self.cfg.budget or n_cut > 1:
        return _compress(self, dlg)
    dlg._oracle_cuts = n_cut + 1
    if n_cut == 0:  # the cut ending turn 1
        key = hash(tuple(dlg.tokens))
        if mark == 7:  # skipped; the turn-2 cut records
            dlg._oracle_key, dlg._oracle_pos = key, np.array(dlg.positions)
            return
        if key not in LOOK:
            raise RuntimeError("d64h-oracle: no lookahead recorded for this dialogue (run d64h-look first)")
        look = LOOK[key]
        if mark == 9:
            _, own = self.llm.attention_scores_by_head(dlg)
            look = normalised(look, self.cfg.sink, self.cfg.recent) + normalised(own, self.cfg.sink, self.cfg.recent)
        assert look.shape[1] == len(dlg.positions)
        if os.environ.get("ORACLE_CUTS"):
            record_cut(self, dlg, look, os.environ["ORACLE_CUTS"])
        self._cut_heads(dlg, look.astype(np.float32), self.cfg.budget)
        return
    if mark == 7:  # the cut ending turn 2: record the turn-1 cells' scores
        pos, rows = self.llm.attention_scores_by_head(dlg)
        n1 = len(dlg._oracle_pos)
        assert np.array_equal(pos[:n1], dlg._oracle_pos)  # turn 1's cells, all of them
        LOOK[dlg._oracle_key] = np.array(rows[:, :n1], dtype=np.float32)
    return _compress(self, dlg)


E.compress = compress
for name, mark, describe in (("d64h-look", 7, "loopserve-d64-head without the cut ending turn 1; records "
                              "question 2's and reply 2's scores of the turn-1 cells"),
                             ("d64h-oracle", 8, "loopserve-d64-head whose cut ending turn 1 is ranked by "
                              "d64h-look's record (an oracle)"),
                             ("d64h-oracle-mix", 9, "d64h-oracle ranking by the record plus its own scores, "
                              "each normalised")):
    env_ablation.variant("loopserve-d64-head", name, describe, chunk_probe=mark)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
