"""Several dialogues' replies decoded together, one llama_decode per step (the server's way)."""
import numpy as np
import pytest
from conftest import GPU_LAYERS, step_reply

from loopserve_edge import LoopServeConfig, bindings
from loopserve_edge.dialogue import Step
from loopserve_edge.errors import ContextFullError

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
            scored = [dialogues[i].score_window > 0 for i, _ in steps]
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


def test_a_batch_larger_than_the_pool_is_refused_and_its_dialogues_stay_whole(tiny_model, make_llm):
    """Three dialogues of ~100 cells on a 256-cell pool: one is swapped out to make room for the
    others. Decoding all three in one step cannot fit: ContextFullError (what the server's
    scheduler avoids by letting replies wait), no dialogue of the batch swapped out to bring
    another in, and each goes on afterwards as a twin with the same history does."""
    llm = make_llm(tiny_model, n_ctx=256, loopserve=LoopServeConfig(max_resident=3))
    prompt = "the quick brown fox " * 5
    ds = [llm.dialogue() for _ in range(3)]
    for d in ds:
        d.send(prompt, **dict(GREEDY, max_tokens=4))
    assert all(86 <= len(d.positions) <= 128 for d in ds)
    assert sum(d._swapped is not None for d in ds) == 1
    with pytest.raises(ContextFullError):
        llm.decode_batch([(d, 7, d.positions[-1] + 1) for d in ds])
    replies = [d.send("more", **GREEDY) for d in ds]
    for d in ds:
        llm.forget(d)
    twin = llm.dialogue()
    twin.send(prompt, **dict(GREEDY, max_tokens=4))
    assert replies == [twin.send("more", **GREEDY)] * 3


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


@pytest.mark.parametrize("first_scored", [True, False])
def test_a_step_that_is_not_scored_gets_no_scores_from_the_batch(tiny_model, make_llm, first_scored):
    """One reply scoring its step (H2O, a cut's window) beside one that does not (a reply
    before its deferred cut's rows): before, the whole batch was scored, so the second
    dialogue's scores counted rows it never asked for, which an H2O turn after a LoopServe one
    ranked by (found by replaying the server's concurrent conversations alone)."""
    llm = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=3))
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 250, n)] for n in (40, 55)]
    ds = [llm.dialogue() for _ in prompts]
    for d, p in zip(ds, prompts):
        llm.decode(d, p, list(range(len(p))))
        d.tokens, d.positions = list(p), list(range(len(p)))
        llm.reset_scores(d)
    want = [first_scored, not first_scored]
    logits = llm.decode_batch([(d, 9, len(p)) for d, p in zip(ds, prompts)], scored=want)
    got = [llm.attention_scores_by_head(d)[1] for d in ds]
    assert [llm.score_rows(d) for d in ds] == [int(w) for w in want]
    assert [bool(g.any()) for g in got] == want
    # the scored one's scores and both logits are those of each step alone
    yes = want.index(True)
    twins = [llm.dialogue() for _ in prompts]
    for i, (d, p) in enumerate(zip(twins, prompts)):
        llm.decode(d, p, list(range(len(p))))
        d.tokens, d.positions = list(p), list(range(len(p)))
        llm.reset_scores(d)
        np.testing.assert_allclose(llm.decode_batch([(d, 9, len(p))], scored=i == yes)[0], logits[i],
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[yes], llm.attention_scores_by_head(twins[yes])[1], rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="scored flags"):
        llm.decode_batch([(d, 10, len(p) + 1) for d, p in zip(ds, prompts)], scored=[True])


def test_deferred_cuts_of_dialogues_decoded_together_all_happen(tiny_model, make_llm):
    cfg = LoopServeConfig(policy="loopserve", budget=96, interval=16, max_resident=3)
    llm = make_llm(tiny_model, n_ctx=1024, loopserve=cfg)
    ds = [llm.dialogue() for _ in range(3)]
    long = [p * 12 for p in PROMPTS]
    drive_together(llm, ds, long, temperature=0, max_tokens=12)
    for d in ds:
        assert d.evicted > 0 and d.n_cells <= cfg.budget + cfg.interval
    assert not llm.evictor.deferred


