"""Ablation for issue 15: KeyDiff's query-agnostic signal mixed into a head-wise cut's scores.

KeyDiff (2025) ranks a head's cached tokens by how unlike the head's mean key their key is
(lowest cosine to the mean first): distinctive keys are the ones some later query can single out,
whatever that query is. Earlier query-agnostic signals tried here were attention-based (every
input row's attention, qa-dev/; KVzip's repeat, kvzip-dev/) and did not help; this one reads only
the keys' geometry. Each cut's rows (a distribution over the cells per layer and KV head, as the
observation window's attention gives it) become (1 - w) * attention + w * distinctiveness, the
latter (1 - cos(k_i, mean k)) normalised to sum 1 over the head's cells; then the cut chooses as
usual (pooling, sinks, recent cells).

The keys come from the sequence's state before the cut (llama_state_seq_get_data, f16 K, as
merge-dev/ablation.py reads it). Not in the package. Registered before the bench CLI runs, each
marked by a `chunk_probe` value (only budgeted prefill reads it; the bench's 2K dialogues never
need it): `d64h-kd25` (w = 0.25), `d64h-kd50` (w = 0.5)."""
import sys
from pathlib import Path

import numpy as np

from loopserve_edge import cli, eviction
from loopserve_edge.bench import methods as M

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_head_wise import parse_seq_state  # noqa: E402  (the tests' reader of a sequence's state)

WEIGHTS = {21: 0.25, 22: 0.5}  # chunk_probe -> w


def distinctiveness(state: bytes, n_heads: list[int], n_cells: int) -> np.ndarray:
    """[layers x KV heads, n_cells]: 1 - cos(key, the head's mean key), each row summing to 1."""
    assert len(set(n_heads)) == 1
    _, ks, _ = parse_seq_state(state, n_heads[0])
    out = []
    for K in ks:
        K = K.view(np.float16).astype(np.float32)  # [n_cells, heads, d]
        assert K.shape[0] == n_cells
        kn = K / np.maximum(np.linalg.norm(K, axis=2, keepdims=True), 1e-6)
        mean = kn.mean(axis=0)
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-6)
        d = 1.0 - np.einsum("nhd,hd->hn", kn, mean)
        out.append(d / np.maximum(d.sum(axis=1, keepdims=True), 1e-12))
    return np.concatenate(out).astype(np.float32)


_cut_heads = eviction.Evictor._cut_heads


def cut_heads(self, dlg, rows, budget):
    w = WEIGHTS.get(self.cfg.chunk_probe)
    if w is None or self.cfg.allocation != "uniform":
        return _cut_heads(self, dlg, rows, budget)
    assert int(self.llm.context_params.type_k) == 1  # f16 K
    state = self.llm.sequence_state(self.llm.make_resident(dlg))
    att = rows.astype(np.float64)
    att /= np.maximum(att.sum(axis=1, keepdims=True), 1e-30)
    mixed = (1.0 - w) * att + w * distinctiveness(state, self.llm.layer_heads(), rows.shape[1])
    return _cut_heads(self, dlg, mixed.astype(np.float32), budget)


eviction.Evictor._cut_heads = cut_heads
opts = dict(M.METHODS["loopserve-d64-head"].options)
for mark, name in [(21, "d64h-kd25"), (22, "d64h-kd50")]:
    M.METHODS[name] = M.Method(name, "loopserve", describe=f"loopserve-d64-head with KeyDiff's key "
                               f"distinctiveness mixed in at {WEIGHTS[mark]:g}",
                               options=tuple({**opts, "chunk_probe": mark}.items()))
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
