"""Tiny random-weight chat models for fast tests (a byte-level vocab, ChatML)."""
from loopserve_edge.random_gguf import write_random_llama


def write_tiny_model(path, *, seed=0, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=128):
    return write_random_llama(path, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                              n_head_kv=n_head_kv, n_ff=n_ff)