@pytest.mark.skipif(GPU_LAYERS != 0, reason="CUDA's kernels are not covered (the CPU backend's switch)")
@pytest.mark.parametrize("invariant", [False, True])
def test_batch_invariant_attention_gives_a_dialogue_its_logits_alone_wherever_it_sits(default_model, make_llm,
                                                                                      invariant):
    """The CPU's flash attention tiles a long batch's keys from cell 0 and splits a lone
    query's keys among the threads from 512 cells in view, so without batch_invariant a
    dialogue's logits follow where its cells sit and what it is decoded with. (The default
    model: its quantized matrix products give each row the same sums at any batch size; the
    tiny model's float32 ones do not, through llamafile's sgemm.)"""
    cfg = LoopServeConfig(max_resident=3, batch_invariant=invariant)
    llm = make_llm(default_model, n_ctx=2048, n_threads=2, flash_attn=True, loopserve=cfg)
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(300, 40000, 150)]   # > 64 rows: the tiled prefill
    other = [int(t) for t in rng.integers(300, 40000, 700)]     # > 512 cells in view
    n = len(prompt)

    def steps(d, beside=None):
        """d's prompt, then two steps: the first batched beside `beside` (if any), then alone."""
        d.tokens, d.positions = list(prompt), list(range(n))
        llm.decode(d, prompt, list(range(n)))
        first = llm.decode_batch([(d, 9, n)] + ([(beside, 9, len(other))] if beside else []))[0]
        return first, llm.decode_batch([(d, 10, n + 1)])[0]

    a = llm.dialogue()
    alone = steps(a)                  # the lowest cells, nothing else in view
    a.close()
    b = llm.dialogue()
    llm.decode(b, other, list(range(len(other))))
    b.tokens, b.positions = list(other), list(range(len(other)))
    beside = steps(llm.dialogue(), beside=b)   # above b's 700 cells, its first step batched with b's
    same = [np.array_equal(x, y) for x, y in zip(alone, beside)]
    if invariant:
        assert same == [True, True]
    else:  # what the switch is for: the stock paths' sums differ (here by up to 0.5 in a logit)
        assert same != [True, True]


def test_batch_invariant_attention_needs_flash_attention(tiny_model, make_llm):
    from loopserve_edge.errors import LoopServeError

    with pytest.raises(LoopServeError, match="batch_invariant needs flash attention"):
        make_llm(tiny_model, flash_attn=False, loopserve=LoopServeConfig(batch_invariant=True))
    # on by default with it
    assert make_llm(tiny_model, loopserve=LoopServeConfig(batch_invariant=True)).context_params.flash_attn_type == 1


@pytest.mark.skipif(GPU_LAYERS != 0, reason="CUDA's kernels are not covered (the CPU backend's switch)")
@pytest.mark.parametrize("invariant", [False, True])
def test_batch_invariant_placement_keeps_a_dialogues_cells_in_order(tiny_model, make_llm, invariant):
    """Another dialogue leaves a hole below this one's cells: llama.cpp would put the next
    tokens there, out of position order, and the reference attention's sums (in cell order)
    would change. With batch_invariant they go after the highest cell in use, and when the
    pool's end is reached the residents are repacked, each in order."""
    cfg = LoopServeConfig(max_resident=3, batch_invariant=invariant)
    llm = make_llm(tiny_model, n_ctx=512, n_threads=2, flash_attn=True, loopserve=cfg)
    rng = np.random.default_rng(7)
    prompt, other, filler = ([int(t) for t in rng.integers(3, 250, n)] for n in (50, 100, 300))

    def run(holes: bool) -> list[np.ndarray]:
        if holes:
            b = llm.dialogue()
            llm.decode(b, other, list(range(len(other))))
        a = llm.dialogue()
        llm.decode(a, prompt, list(range(len(prompt))))
        if holes:
            b.close()   # a hole of 100 cells below a's
        out = [llm.decode_batch([(a, 9 + i % 50, len(prompt) + i)])[0] for i in range(6)]
        if holes:       # another dialogue takes the cells up to the pool's end less 56
            c = llm.dialogue()
            llm.decode(c, filler, list(range(len(filler))))
            if invariant:
                assert bindings.llama_loopserve_kv_tail(llm._ctx.ctx) == 56
        out += [llm.decode_batch([(a, 9 + i % 50, len(prompt) + i)])[0] for i in range(6, 70)]
        if holes:
            if invariant:  # repacked when the 56 ran out: a's 120 cells and c's 300 from cell 0
                assert bindings.llama_loopserve_kv_tail(llm._ctx.ctx) == 512 - 120 - 300
            c.close()
        a.close()
        return out

    alone, moved = run(False), run(True)
    same = all(np.array_equal(x, y) for x, y in zip(alone, moved))
    assert same == invariant


