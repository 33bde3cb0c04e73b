"""Ablation for issue 15: how unexpected each token was (its surprisal) mixed into the cut that
ends turn 1.

The turns after the first lose what the cut ending turn 1 could not know they would ask
(../oracle-cpu/). The query-agnostic signals tried so far read attention (every input row,
../qa-dev/; KVzip's repeat, ../kvzip-dev/) or the keys' geometry (../keydiff-dev/). This one reads
the text: a token the model could not predict carries information the model cannot rebuild
from its neighbours (a name, a number, a needle out of place), while formatting and filler are
predictable. Each head's attention row (normalised to sum 1) becomes (1 - w) * attention + w *
surprisal, the latter -log p(token | the tokens before it) under the same model, normalised to
sum 1 over the cells (the same for every head); then the cut chooses as usual (pooling, sinks,
recent cells).

Only the dialogue's first cut is changed, while its cells still hold its tokens in order (cell i
holds token i): in the benchmark's dialogues that is the cut ending turn 1, the one that decides
what turn 2 sees. The log-probabilities come from a plain llama-cpp-python `Llama` on the same
model with every position's logits (outside the method's own context; an ablation, not a method).
Not in the package. Registered before the bench CLI runs, each marked by a `chunk_probe` value
(only budgeted prefill reads it; the bench's 2K dialogues never need it): `d64h-sp25` (w = 0.25),
`d64h-sp50` (w = 0.5)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402  (loopserve_edge first, as tests/conftest.py)
from loopserve_edge import cli, eviction  # noqa: E402

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

WEIGHTS = {31: 0.25, 33: 0.5}  # chunk_probe -> w (not 32: the default)
_scorer: dict = {}


def surprisal(model_path, tokens: list[int]) -> np.ndarray:
    """-log p(token_i | tokens before it) for each token; the first token gets the mean of the rest."""
    llm = _scorer.get(str(model_path))
    if llm is None:
        llm = _scorer[str(model_path)] = llama_cpp.Llama(str(model_path), n_ctx=4096, n_batch=512,
                                                         logits_all=True, verbose=False)
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)  # row i predicts token i + 1
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    s = lse - logits[np.arange(len(tokens) - 1), tokens[1:]]
    return np.concatenate([[s.mean()], s])


_cut_heads = eviction.Evictor._cut_heads


def cut_heads(self, dlg, rows, budget):
    w = WEIGHTS.get(self.cfg.chunk_probe)
    if w is None or self.cfg.allocation != "uniform" or dlg.layout != "cell" or dlg.evicted \
            or len(dlg.tokens) != rows.shape[1]:
        return _cut_heads(self, dlg, rows, budget)
    s = surprisal(self.llm.model_path, list(dlg.tokens))
    s /= max(s.sum(), 1e-30)
    att = rows.astype(np.float64)
    att /= np.maximum(att.sum(axis=1, keepdims=True), 1e-30)
    mixed = (1.0 - w) * att + w * s[None, :]
    return _cut_heads(self, dlg, mixed.astype(np.float32), budget)


eviction.Evictor._cut_heads = cut_heads
for mark, name in [(31, "d64h-sp25"), (33, "d64h-sp50")]:
    env_ablation.variant("loopserve-d64-head", name, f"loopserve-d64-head with each token's surprisal mixed "
                         f"into its first cut at {WEIGHTS[mark]:g}", chunk_probe=mark)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
