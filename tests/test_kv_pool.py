"""One KV pool for every resident dialogue: its size, who gets swapped out when it runs short,
and replies that do not depend on what else is resident."""
import llama_cpp
import numpy as np
import pytest

from conftest import GPU_LAYERS, THREADS, assert_same_logits
from loopserve_edge import ContextFullError, LoopServeConfig, bindings
from loopserve_edge import context as context_mod

GREEDY = dict(temperature=0, max_tokens=12)


def _stock_kv_bytes(model, n_ctx: int) -> int:
    """KV bytes of stock llama-cpp-python's context at this n_ctx (one sequence)."""
    stock = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=THREADS, n_gpu_layers=GPU_LAYERS, verbose=False)
    try:
        return int(bindings.llama_loopserve_kv_bytes(stock._ctx.ctx))
    finally:
        stock.close()


@pytest.mark.parametrize("max_resident", [1, 4])
def test_the_pool_allocates_what_stock_llama_cpp_does(tiny_model, make_llm, max_resident):
    llm = make_llm(tiny_model, n_ctx=1024, loopserve=LoopServeConfig(max_resident=max_resident))
    assert llm.n_ctx == 1024
    assert llm.kv_bytes == _stock_kv_bytes(tiny_model, 1024) > 0
    # and it scales with n_ctx, not with the number of dialogues
    assert make_llm(tiny_model, n_ctx=2048).kv_bytes == 2 * llm.kv_bytes


def test_loading_never_holds_a_second_full_size_context(tiny_model, make_llm, monkeypatch):
    sizes = []
    real = context_mod.llama_cpp.Llama

    def spy(*a, **kw):
        sizes.append(kw["n_ctx"])
        return real(*a, **kw)

    monkeypatch.setattr(context_mod.llama_cpp, "Llama", spy)
    llm = make_llm(tiny_model, n_ctx=2048)
    assert sizes == [context_mod.BOOT_N_CTX] and llm.n_ctx == 2048


def test_n_ctx_zero_is_the_trained_context(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=0)
    assert llm.n_ctx == llm.n_ctx_train


def test_used_bytes_follow_the_cells_held(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=1024)
    a, b = llm.dialogue(), llm.dialogue()
    assert llm.cells_used == llm.kv_bytes_used() == 0
    a.send("one dialogue", **GREEDY)
    b.send("and another one, a little longer than the first", **GREEDY)
    assert llm.cells_used == len(a.tokens) + len(b.tokens)
    assert llm.kv_bytes_used(a) == llm.kv_bytes * len(a.tokens) // 1024
    assert llm.kv_bytes_used() >= llm.kv_bytes_used(a) + llm.kv_bytes_used(b) - 1


def _turns(word: str, n: int) -> list[str]:
    return [f"{word} {i}: " + " ".join([word] * 30) for i in range(n)]


def test_a_dialogue_that_does_not_fit_swaps_the_least_recently_used_out(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=512, loopserve=LoopServeConfig(max_resident=3))
    ds = [llm.dialogue(system=w) for w in ("red", "green", "blue")]
    for d, w in zip(ds, ("red", "green", "blue")):
        d.send(_turns(w, 1)[0], **GREEDY)
    a, b, c = ds
    assert all(d.resident for d in ds) and llm.cells_used > 512 // 2
    # c grows until the pool cannot hold all three: a, least recently used, goes first
    while a.resident:
        c.send("more about blue " + " ".join(["blue"] * 20), **GREEDY)
        assert llm.cells_used <= llm.n_ctx
    assert b.resident and c.resident and a._swapped
    # and comes back on its next turn, without prefilling its history again
    history = len(a.tokens)
    a.send("back to red", **GREEDY)
    assert a.last_stats.swapped_in and a.last_stats.reused_tokens == history


def test_one_dialogue_may_use_the_whole_pool(tiny_model, make_llm):
    llm = make_llm(tiny_model, n_ctx=512, loopserve=LoopServeConfig(max_resident=2))
    small = llm.dialogue()
    small.send("a short one", **GREEDY)
    big = llm.dialogue()
    big.send("w " * 235, **GREEDY)  # fits only once `small` is out
    assert 512 > len(big.tokens) > 512 - len(small.tokens)
    assert not small.resident and big.n_cells == len(big.tokens)
    with pytest.raises(ContextFullError):
        big.send("w " * 100, **GREEDY)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = np.exp(p_logits - p_logits.max()); p /= p.sum()
    q = np.exp(q_logits - q_logits.max()); q /= q.sum()
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


@pytest.mark.parametrize("granularity", ["cell", "head"])
def test_budgeted_dialogues_reply_alike_whatever_else_is_resident(tiny_model, make_llm, granularity):
    """Interleaved in one pool, budgeted dialogues (eviction leaves holes that the other one
    fills) give the replies they give alone: only the order in which a dialogue's own cells
    are summed can differ."""
    cfg = dict(policy="loopserve", budget=96, interval=16, granularity=granularity)
    turns = {w: _turns(w, 4) for w in ("north", "south")}
    alone = {}
    for w, ts in turns.items():
        llm = make_llm(tiny_model, n_ctx=1024, loopserve=LoopServeConfig(max_resident=1, **cfg))
        d = llm.dialogue(system=w)
        alone[w] = [(d.send(t, **GREEDY), d.first_token_logits) for t in ts]
    llm = make_llm(tiny_model, n_ctx=1024, loopserve=LoopServeConfig(max_resident=2, **cfg))
    ds = {w: llm.dialogue(system=w) for w in turns}
    for i in range(4):
        for w, d in ds.items():
            reply = d.send(turns[w][i], **GREEDY)
            assert d.resident and not d.last_stats.swapped_in
            want, logits = alone[w][i]
            assert reply == want
            assert _kl(logits, d.first_token_logits) < 1e-6
            assert_same_logits(d.first_token_logits, logits, atol=1e-4)
    assert all(d.evicted > 0 for d in ds.values())
