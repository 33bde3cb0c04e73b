"""Ablation for issue 15: the cut after each prefill also scored by a reconstruction of the
dialogue (KVzip's query-agnostic score), on the dev split.

Head-wise LoopServe loses most in the turns after the first: the cut that ends turn 1 keeps
what question 1 and its reply looked at, and question 2 may ask about something else.
KVzip (arXiv 2505.23416) scores a cache by how much the model attends to each cell while it is
made to repeat the whole context: a cell the copy needs (a name, a number, a rare word) gets
the attention of the row that copies it, while text the model can predict from its neighbours
gets little. That is query-agnostic, unlike the question-scored window (session 17's
query-agnostic try, every input row's self-attention, did not help: ../qa-dev/).

Registered before the bench CLI runs (not in the package):
- `d64h-zipNN`: loopserve-d64-head whose post-prefill cut ranks each head's cells by
  (1 - NN/100) x its usual scores (the input's last tokens and the reply's) + NN/100 x the
  reconstruction's. When a prefill ends, the dialogue so far (its rendered text, every turn,
  also the parts already cut from the cache) is decoded again after a user message asking to
  repeat it, in chunks of CHUNK tokens (later chunks: "...starting with" and the previous
  chunk's last 8 tokens, as KVzip does); each chunk's repeated tokens score the cache, then the
  chunk's cells are removed. The runtime sums attention over rows (KVzip takes the maximum).
  Each source's rows are normalised to sum 1 over the cells between the sinks and the recent
  window before they are mixed. The share NN travels in `chunk_probe` (read by budgeted
  prefill only, which the bench's 2K dialogues never need); these methods get n_ctx + 1024
  cells for the chunks.
- `d64h-zipmaxNN`: the same, closer to KVzip's maximum over the repeat's rows: each chunk's
  repeated tokens go in GROUP at a time, each group's sums read and reset, and each cell keeps
  its maximum over the groups (marked by `chunk_probe` NN + 1).
"""
import sys
from pathlib import Path

# the package (llama.cpp's library) before numpy: the other order crashes the first model load
# on the GPU box (tests/conftest.py)
from loopserve_edge import cli, eviction  # isort: skip
from loopserve_edge.bench import harness  # isort: skip

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402

CHUNK = 448
GROUP = 8  # d64h-zipmaxNN: rows scored GROUP at a time, each cell's maximum over the groups kept
FIRST = "Repeat the previous context exactly."
LATER = "Repeat the part of the previous context exactly, starting with"
SHARES = (100, 50, 25)
MAX_SHARES = (101, 51)  # zipmax100 / zipmax50 (the share is chunk_probe - 1)

E = eviction.Evictor
_after, _cut = E.after_prefill, E._cut_heads
_kwargs = harness.llama_kwargs


def share(cfg):
    if cfg.policy != "loopserve":
        return None
    if cfg.chunk_probe in SHARES:
        return cfg.chunk_probe / 100
    return (cfg.chunk_probe - 1) / 100 if cfg.chunk_probe in MAX_SHARES else None


def by_max(cfg):
    return cfg.chunk_probe in MAX_SHARES


def llama_kwargs(spec, run, n_ctx):
    return _kwargs(spec, run, n_ctx + 1024 if share(run.config()) is not None else n_ctx)


def instruction(llm, dlg, text):
    """The tokens that close the pending assistant cue and ask, as a new user message, for the
    repeat; the assistant's cue after it (the model's own template)."""
    msgs = dlg.messages
    before = llm.template.render(msgs)
    after = llm.template.render(msgs + [{"role": "assistant", "content": ""}, {"role": "user", "content": text}])
    if not after.startswith(before):
        return llm.tokenize("\n\n" + text + "\n")
    return llm.tokenize(after[len(before):])


def reconstruct(self, dlg):
    """[n_heads, n_cells] scores of dlg's cells by the repeat of its text, chunk by chunk."""
    llm = self.llm
    text = llm.tokenize(dlg.kv_text)
    chunks = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)]
    z = None
    for i, chunk in enumerate(chunks):
        if i == 0:
            ask = instruction(llm, dlg, FIRST)
        else:
            ask = instruction(llm, dlg, LATER + " " + llm.detokenize(chunks[i - 1][-8:], special=False))
        start = dlg.positions[-1] + 1
        if not by_max(self.cfg):
            seq = ask + chunk
            self._window(dlg, len(chunk))
            llm.decode(dlg, seq, list(range(start, start + len(seq))))
        else:
            # KVzip takes each cell's maximum over the repeat's rows; the runtime sums, so the
            # rows go in GROUP at a time, each group's sums read and reset
            self._window(dlg, 0)
            llm.decode(dlg, ask, list(range(start, start + len(ask))))
            at = start + len(ask)
            for g in range(0, len(chunk), GROUP):
                part = chunk[g:g + GROUP]
                self._window(dlg, len(part))
                llm.decode(dlg, part, list(range(at, at + len(part))))
                at += len(part)
                _, rows = llm.attention_scores_by_head(dlg)
                n = len(dlg.positions)
                z = rows[:, :n] if z is None else np.maximum(z, rows[:, :n])
                llm.reset_scores(dlg)
        llm.remove_positions(dlg._seq, start)
    self._window(dlg, 0)
    if by_max(self.cfg):
        return z
    pos, rows = llm.attention_scores_by_head(dlg)
    assert np.array_equal(pos, dlg.positions)
    return rows


def after_prefill(self, dlg):
    dlg._zip = None
    if share(self.cfg) is not None and self.active and len(dlg.positions) > self.cfg.budget:
        pos, asked = self.llm.attention_scores_by_head(dlg)  # the input's last tokens
        self.llm.reset_scores(dlg)
        z = reconstruct(self, dlg)
        self.llm.reset_scores(dlg)
        dlg._zip = (asked, z)
    _after(self, dlg)


def normalised(rows, lo, hi):
    r = rows.astype(np.float64)
    r[:, :lo] = 0
    r[:, hi:] = 0
    return r / np.maximum(r.sum(axis=1, keepdims=True), 1e-30)


def cut_heads(self, dlg, rows, budget):
    got, dlg._zip = getattr(dlg, "_zip", None), None
    lam = share(self.cfg)
    if got is not None and lam is not None and got[0].shape[1] <= rows.shape[1]:
        # the reply's tokens came after the prefill (cells appended at the end): scored by
        # neither the input's window nor the repeat
        n = rows.shape[1]
        asked, z = (np.pad(x, ((0, 0), (0, n - x.shape[1]))) for x in got)
        lo, hi = min(self.cfg.sink, n), max(min(self.cfg.sink, n), n - self.cfg.recent)
        mixed = (1 - lam) * normalised(rows + asked, lo, hi) + lam * normalised(z, lo, hi)
        rows = mixed.astype(np.float32)
    return _cut(self, dlg, rows, budget)


E.after_prefill, E._cut_heads = after_prefill, cut_heads
harness.llama_kwargs = llama_kwargs
for nn in SHARES:
    env_ablation.variant("loopserve-d64-head", f"d64h-zip{nn}", f"loopserve-d64-head, cut also scored by a "
                         f"repeat of the dialogue ({nn}%)", chunk_probe=nn)
for cp in MAX_SHARES:
    env_ablation.variant("loopserve-d64-head", f"d64h-zipmax{cp - 1}", f"loopserve-d64-head, cut also scored by a "
                         f"repeat of the dialogue, each cell's maximum over groups of {GROUP} rows ({cp - 1}%)",
                         chunk_probe=cp)
sys.argv = ["loopserve-edge", "bench", *sys.argv[1:]]
cli.main()