@pytest.mark.skipif(GPU_LAYERS != 0, reason="the CPU backend's flash attention row")
def test_batch_invariant_flash_attention_agrees_with_attention_without_it(default_model, make_llm):
    """Batch-invariant attention takes the CPU flash attention's one-chunk path, whose rows with
    f16 K/V go through ggml_cpu_loopserve_fa_row (patch 0010): blocks of up to 256 visible
    cells, the other dialogues' cells skipped. Here a 300-token prompt (two blocks) sits above
    another dialogue's 700 cells (masked), and its logits are compared with those computed
    without flash attention: bit-for-bit equality alone and batched would not catch a wrong sum."""
    rng = np.random.default_rng(7)
    prompt = [int(t) for t in rng.integers(300, 40000, 300)]
    other = [int(t) for t in rng.integers(300, 40000, 700)]
    n = len(prompt)

    def logits(flash_attn):
        cfg = LoopServeConfig(max_resident=2, batch_invariant=flash_attn)
        llm = make_llm(default_model, n_ctx=2048, n_threads=2, flash_attn=flash_attn, loopserve=cfg)
        b = llm.dialogue()
        llm.decode(b, other, list(range(len(other))))
        b.tokens, b.positions = list(other), list(range(len(other)))
        d = llm.dialogue()
        d.tokens, d.positions = list(prompt), list(range(n))
        llm.decode(d, prompt, list(range(n)))
        first = llm.decode_batch([(d, 9, n), (b, 9, len(other))])[0]
        return np.stack([first, llm.decode_batch([(d, 10, n + 1)])[0]])

    fa, ref = logits(True), logits(False)

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lf, lr = log_softmax(fa), log_softmax(ref)
    kl = (np.exp(lr) * (lr - lf)).sum(axis=1)
    assert (fa.argmax(axis=1) == ref.argmax(axis=1)).all()
    # f16 K/V either way: KL 0.003 / 0.021 here (the stock loop it replaced: 0.006 / 0.030)
    assert kl.max() < 0.05


@pytest.mark.parametrize("granularity", ["cell", "head"])
def test_a_reply_swapped_out_between_its_decode_and_its_cut_goes_on(tiny_model, make_llm, granularity):
    """The server decodes a batch, then may prefill a new request (which can swap out a dialogue
    whose reply is in progress), then hands each reply its logits: the reply's cut then found
    its dialogue out of the pool ("attention scores do not cover the dialogue's cells", a 500
    found by a load of concurrent budgeted conversations). Its scores are held through the swap
    (held_scores): the cut brings it back and is made as it would have been, the reply goes on."""
    cfg = LoopServeConfig(max_resident=2, policy="loopserve", budget=64, interval=8, defer_cut=0, recent=16,
                          granularity=granularity)
    llm = make_llm(tiny_model, n_ctx=1024, loopserve=cfg, flash_attn=True)
    d, other = llm.dialogue(), llm.dialogue()
    gen = d.send_steps(" ".join(f"w{i}" for i in range(150)), temperature=0, max_tokens=40,
                       token_fn=lambda logits: int(np.argmax(logits[3:])) + 3)   # never the end token
    seen = {"swapped": 0, "most": 0}

    def between(k):
        seen["most"] = max(seen["most"], len(d.positions))
        if k % cfg.interval == 0 and seen["swapped"] < 3:   # this token's cut is due when handed its logits
            llm.swap_out(d)
            other.send("x", max_tokens=1, temperature=0)   # another dialogue takes the pool meanwhile
            seen["swapped"] += 1

    step_reply(llm, d, gen, between=between)
    swapped, most = seen["swapped"], seen["most"]
    assert swapped == 3 and d.last_stats.decode_tokens == 40
    # every cut made, those due while it was out too
    assert most == cfg.budget + cfg.interval - 1 and len(d.positions) <= cfg.budget + cfg.interval
    twin_llm = make_llm(tiny_model, n_ctx=1024, loopserve=cfg, flash_attn=True)
    twin = twin_llm.dialogue()
    twin.send(" ".join(f"w{i}" for i in range(150)), temperature=0, max_tokens=40,
              token_fn=lambda logits: int(np.argmax(logits[3:])) + 3)
    assert d.positions == twin.positions and d.tokens == twin.tokens and d.evicted == twin.evicted


