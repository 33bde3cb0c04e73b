"""Choosing the next token: penalties, logit bias and the reply's log-probabilities."""
import numpy as np
import pytest

from loopserve_edge.sampling import Sampler, SamplingParams, logprobs, logprobs_rows


def _greedy(**kw):
    return Sampler(SamplingParams(temperature=0, **kw))


def test_frequency_penalty_counts_each_choice_and_presence_penalty_only_the_first():
    logits = np.array([3.0, 2.0, 0.5, 0.0], dtype=np.float32)
    s = _greedy(frequency_penalty=0.6)
    # 3.0 -> 2.4 after one choice, 1.8 after two: token 1 (2.0) wins the third step
    assert [s(logits) for _ in range(3)] == [0, 0, 1]
    s = _greedy(presence_penalty=0.6)
    # 3.0 -> 2.4 once chosen and stays there; 2.0 -> 1.4 once chosen
    assert [s(logits) for _ in range(3)] == [0, 0, 0]
    s = _greedy(presence_penalty=1.5)
    # 3.0 -> 1.5 loses to 2.0; then 2.0 -> 0.5 loses to 1.5, which it stays
    assert [s(logits) for _ in range(4)] == [0, 1, 0, 0]
    np.testing.assert_array_equal(s.adjusted(logits), [1.5, 0.5, 0.5, 0.0])
    # negative penalties encourage repeats
    s = _greedy(frequency_penalty=-2.0)
    assert [s(np.array([1.0, 2.0])) for _ in range(3)] == [1, 1, 1]


def test_without_penalties_or_bias_the_logits_are_used_as_given():
    logits = np.array([0.1, 0.7, 0.2], dtype=np.float32)
    s = _greedy()
    assert s(logits) == 1 and s.adjusted(logits) is logits


def test_logit_bias_forces_or_bans_a_token_when_sampling():
    logits = np.linspace(0, 3, 50).astype(np.float32)
    banned = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3, logit_bias=((49, -100.0),)))
    assert 49 not in {banned(logits) for _ in range(300)}
    forced = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3, logit_bias=((7, 100.0),)))
    assert {forced(logits) for _ in range(50)} == {7}


def test_min_p_leaves_out_tokens_far_below_the_most_likely_before_the_temperature():
    # probabilities (temperature 1) proportional to e^0, e^-1, e^-2, e^-3: relative 1, 0.37, 0.14, 0.05
    logits = np.array([0.0, -1.0, -2.0, -3.0, -9.0])
    for temp in (0.5, 1.0, 3.0):   # the cut follows the logits, whatever the temperature
        s = Sampler(SamplingParams(temperature=temp, top_k=0, top_p=1.0, min_p=0.1, seed=0))
        assert {s(logits) for _ in range(400)} == {0, 1, 2}
    s = Sampler(SamplingParams(temperature=3.0, top_k=0, top_p=1.0, seed=0))
    assert {s(logits) for _ in range(400)} == {0, 1, 2, 3, 4}   # off: every token comes


def test_logprobs_are_the_models_log_softmax_with_the_most_likely_first():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=300).astype(np.float32)
    want = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    tok, lp, top = logprobs(logits, 17, 5)
    # (exponentials in float32, sums in float64: sampling.logprobs_rows)
    assert tok == 17 and lp == pytest.approx(want[17], abs=1e-7)
    assert [t for t, _ in top] == list(np.argsort(-want)[:5])
    np.testing.assert_allclose([x for _, x in top], np.sort(want)[::-1][:5], atol=1e-7)
    assert logprobs(logits, 3, 0)[2] == ()


def test_logprobs_of_many_rows_at_once_are_each_rows_own():
    """A scored text's rows in one call: each row's log-softmax (float64 sums) for its own
    token, the best in order, ties by the lowest id, and a `top` beyond the vocabulary."""
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(6, 40000)) * 4).astype(np.float32)
    logits[2, [7, 9, 11]] = logits[2].max() + 1   # a three-way tie at the top
    toks = [0, 5, 9, 39999, 123, 77]
    got = logprobs_rows(logits, toks, 4)
    for r, (tok, lp, best) in enumerate(got):
        x = logits[r].astype(np.float64)
        want = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        assert tok == toks[r] and lp == pytest.approx(want[tok], abs=1e-6)
        order = sorted(range(x.size), key=lambda i: (-x[i], i))[:4]
        assert [t for t, _ in best] == order
        np.testing.assert_allclose([v for _, v in best], want[order], atol=1e-6)
    assert [t for t, _ in got[2][2][:3]] == [7, 9, 11]
    small = logprobs_rows(np.array([[1.0, 3.0, 2.0]], np.float32), [0], 5)[0]
    assert [t for t, _ in small[2]] == [1, 2, 0] and small[1] == pytest.approx(np.log(np.exp(1) / np.exp([1, 3, 2]).sum()))
    assert [b for _, _, b in logprobs_rows(logits, toks, 0)] == [()] * 6
    many = np.repeat(logits, 5, axis=0)   # blocks spread over threads: each row as alone
    assert logprobs_rows(many, np.repeat(toks, 5), 4, threads=3) == [g for g in got for _ in range(5)]


