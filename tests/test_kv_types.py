"""Quantized KV (q8_0, q4_0: what consumer users turn on to fit) through scoring, eviction,
state files and sparse prefill."""
import numpy as np
import pytest

from loopserve_edge import LoopServeConfig, LoopServeError, StateFileError
from loopserve_edge.bindings import llama_c
from loopserve_edge.context import kv_type_kwargs

GREEDY = dict(temperature=0, max_tokens=10)
TURNS = [f"turn {i}: " + " ".join(f"fact {i}.{j} is {(i * 7 + j) % 10}" for j in range(12)) for i in range(4)]


def _prompt(n, seed=1):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, n)]


@pytest.mark.parametrize("kv,min_corr", [("q8_0", 0.99999), ("q4_0", 0.999)])
def test_quantized_kv_scores_keep_their_mass_and_follow_f16(tiny_model, make_llm, kv, min_corr):
    toks = _prompt(160)
    rows = {}
    for name in ("f16", kv):
        llm = make_llm(tiny_model, **dict(kv_type_kwargs(name), flash_attn=True))
        d = llm.dialogue()
        llm.set_score_window(6)
        llm.decode(d, toks, list(range(len(toks))))
        pos, rows[name] = llm.attention_scores_by_head(d)
        assert list(pos) == list(range(len(toks)))
        # each query row spreads one unit of probability per query head and layer
        n_head = llama_c.llama_model_n_head(llm._llm._model.model)
        np.testing.assert_allclose(rows[name].sum(), 6 * len(llm._scored_heads()) * n_head, rtol=1e-3)
    # the same cells matter with quantized keys as with f16 ones
    corr = np.corrcoef(rows["f16"].ravel(), rows[kv].ravel())[0, 1]
    assert corr > min_corr
    assert not np.array_equal(rows["f16"], rows[kv])  # the quantized cache is really in use


@pytest.mark.parametrize("granularity", ["cell", "head"])
@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_quantized_kv_dialogues_evict_save_and_resume(tiny_model, make_llm, tmp_path, kv, granularity):
    cfg = LoopServeConfig(policy="loopserve", budget=72, interval=16, granularity=granularity)
    llm = make_llm(tiny_model, loopserve=cfg, **kv_type_kwargs(kv))
    assert llm.context_settings()["type_k"] == kv_type_kwargs(kv)["type_k"]
    d = llm.dialogue()
    for t in TURNS[:3]:
        d.send(t, **GREEDY)
        assert d.n_cells <= cfg.budget + max(cfg.interval, d.last_stats.decode_tokens)
    assert d.evicted > 0 and d.layout == granularity
    path = d.save(tmp_path / "q.lsd")
    other = make_llm(tiny_model, loopserve=cfg, **kv_type_kwargs(kv))
    loaded = other.load_dialogue(path)
    assert loaded.send(TURNS[3], **GREEDY) == d.send(TURNS[3], **GREEDY)
    np.testing.assert_array_equal(loaded.first_token_logits, d.first_token_logits)
    f16 = make_llm(tiny_model, loopserve=cfg, **dict(kv_type_kwargs("f16"), flash_attn=True))
    with pytest.raises(StateFileError, match="type_k"):
        f16.load_dialogue(path)


def test_sparse_prefill_reads_q8_0_and_refuses_q4_0(tiny_model, make_llm):
    cfg = LoopServeConfig(sparse_prefill=True, alpha=0.5, sparse_min_tokens=256)
    llm = make_llm(tiny_model, loopserve=cfg, **kv_type_kwargs("q8_0"))
    d = llm.dialogue()
    llm.decode(d, _prompt(400), list(range(400)))
    st = llm.prefill_stats()
    assert st["n_ubatch_sparse"] >= 1 and 0 < st["density"] < 1
    with pytest.raises(LoopServeError, match="sparse prefill needs a KV cache of type f16, q8_0 or f32"):
        make_llm(tiny_model, loopserve=cfg, **kv_type_kwargs("q4_0"))


def test_unknown_kv_type_is_refused():
    with pytest.raises(LoopServeError, match="unknown KV type 'q3'"):
        kv_type_kwargs("q3")


def test_flash_attention_follows_the_kv_type_unless_asked():
    assert kv_type_kwargs("f16") == {"type_k": 1, "type_v": 1}
    assert kv_type_kwargs("q8_0")["flash_attn"] is True
    assert kv_type_kwargs("f16", flash_attn=False)["flash_attn"] is False
    assert kv_type_kwargs("q4_0", flash_attn=True)["flash_attn"] is True
    with pytest.raises(LoopServeError, match="q8_0 KV cache needs flash attention"):
        kv_type_kwargs("q8_0", flash_attn=False)


def test_llama_cpp_pythons_type_ids_llama_cpp_cannot_store_are_refused_before_they_abort(tiny_model, make_llm):
    """type_k / type_v as llama-cpp-python takes them (ggml type ids): an id past ggml's types
    aborted the process, a K-quant or quantized V without flash attention was "could not load"
    the model; quantized V without flash_attn given gets it, as kv_type_kwargs does."""
    for kw, msg in ((dict(type_k=99), "type_k=99 is not a type"), (dict(type_v=12), r"type_v=12 .* 8 \(q8_0\)"),
                    (dict(type_k=True), "type_k=True"),
                    (dict(type_k=3, type_v=3, flash_attn=False), r"q4_1 V cache \(type_v=3\) needs flash attention")):
        with pytest.raises(LoopServeError, match=msg):
            make_llm(tiny_model, **kw)
    llm = make_llm(tiny_model, type_k=7, type_v=7)   # q5_1, no flash_attn given
    assert llm.context_params.flash_attn_type == 1 and llm.context_params.type_v == 7
    assert llm.dialogue().send("a short turn", **GREEDY)


@pytest.mark.parametrize("kw", [dict(n_ctx=1), dict(n_ctx=512, n_batch=1)])
def test_a_batch_below_the_dialogues_resident_is_raised_not_an_abort(tiny_model, make_llm, kw):
    """llama.cpp keeps an output per sequence (max_resident) and clamps n_batch to the n_ctx
    asked: n_ctx 1 or n_batch 1 aborted the process in GGML_ASSERT."""
    llm = make_llm(tiny_model, **kw)
    assert llm.n_batch >= llm.config.max_resident and llm.n_ctx == (256 if kw["n_ctx"] == 1 else 512)
    ref = make_llm(tiny_model, n_ctx=512).dialogue().send("a short turn", **GREEDY)
    assert llm.dialogue().send("a short turn", **GREEDY) == ref