@pytest.mark.parametrize("budgeted", [False, True])
def test_a_reply_closed_between_a_tokens_decode_and_its_logits_leaves_the_dialogue_whole(tiny_model, make_llm,
                                                                                         budgeted):
    """The server decodes a step, then hands the logits on at the next one; a client gone in
    between closes the reply there. That token stayed in the cache but not in the dialogue: the
    next turn of a full-attention dialogue failed in llama_decode (its position taken), a
    budgeted one's cut at the end of the reply raised ("attention scores do not cover the
    dialogue's cells"). Now it goes as the token was never decoded."""
    cfg = LoopServeConfig(budget=64, recent=16, interval=8) if budgeted else LoopServeConfig()
    llm = make_llm(tiny_model, n_ctx=512, loopserve=cfg, flash_attn=True)

    def reply_closed(decode_last):
        d = llm.dialogue()
        gen = d.send_steps("w " * 100, temperature=0, max_tokens=20,
                           token_fn=lambda logits: int(np.argmax(logits[3:])) + 3)   # never the end token
        # closed at its 5th token: decoded, or not yet
        step_reply(llm, d, gen, between=lambda k: k == 5) if decode_last else step_reply(llm, d, gen, until=4)
        gen.close()
        return d

    d, twin = reply_closed(True), reply_closed(False)
    assert d.last_stats.decode_tokens == twin.last_stats.decode_tokens == 4
    assert llm.seq_cells(d._seq) == len(d.positions) == len(twin.positions)
    assert d.send("more", **GREEDY) == twin.send("more", **GREEDY)
    if not budgeted:
        np.testing.assert_allclose(d.first_token_logits, twin.first_token_logits, atol=1e-4)


@pytest.mark.skipif(GPU_LAYERS != 0, reason="the CPU backend's flash attention row")
def test_batch_invariant_attention_over_cells_that_dialogues_share(tiny_model, make_llm):
    """A cell can carry several sequences (llama_memory_seq_cp: a prefix shared). The cells' list
    of batch-invariant attention (patch 0014) then makes one group of every cell, by position,
    since no sequence's group would hold the shared ones. A dialogue stepping over a prefix it
    shares with another gets the logits it gets over its own copy of it, and so does the other."""
    from loopserve_edge.bindings import llama_c

    llm = make_llm(tiny_model, n_ctx=512, n_threads=2, flash_attn=True,
                   loopserve=LoopServeConfig(max_resident=3, batch_invariant=True))
    rng = np.random.default_rng(11)
    prompt = [int(t) for t in rng.integers(3, 250, 40)]

    def steps(d):
        return [llm.decode_batch([(d, 9 + i, len(prompt) + i)])[0] for i in range(8)]

    own = llm.dialogue()
    llm.decode(own, prompt, list(range(len(prompt))))
    own.tokens, own.positions = list(prompt), list(range(len(prompt)))
    alone = steps(own)
    own.close()

    a, b = llm.dialogue(), llm.dialogue()
    llm.decode(a, prompt, list(range(len(prompt))))
    a.tokens, a.positions = list(prompt), list(range(len(prompt)))
    llm.make_resident(b)
    llama_c.llama_memory_seq_cp(llm._mem, a._seq, b._seq, -1, -1)   # a's cells now b's too
    b.tokens, b.positions = list(prompt), list(range(len(prompt)))
    assert bindings.llama_loopserve_seq_n_cells(llm._ctx.ctx, b._seq) == len(prompt)
    for d in (b, a):   # each over the shared cells, then its own
        for x, y in zip(alone, steps(d)):
            assert np.array_equal(x, y)


