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

