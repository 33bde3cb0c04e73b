"""Random-weight models for speed and memory runs (loopserve_edge.random_gguf)."""
import numpy as np

from loopserve_edge.random_gguf import write_random_llama


def test_fast_weights_are_random_f16_at_one_scale_and_load(tmp_path, make_llm):
    import gguf

    path = write_random_llama(tmp_path / "fast.gguf", n_layer=2, n_embd=128, n_head=4, n_head_kv=2,
                              n_ff=256, dtype=np.float16, fast=True)
    w = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    q = w["blk.0.attn_q.weight"].astype(np.float32)
    assert w["blk.0.attn_q.weight"].dtype == np.float16
    assert np.all((np.abs(q) >= 2 ** -6) & (np.abs(q) < 2 ** -5))
    assert 0.4 < (q > 0).mean() < 0.6 and len(np.unique(q)) > 1000     # signs and mantissas vary
    assert not np.array_equal(q, w["blk.1.attn_q.weight"].astype(np.float32))
    d = make_llm(path, n_ctx=256).dialogue()
    assert d.send("hello there", temperature=0, max_tokens=4) is not None



def test_q4_1_matrices_hold_the_weights_and_load(tmp_path, make_llm):
    import gguf
    import pytest

    path = write_random_llama(tmp_path / "q4_1.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=96,
                              quant="q4_1", seed=5)
    ref = write_random_llama(tmp_path / "f32.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=96, seed=5)
    t = {x.name: x for x in gguf.GGUFReader(path).tensors}
    f = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(ref).tensors}
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "output.weight"):
        assert t[name].tensor_type == q4_1
        # the same random values, to Q4_1's precision (16 levels per block of 32)
        w = gguf.quants.dequantize(np.asarray(t[name].data), q4_1)
        step = (f[name].max(axis=1, keepdims=True) - f[name].min(axis=1, keepdims=True)) / 15
        assert w.shape == f[name].shape and np.all(np.abs(w - f[name]) <= step)
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert make_llm(path, n_ctx=128).dialogue().send("hi", temperature=0, max_tokens=2) is not None
    with pytest.raises(ValueError, match="quant"):
        write_random_llama(tmp_path / "x.gguf", quant="q8_0")