@pytest.mark.skipif(GPU_LAYERS != 0, reason="the CPU backend's flash attention tiles")
def test_batch_invariant_steps_decoded_together_over_a_shared_prefix(default_model, make_llm):
    """Two dialogues sharing a 300-cell prefix (two blocks of cells in the CPU's attention tiles)
    decoded together: the tile computes the rows of tokens whose block of cells is the same once
    for both (the first block) and apart where their cells part (the second), and each dialogue
    gets, bit for bit, the logits of the same steps over its own copy of the prefix alone. One
    thread: the step's rows in one chunk, so one tile holds both tokens. (The default model: the
    tiny one's float32 products sum a row differently beside another.)"""
    from loopserve_edge.bindings import llama_c

    llm = make_llm(default_model, n_ctx=1024, n_threads=1, n_threads_batch=1, flash_attn=True,
                   loopserve=LoopServeConfig(max_resident=3, batch_invariant=True))
    rng = np.random.default_rng(12)
    prompt = [int(t) for t in rng.integers(300, 40000, 300)]
    n = len(prompt)
    feeds = {0: [905, 1701, 3303, 2002], 1: [909, 4101, 707, 12000]}

    def fresh():
        d = llm.dialogue()
        llm.decode(d, prompt, list(range(n)))
        d.tokens, d.positions = list(prompt), list(range(n))
        return d

    alone = {}
    for i, feed in feeds.items():
        d = fresh()
        alone[i] = [llm.decode_batch([(d, t, n + j)])[0] for j, t in enumerate(feed)]
        d.close()

    a, b = fresh(), llm.dialogue()
    llm.make_resident(b)
    llama_c.llama_memory_seq_cp(llm._mem, a._seq, b._seq, -1, -1)   # a's cells now b's too
    b.tokens, b.positions = list(prompt), list(range(n))
    together = {0: [], 1: []}
    for j in range(4):
        x, y = llm.decode_batch([(a, feeds[0][j], n + j), (b, feeds[1][j], n + j)])
        together[0].append(x)
        together[1].append(y)
    for i in feeds:
        assert all(np.isfinite(x).all() for x in together[i])
        for x, y in zip(alone[i], together[i]):
            assert np.array_equal(x, y), f"dialogue {i}: max difference {np.abs(x - y).max()}"


@pytest.mark.skipif(GPU_LAYERS != 0, reason="the CPU backend's flash attention row")
@pytest.mark.parametrize("n_threads", [1, 3])
def test_batch_invariant_prefill_gives_each_position_its_logits_decoded_alone(default_model, n_threads):
    """With batch-invariant attention every op sums a row as it would alone: a prompt prefilled at
    once (its flash attention rows computed a tile of tokens at a time, a block of K/V rows for
    all of them; its weight products in tiles) gives each position, bit for bit, the logits of
    its tokens decoded one at a time (one row a step). 300 tokens: two blocks of cells; 1 and 3
    threads split the rows into chunks that start mid-token."""
    import llama_cpp

    llm = llama_cpp.Llama(str(default_model), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=n_threads,
                          n_threads_batch=n_threads, n_gpu_layers=0, flash_attn=True, logits_all=True,
                          verbose=False)
    assert bindings.llama_loopserve_set_batch_invariant(llm.ctx, True) >= 1
    prompt = [int(t) for t in np.random.default_rng(n_threads).integers(300, 40000, 300)]
    llm.eval(prompt)
    at_once = np.array(llm.scores[:len(prompt)])
    llm.reset()
    for t in prompt:
        llm.eval([t])
    alone = np.array(llm.scores[:len(prompt)])
    assert np.isfinite(at_once).all() and at_once.std() > 0
    assert np.array_equal(at_once, alone), f"max difference {np.abs(at_once - alone).max()}"
