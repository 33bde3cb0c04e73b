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
import struct
import sys

import numpy as np

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

MODES = {11: None, 12: -2.0, 13: 0.5}  # chunk_probe -> cosine threshold (None: no merge)
F16 = 1


def layout(blob: bytes, n_heads: list[int]):
    """Cell positions and, per layer, the offsets of K and V rows in a one-sequence state
    (V not transposed, no cell extension, f16): (positions, [(k_off, v_off, row_bytes)])."""
    off = 8
    (n_stream,) = struct.unpack_from("<I", blob, off)
    off += 4
    n_cells = 0
    for _ in range(n_stream):
        (n_cells,) = struct.unpack_from("<I", blob, off)
        off += 4
        if n_cells:
            break
    pos = []
    for _ in range(n_cells):
        p, n_seq = struct.unpack_from("<iI", blob, off)
        off += 8 + 4 * n_seq
        pos.append(p)
    v_trans, n_layer = struct.unpack_from("<II", blob, off)
    off += 8
    assert v_trans == 0 and n_layer == len(n_heads)
    offs = []
    for _ in range(2 * n_layer):
        typ, row = struct.unpack_from("<iQ", blob, off)
        off += 12
        assert typ == F16
        offs.append((off, row))
        off += n_cells * row
    return pos, [(offs[i][0], offs[n_layer + i][0], offs[i][1]) for i in range(n_layer)]


def rows_of(buf, off, row, n_cells, n_head):
    return np.frombuffer(buf, np.float16, n_cells * row // 2, off).reshape(n_cells, n_head, -1)


def merge(before: bytes, after: bytes, sel: np.ndarray, scores: np.ndarray, n_heads: list[int], tau: float) -> bytes:
    pos0, lay0 = layout(before, n_heads)
    pos1, lay1 = layout(after, n_heads)
    n0, n1 = len(pos0), len(pos1)
    assert n0 == scores.shape[1] and n1 == sel.shape[1]
    out = bytearray(after)
    r = 0
    for (k0, v0, row), (_, v1, _), nh in zip(lay0, lay1, n_heads):
        K = rows_of(before, k0, row, n0, nh).astype(np.float32)
        V = rows_of(before, v0, row, n0, nh).astype(np.float32)
        Vout = rows_of(out, v1, row, n1, nh)  # writable view into out
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


_cut_heads = eviction.Evictor._cut_heads
_choose = eviction.choose_keep_rows


def cut_heads(self, dlg, rows, budget):
    if self.cfg.chunk_probe not in MODES or self.cfg.allocation != "uniform":
        return _cut_heads(self, dlg, rows, budget)
    tau = MODES[self.cfg.chunk_probe]
    before = self.llm.sequence_state(self.llm.make_resident(dlg))
    seen = {}

    def choose(r, c, b):
        seen["sel"] = _choose(r, c, b)
        return seen["sel"]

    eviction.choose_keep_rows = choose
    try:
        _cut_heads(self, dlg, rows, budget)
    finally:
        eviction.choose_keep_rows = _choose
    after = self.llm.sequence_state(self.llm.make_resident(dlg))
    if tau is not None:
        after = merge(before, after, seen["sel"], rows, self.llm.layer_heads(), tau)
    self.llm.restore(dlg, after)


eviction.Evictor._cut_heads = cut_heads
opts = dict(M.METHODS["loopserve-d64-head"].options)
for mark, name, what in [(11, "d64h-rt", "with a state round trip after each cut (the control)"),
                         (12, "d64h-merge", "merging each evicted value into its nearest kept key's"),
                         (13, "d64h-merge5", "merging evicted values where the keys' cosine is >= 0.5")]:
    M.METHODS[name] = M.Method(name, "loopserve", describe=f"loopserve-d64-head {what}",
                               options=tuple({**opts, "chunk_probe": mark}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
