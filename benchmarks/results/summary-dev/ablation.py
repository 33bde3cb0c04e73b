"""Ablation for issue 15: each KV head keeps one summary row of the tokens it evicted (their
mean key and mean value, with a logit bias of log N for the N tokens it stands for), instead of
dropping them.

A head-wise cut keeps `budget` tokens per KV head. A later query's softmax then loses the mass
the evicted tokens had: its attention over the kept ones comes out sharper than full
attention's, and a query whose attention was diffuse over the document reads the few kept
tokens instead of the document's average. One row with the evicted tokens' mean key k and mean
value v, whose logit is raised by log N, puts N exp(q.k) of mass on v: by convexity
sum_j exp(q.k_j) >= N exp(q.k) for every query q, so the row never gives the evicted tokens more
mass than they had, and for a diffuse query it gives about what they had.

Done here through the sequence's state, as merge-dev/ablation.py: the state before a cut gives
every token's K and V, the state after it the kept rows. Each head's summary takes one of its
kept rows: the row the summary was in, if the cut kept it, else the kept token with the lowest
score (not a sink, not a recent one), which joins the summary. The running sums of every token
a head ever evicted are kept on the dialogue (float64), so a summary is never averaged into
itself. The bias goes through the runtime's per-head hidden rows (llama_loopserve_seq_hide),
whose codes above 1 an ablation build reads as a bias of (code - 64) / 16
(`summary-bias.diff`); a head with hidden rows attends by its own flash attention.

Not in the package. Registered before the bench CLI runs, each marked by a `chunk_probe` value
(only budgeted prefill reads it; the bench's 2K dialogues never need it):
- `d64h-sum`: bias log N;
- `d64h-sum1`: bias log N + 1 (more mass than the convexity bound);
- `d64h-sum0`: the summary row with no bias (mass exp(q.k), as one token)."""
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (the bench's wrapper of head-wise cuts)
from test_head_wise import parse_seq_state  # noqa: E402  (the tests' reader of a sequence's state)

MODES = {21: 0.0, 22: 1.0, 23: None}  # chunk_probe -> bias added to log N (None: no bias at all)


def code(bias: float) -> int:
    """The ablation build's uint8 code for a bias (code - 64) / 16, within 2..255."""
    return int(min(255, max(2, round(bias * 16 + 64))))


class Summary:
    """A dialogue's summary of each scored (layer, KV head): what it evicted, summed."""

    def __init__(self, n_rows: int, dk: int, dv: int):
        self.n = np.zeros(n_rows)
        self.sk = np.zeros((n_rows, dk))
        self.sv = np.zeros((n_rows, dv))
        self.at = np.full(n_rows, -1)  # the summary's cell (index into the dialogue's cells)


def summarise(self, dlg, before: bytes, after: bytes, sel: np.ndarray, rows: np.ndarray, extra):
    nh = self.llm.layer_heads()
    assert len(set(nh)) == 1
    nh = nh[0]
    out = bytearray(after)
    pos0, k0, v0 = parse_seq_state(before, nh)
    pos1, k1, v1 = parse_seq_state(out, nh)  # views into out: written below
    n0, n1 = len(pos0), len(pos1)
    assert n0 == rows.shape[1] and n1 == sel.shape[1]
    d_k, d_v = k0[0].shape[2] // 2, v0[0].shape[2] // 2
    s = getattr(dlg, "_summary", None)
    if s is None:
        s = dlg._summary = Summary(sel.shape[0], d_k, d_v)
    lo, hi = min(self.cfg.sink, n1), max(0, n1 - self.cfg.recent)
    hidden = np.zeros((sel.shape[0], n1), np.uint8)
    r = 0
    for K0, V0, K1, V1 in zip(k0, v0, k1, v1):
        K0, V0 = K0.view(np.float16), V0.view(np.float16)
        K1, V1 = K1.view(np.float16), V1.view(np.float16)
        for h in range(nh):
            kept = sel[r]
            gone = np.setdiff1d(np.arange(n0), kept)
            gone = gone[gone != s.at[r]]  # the old summary is in the sums already
            if s.at[r] >= 0 and s.at[r] in kept:
                j = int(np.searchsorted(kept, s.at[r]))
            else:
                cand = np.arange(lo, hi)
                j = int(cand[np.argmin(rows[r, kept[lo:hi]])]) if len(cand) else -1
                if j >= 0:
                    gone = np.append(gone, kept[j])
            if len(gone):
                s.n[r] += len(gone)
                s.sk[r] += K0[gone, h].astype(np.float64).sum(axis=0)
                s.sv[r] += V0[gone, h].astype(np.float64).sum(axis=0)
            if j >= 0 and s.n[r] > 0:
                K1[j, h] = (s.sk[r] / s.n[r]).astype(np.float16)
                V1[j, h] = (s.sv[r] / s.n[r]).astype(np.float16)
                s.at[r] = j
                if extra is not None:
                    hidden[r, j] = code(math.log(s.n[r]) + extra)
            else:
                s.at[r] = -1
            r += 1
    return bytes(out), (hidden if hidden.any() else None)


env_ablation.edit_head_cuts(MODES, summarise)
env_ablation.bench("loopserve-d64-head", {
    21: ("d64h-sum", "loopserve-d64-head with a summary row per head, bias log N"),
    22: ("d64h-sum1", "loopserve-d64-head with a summary row per head, bias log N + 1"),
    23: ("d64h-sum0", "loopserve-d64-head with a summary row per head, no bias")})
