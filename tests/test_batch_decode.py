"""Several dialogues' replies decoded together, one llama_decode per step (the server's way)."""
import numpy as np
import pytest

from loopserve_edge import LoopServeConfig
from loopserve_edge.dialogue import Step

GREEDY = dict(temperature=0, max_tokens=24)
PROMPTS = ["alpha beta gamma", "the quick brown fox jumps", "one two three four five six"]


def drive_together(llm, dialogues, prompts, **sampling):
    """Every dialogue's reply, stepped in lockstep with Context.decode_batch; also the logits
    of each step per dialogue."""
    gens = [d.send_steps(p, **sampling) for d, p in zip(dialogues, prompts)]
    texts, logits_seen = ["" for _ in gens], [[] for _ in gens]
    feed = [None] * len(gens)
    active = list(range(len(gens)))
    while active:
        steps = []
        for i in list(active):
            try:
                item = next(gens[i]) if feed[i] is None else gens[i].send(feed[i])
                feed[i] = None
                while not isinstance(item, Step):
                    texts[i] += item
                    item = next(gens[i])
                steps.append((i, item))
            except StopIteration:
                active.remove(i)
        if steps:
            scored = any(dialogues[i].score_window > 0 for i, _ in steps)
            out = llm.decode_batch([(dialogues[i], s.token, s.pos) for i, s in steps], scored=scored)
            for (i, _), lg in zip(steps, out):
                feed[i] = lg
                logits_seen[i].append(lg)
    return texts, logits_seen


def test_replies_decoded_together_are_those_decoded_alone(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=1024, loopserve=LoopServeConfig(max_resident=4))
    alone = [llm.dialogue(system=f"s{i}").send(p, **GREEDY) for i, p in enumerate(PROMPTS)]
    ds = [llm.dialogue(system=f"s{i}") for i in range(len(PROMPTS))]
    texts, _ = drive_together(llm, ds, PROMPTS, **GREEDY)
    assert texts == alone
    assert all(d.last_stats.decode_tokens > 1 for d in ds)
    assert [d.messages[-1]["content"] for d in ds] == alone
    # and each goes on alone afterwards as its twin does
    twin = llm.dialogue(system="s1")
    twin.send(PROMPTS[1], **GREEDY)
    assert ds[1].send("more", **GREEDY) == twin.send("more", **GREEDY)
    np.testing.assert_allclose(ds[1].first_token_logits, twin.first_token_logits, atol=1e-3)


def test_a_batch_is_one_step_per_dialogue_within_max_resident(tiny_model, make_llm):
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=2))
    a, b, c = (llm.dialogue() for _ in range(3))
    for d in (a, b, c):
        llm.decode(d, [5, 6], [0, 1])
        d.tokens, d.positions = [5, 6], [0, 1]
    with pytest.raises(ValueError, match="one step per dialogue"):
        llm.decode_batch([(a, 7, 2), (a, 8, 3)])
    with pytest.raises(ValueError, match="max_resident"):
        llm.decode_batch([(a, 7, 2), (b, 7, 2), (c, 7, 2)])


def test_scoring_a_batch_scores_each_dialogue_by_its_own_row(tiny_model, make_llm):
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=3))
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(3, 250, n)] for n in (40, 55)]
    alone, together = [], []
    for mode in ("alone", "together"):
        ds = [llm.dialogue() for _ in prompts]
        for d, p in zip(ds, prompts):
            llm.decode(d, p, list(range(len(p))))
            d.tokens, d.positions = list(p), list(range(len(p)))
            llm.reset_scores(d)
        if mode == "alone":
            for d, p in zip(ds, prompts):
                llm.set_score_window(1)
                llm.decode(d, [9], [len(p)])
                llm.set_score_window(0)
                alone.append(llm.attention_scores_by_head(d)[1])
        else:
            llm.decode_batch([(d, 9, len(p)) for d, p in zip(ds, prompts)], scored=True)
            together = [llm.attention_scores_by_head(d)[1] for d in ds]
            assert llm.score_window == 0  # restored
        for d in ds:
            d.close()
    for a, t in zip(alone, together):
        # each row spreads its mass over its own dialogue's cells only
        np.testing.assert_allclose(t, a, rtol=1e-3, atol=1e-5)


def test_deferred_cuts_of_dialogues_decoded_together_all_happen(tiny_model, make_llm):
    cfg = LoopServeConfig(policy="loopserve", budget=96, interval=16, max_resident=3)
    llm = make_llm(tiny_model, n_ctx=1024, loopserve=cfg)
    ds = [llm.dialogue() for _ in range(3)]
    long = [p * 12 for p in PROMPTS]
    drive_together(llm, ds, long, temperature=0, max_tokens=12)
    for d in ds:
        assert d.evicted > 0 and d.n_cells <= cfg.budget + cfg.interval
    assert not llm.evictor.deferred
