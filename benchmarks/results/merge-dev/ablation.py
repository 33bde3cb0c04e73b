"""Ablation for issue 15: the values of the tokens a head-wise cut evicts merged into the kept
token of the same head whose key is most like theirs (CaM / D2O-style merging), instead of
dropped.

A cut keeps `budget` tokens per KV head and drops the rest, however much attention they had
together. Merging gives each kept token of a head the score-weighted mean of its own value and
the values of the evicted tokens whose nearest kept key (cosine) it is:
    V_k <- (s_k V_k + sum_e s_e V_e) / (s_k + sum_e s_e)
with s the cut's own scores (each head's row, before pooling); keys stay. So a later query that
finds a kept key also reads something of its evicted neighbours.

Done here through the sequence's state (llama_state_seq_get/set_data): the state before the cut
gives every token's K and V, the state after it the kept rows, whose V are replaced and loaded
back. Not in the package (a cut would do it on the device). Registered before the bench CLI runs,
each marked by a `chunk_probe` value (only budgeted prefill reads it; the bench's 2K dialogues
never need it):
- `d64h-rt`: loopserve-d64-head with the state round trip and no change (the control: a load
  starts the loaded cells' scores over);
- `d64h-merge`: every evicted token merged into its nearest kept key;
- `d64h-merge5`: only where that cosine is at least 0.5 (D2O's threshold idea)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (the bench's wrapper of head-wise cuts)
from test_head_wise import parse_seq_state  # noqa: E402  (the tests' reader of a sequence's state)

MODES = {11: None, 12: -2.0, 13: 0.5}  # chunk_probe -> cosine threshold (None: no merge)


def merge(before: bytes, after: bytes, sel: np.ndarray, scores: np.ndarray, n_heads: list[int], tau: float) -> bytes:
    """`after` with each kept row's V replaced by its merge with the evicted rows of `before`
    (f16 K/V, as every KV head has the same count here)."""
    assert len(set(n_heads)) == 1
    nh = n_heads[0]
    out = bytearray(after)
    pos0, k0, v0 = parse_seq_state(before, nh)
    pos1, _, v1 = parse_seq_state(out, nh)  # views into out: written below
    n0 = len(pos0)
    assert n0 == scores.shape[1] and len(pos1) == sel.shape[1]
    r = 0
    for K, V, Vout in zip(k0, v0, v1):
        K, V, Vout = K.view(np.float16).astype(np.float32), V.view(np.float16).astype(np.float32), Vout.view(np.float16)
        for h in range(nh):
            kept = sel[r]
            gone = np.setdiff1d(np.arange(n0), kept)
            s = np.maximum(scores[r].astype(np.float64), 0.0)
            r += 1
            if len(gone) == 0:
                continue
            kn = K[:, h] / np.maximum(np.linalg.norm(K[:, h], axis=1, keepdims=True), 1e-6)
            sim = kn[gone] @ kn[kept].T
            j = sim.argmax(axis=1)
            ok = sim[np.arange(len(gone)), j] >= tau
            gone, j = gone[ok], j[ok]
            num = s[kept, None] * V[kept, h]
            den = s[kept].copy()
            np.add.at(num, j, s[gone, None] * V[gone, h])
            np.add.at(den, j, s[gone])
            upd = den > 0
            new = V[kept, h].astype(np.float64)
            new[upd] = num[upd] / den[upd, None]
            Vout[:, h] = new.astype(np.float16)
    return bytes(out)


def edit(evictor, dlg, before, after, sel, rows, tau):
    return (after if tau is None else merge(before, after, sel, rows, evictor.llm.layer_heads(), tau)), None


env_ablation.edit_head_cuts(MODES, edit)
env_ablation.bench("loopserve-d64-head", {
    11: ("d64h-rt", "loopserve-d64-head with a state round trip after each cut (the control)"),
    12: ("d64h-merge", "loopserve-d64-head merging each evicted value into its nearest kept key's"),
    13: ("d64h-merge5", "loopserve-d64-head merging evicted values where the keys' cosine is >= 0.5")})