def test_a_reply_records_each_tokens_logprob_from_the_logits_that_chose_it(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    d = llm.dialogue()
    reply = d.send("hello there", temperature=0, max_tokens=8, logprobs=3)
    got = d.reply_logprobs
    assert len(got) == d.last_stats.decode_tokens >= 1
    assert llm.detokenize([t for t, _, _ in got], special=False) == reply
    first = d.first_token_logits.astype(np.float64)
    assert got[0][1] == pytest.approx(first[got[0][0]] - np.log(np.exp(first - first.max()).sum()) - first.max())
    for tok, lp, top in got:   # greedy: each chosen token is the most likely one
        assert len(top) == 3 and top[0] == (tok, lp) and top[0][1] >= top[1][1] >= top[2][1]
    d.send("again", temperature=0, max_tokens=4)
    assert d.reply_logprobs is None   # not asked for this turn


def test_repeat_penalty_is_llama_cpps_over_the_window_of_the_dialogue_and_the_reply():
    import ctypes

    import llama_cpp

    rng = np.random.default_rng(1)
    n_vocab = 40
    history = [int(t) for t in rng.integers(0, n_vocab, 30)]
    for pen, last_n in ((1.3, 8), (0.8, 64), (2.0, 1)):
        s = Sampler(SamplingParams(temperature=0, repeat_penalty=pen, repeat_last_n=last_n), history=history)
        # the reference: llama.cpp's penalties sampler, fed the same tokens (llama-server feeds it the
        # prompt, then each chosen token)
        ref = llama_cpp.llama_sampler_init_penalties(n_vocab, last_n, pen, 0.0, 0.0)
        for t in history:
            llama_cpp.llama_sampler_accept(ref, t)
        for _ in range(6):
            logits = rng.normal(scale=2.0, size=n_vocab).astype(np.float32)
            data = (llama_cpp.llama_token_data * n_vocab)(*(llama_cpp.llama_token_data(i, float(logits[i]), 0.0)
                                                            for i in range(n_vocab)))
            arr = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
            llama_cpp.llama_sampler_apply(ref, ctypes.byref(arr))
            want = np.array([data[i].logit for i in range(n_vocab)])
            got = s.adjusted(logits)
            assert not np.array_equal(got, logits)   # some token of the window was there
            np.testing.assert_allclose(got, want, rtol=1e-6)
            tok = s(logits)
            llama_cpp.llama_sampler_accept(ref, tok)
        llama_cpp.llama_sampler_free(ref)
    # 1 or an empty window: the logits as given; -1: the whole history
    logits = np.array([2.0, -1.0, 0.5], dtype=np.float32)
    for kw in (dict(repeat_penalty=1.0), dict(repeat_penalty=2.0, repeat_last_n=0)):
        assert Sampler(SamplingParams(temperature=0, **kw), history=[0, 1]).adjusted(logits) is logits
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=-1), history=[0, 1] + [2] * 100)
    np.testing.assert_array_equal(s.adjusted(logits), [1.0, -2.0, 0.25])
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=2), history=[0, 1] + [2] * 100)
    np.testing.assert_array_equal(s.adjusted(logits), [2.0, -1.0, 0.25])


def test_a_reply_with_a_repeat_penalty_is_chosen_over_its_prompt_and_itself(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    kw = dict(temperature=0, max_tokens=10, repeat_penalty=100.0, repeat_last_n=-1)
    d = llm.dialogue()
    reply = d.send("hello hello hello there", **kw)
    assert reply != llm.dialogue().send("hello hello hello there", temperature=0, max_tokens=10)
    n = d.last_stats.decode_tokens
    prompt, toks = d.tokens[:-n], d.tokens[-n:]
    # the same turn teacher-forced along the reply: a sampler given the prompt as history
    # chooses each of its tokens from the logits the model gave there
    seen = []

    def force(logits):
        seen.append(np.array(logits))
        return toks[len(seen) - 1]

    llm.dialogue().send("hello hello hello there", token_fn=force, max_tokens=n)
    s = Sampler(SamplingParams(**kw), history=prompt)
    assert len(seen) == n and [s(x) for x in seen] == toks


def test_a_negative_seed_is_taken_and_minus_one_is_random():
    """numpy takes no negative seed (a 500 from the server, a traceback from the CLI before):
    -1 is llama.cpp's "random", another negative seed repeats its choices as a positive one does."""
    from loopserve_edge.sampling import rng_seed

    assert rng_seed(None) is None and rng_seed(-1) is None and rng_seed(7) == 7
    assert rng_seed(-5) == (1 << 64) - 5
    logits = np.random.default_rng(0).normal(size=500).astype(np.float32)

    def draws(seed):
        s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed))
        return [s(logits) for _ in range(20)]

    assert draws(-5) == draws(-5) != draws(-6)
    assert len({tuple(draws(-1)) for _ in range(3)}) > 1   # 20 draws over 500 tokens: never the same thrice
