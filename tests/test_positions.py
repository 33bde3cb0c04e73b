"""Positions stay inside the trained range: a budgeted dialogue of three times the default
model's trained context still copies a sentence from its own turn as well as in its first
turns, because cuts give the kept cells consecutive positions again (keys re-rotated) once
the positions pass half the trained context ("auto", the default), or at every cut
("always"). With "never" the positions run past the trained context and copying breaks down
(at ~13K positions for SmolLM2-135M, trained on 8K)."""
import numpy as np
import pytest

from loopserve_edge import LoopServeConfig
from loopserve_edge.bench.positions import copy_dialogue

BUDGET = 512


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_a_dialogue_three_times_the_trained_context_keeps_copying(default_model, make_llm, mode):
    c = LoopServeConfig(policy="loopserve", budget=BUDGET, compact_positions=mode)
    llm = make_llm(default_model, n_ctx=2048, loopserve=c)
    turns = copy_dialogue(llm, 3 * llm.n_ctx_train)
    scores = np.array([t["copy_logp"] for t in turns])
    early, late = scores[1:6].mean(), scores[-10:].mean()
    top, longest = max(t["top_position"] for t in turns), max(t["added"] for t in turns)
    if mode == "auto":
        assert late >= early - 0.1, (early, late, scores.round(2).tolist())
        assert top <= llm.n_ctx_train // 2 + c.interval + longest
    elif mode == "always":
        # every cut compacts: positions stay within budget + interval + a turn; copying holds up,
        # a little below "auto" (the history then sits nearer the new tokens than it did)
        assert top <= BUDGET + c.interval + longest
        assert late >= early - 0.3 and late > -0.5, (early, late, scores.round(2).tolist())
    else:
        # the bug this guards against: positions run to three times the trained context
        assert turns[-1]["top_position"] > 2 * llm.n_ctx_train
        assert late < early - 1.0, (early, late, scores.round(2).tolist())
