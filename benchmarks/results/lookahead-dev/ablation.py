"""Ablation for issue 15: the cut that ends a turn also scored by a next question the model
writes itself (a lookahead; not in the package).

Most of what head-wise LoopServe loses is in the turns after the first (../oracle-cpu/): the cut
that ends turn 1 is ranked by question 1 and its reply, and turn 2 may need other tokens. Ranked
by the attention of question 2 and reply 2 themselves (an oracle) it keeps ~3 points more of
full's greedy tokens at 1/8. Lookahead Q-Cache (LAQ) scores a prefill-time cut by a few tokens
the model generates before the cut, as stand-ins for the queries to come. Here the stand-in is
the next user turn: at the cut ending each turn, the chat template's next user header is decoded
after the reply, the model writes `K` tokens of the question it expects (greedy), each row
scoring the cache, and the dialogue's state is then put back as it was (those tokens are gone);
the cut ranks each head's cells by

- `d64h-lookq`: those rows' scores alone (`chunk_probe` 11);
- `d64h-lookq-mix`: those plus the method's own (question and reply), each normalised to sum 1
  per head over the cells between the sinks and the recent window (`chunk_probe` 12).

Registered before the bench CLI runs; the chat format of SmolLM2-135M-Instruct (ChatML) only.
"""
import os
import sys
from pathlib import Path

# the package (llama.cpp's library) before numpy: tests/conftest.py
from loopserve_edge import eviction  # isort: skip

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import env_ablation  # noqa: E402

K = int(os.environ.get("LOOKQ_TOKENS", "16"))
HEADER = "<|im_end|>\n<|im_start|>user\n"
E = eviction.Evictor
_end_turn = E.end_turn


def normalised(rows: np.ndarray, sink: int, recent: int) -> np.ndarray:
    r = rows.astype(np.float64)
    mid = r[:, sink:max(sink, r.shape[1] - recent)]
    return r / np.maximum(mid.sum(axis=1, keepdims=True), 1e-30)


def lookahead_rows(self, dlg) -> np.ndarray:
    """Each head's scores of dlg's cells by the rows of a next user turn the model writes."""
    llm = self.llm
    seq = llm.make_resident(dlg)
    state = llm.sequence_state(seq)
    window = llm.score_window
    try:
        llm.reset_scores(dlg)
        header = llm.tokenize(HEADER)
        p = dlg.positions[-1] + 1
        llm.set_score_window(len(header))
        logits = llm.decode(dlg, header, list(range(p, p + len(header))))
        p += len(header)
        llm.set_score_window(1)
        written = []
        for _ in range(K):
            tok = int(np.argmax(logits))
            if llm.is_eog(tok):
                break
            logits = llm.decode(dlg, [tok], [p])
            written.append(tok)
            p += 1
        if os.environ.get("LOOKQ_SHOW"):   # what the model expects to be asked
            print(repr(llm.detokenize(llm.tokenize(HEADER) + written, special=True)), file=sys.stderr)
        pos, rows = llm.attention_scores_by_head(dlg)
        n = len(dlg.positions)
        assert np.array_equal(pos[:n], dlg.positions) and len(pos) >= n + len(header)
        return np.array(rows[:, :n], dtype=np.float32)
    finally:
        llm.set_score_window(window)
        llm.restore(dlg, state)


def end_turn(self, dlg) -> None:
    mark = self.cfg.chunk_probe if self.cfg.policy == "loopserve" else None
    if mark not in (11, 12) or id(dlg) not in self.deferred or len(dlg.positions) <= self.cfg.budget:
        return _end_turn(self, dlg)
    _, own = self.llm.attention_scores_by_head(dlg)
    look = lookahead_rows(self, dlg)
    if mark == 12:
        look = normalised(look, self.cfg.sink, self.cfg.recent) + normalised(own, self.cfg.sink, self.cfg.recent)
    self.deferred.discard(id(dlg))
    self._cut_heads(dlg, look.astype(np.float32), self.cfg.budget)
    self._window(dlg, 0)


E.end_turn = end_turn
env_ablation.bench("loopserve-d64-head", {
    11: ("d64h-lookq", "loopserve-d64-head whose turn-ending cut is ranked by a next question the model writes "
                       "(a lookahead)"),
    12: ("d64h-lookq-mix", "d64h-lookq ranking by the lookahead's scores plus its own, each normalised")})
