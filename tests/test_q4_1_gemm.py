"""The CPU's products of Q4_1 weights in register tiles (patch 0013, csrc/ggml/src/ggml-cpu/
loopserve-gemm.cpp): the same logits, bit for bit, as llama.cpp's vec_dot loop that they
replace for batches of two or more rows, on a random Q4_1 model whose shapes leave partial
tiles (an output matrix of 283 rows, odd batch sizes)."""
import ctypes
import platform

import llama_cpp
import numpy as np
import pytest

from loopserve_edge.random_gguf import write_random_llama


def _has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
    return "avx2" in flags and "fma" in flags


pytestmark = pytest.mark.skipif(not _has_avx2_fma(), reason="the tiles are for x86 with AVX2 and FMA")


def _tile_calls() -> int:
    """Products the tiles computed in this process: the ggml-cpu library llama_cpp loaded
    (a wheel holds copies, not links, of libggml-cpu.so*: open the very file it mapped)."""
    path = next(l.split()[-1] for l in open("/proc/self/maps") if "libggml-cpu" in l)
    fn = ctypes.CDLL(path).ggml_cpu_loopserve_gemm_q4_1_calls
    fn.restype = ctypes.c_uint64
    return fn()


@pytest.fixture(scope="module")
def q4_1_model(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("q4_1") / "q4_1.gguf", quant="q4_1", n_layer=2,
                              n_embd=128, n_head=4, n_head_kv=2, n_ff=96, seed=3, std=0.05)


def _logits(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)])


# "": the default tiles (512-bit on a machine with AVX-512); "256": the 256-bit tiles alone,
# which a machine without AVX-512 runs
@pytest.mark.parametrize("n_threads,tiles", [(1, ""), (2, ""), (3, ""), (2, "256")])
def test_tiles_give_the_vec_dot_loops_logits_bit_for_bit(q4_1_model, monkeypatch, n_threads, tiles):
    llm = llama_cpp.Llama(str(q4_1_model), n_ctx=256, n_batch=64, n_ubatch=64, n_threads=n_threads,
                          n_threads_batch=n_threads, n_gpu_layers=0, op_offload=False, logits_all=True,
                          verbose=False)
    rng = np.random.default_rng(n_threads)
    # 37 and 64 + 7 rows leave partial tiles (of 4 or 8 rows); 2 is the fewest the tiles take
    for n in (37, 71, 2):
        tokens = rng.integers(1, llm.n_vocab(), n).tolist()
        monkeypatch.setenv("LOOPSERVE_Q4_1_GEMM", "0")
        before = _tile_calls()
        loop = _logits(llm, tokens)
        assert _tile_calls() == before  # LOOPSERVE_Q4_1_GEMM=0: every product in the vec_dot loop
        monkeypatch.setenv("LOOPSERVE_Q4_1_GEMM", tiles)
        tiled = _logits(llm, tokens)
        # 7 products a layer and the output's, in each ubatch of two or more rows
        assert _tile_calls() - before == 15 * -(-n // 64)
        assert np.isfinite(loop).all() and loop.std() > 0
        assert np.array_equal(tiled, loop), f"{n} tokens: max difference {np.abs(tiled - loop).max()}"


def test_batch_invariant_serving_keeps_the_tiles_and_the_loops_logits(q4_1_model, monkeypatch):
    """Batch-invariant attention (the server's default) puts ggml's CPU backend in its reference
    mode; the tiles stay (each output is the loop's sum whatever the batch): same logits, bit
    for bit, as the loop gives in that mode, with the tiles counted."""
    from loopserve_edge import bindings

    llm = llama_cpp.Llama(str(q4_1_model), n_ctx=256, n_batch=64, n_ubatch=64, n_threads=2, n_threads_batch=2,
                          n_gpu_layers=0, op_offload=False, logits_all=True, flash_attn=True, verbose=False)
    assert bindings.llama_loopserve_set_batch_invariant(llm.ctx, True) >= 1
    tokens = np.random.default_rng(7).integers(1, llm.n_vocab(), 45).tolist()
    monkeypatch.setenv("LOOPSERVE_Q4_1_GEMM", "0")
    loop = _logits(llm, tokens)
    monkeypatch.setenv("LOOPSERVE_Q4_1_GEMM", "")
    before = _tile_calls()
    tiled = _logits(llm, tokens)
    assert _tile_calls() - before == 15
    assert np.isfinite(loop).all() and np.array_equal(tiled, loop)

