"""Decode speed with observation-window scoring off and on, at several context depths.

    python benchmarks/score_overhead.py [MODEL.gguf] [--depths 256,1024,2048] [--tokens 64]
    python benchmarks/score_overhead.py --random 576,30,9,3,1536,49152 --n-gpu-layers -1 ...

--random N_EMBD,N_LAYER,N_HEAD,N_HEAD_KV,N_FF,N_VOCAB writes a random-weight f16 Llama GGUF
of that shape (the default is SmolLM2-135M's) for machines without the default model.

For each depth and flash-attention setting: prefill `depth` tokens, then decode `tokens`
single tokens with scoring off, roll them back, and decode them again with scoring on
(window 16, so each decode scores its one token); repeated, best of `reps` per setting.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from loopserve_edge import Llama, LoopServeConfig
from loopserve_edge.paths import default_model


def write_random(path, n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab):
    import gguf

    rng = np.random.default_rng(0)
    hd = n_embd // n_head

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w = gguf.GGUFWriter(path, "llama")
    for k, v in (("context_length", 131072), ("embedding_length", n_embd), ("block_count", n_layer),
                 ("feed_forward_length", n_ff), ("head_count", n_head), ("head_count_kv", n_head_kv),
                 ("layer_norm_rms_eps", 1e-5), ("rope_dimension_count", hd), ("rope_freq_base", 10000.0),
                 ("vocab_size", n_vocab)):
        getattr(w, f"add_{k}")(v)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # a byte-level BPE vocab padded with unused tokens up to n_vocab
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    sym, extra = [], 0
    for b in range(256):
        sym.append(chr(b) if b in kept else chr(256 + extra))
        extra += b not in kept
    tokens = sym + ["\u0120t"] + [f"<x{i}>" for i in range(n_vocab - 260)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.NORMAL)] * (n_vocab - 3) + [int(gguf.TokenType.CONTROL)] * 3)
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(n_vocab - 3)
    w.add_eos_token_id(n_vocab - 1)
    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd))
    for i in range(n_layer):
        for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (hd * n_head_kv, n_embd)),
                            ("attn_v", (hd * n_head_kv, n_embd)), ("attn_output", (n_embd, n_embd)),
                            ("ffn_gate", (n_ff, n_embd)), ("ffn_up", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", rand(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def decode_run(llm, dlg, start, toks):
    t0 = time.perf_counter()
    for i, t in enumerate(toks):
        llm.decode(dlg, [t], [start + i])
    dt = time.perf_counter() - t0
    llm.remove_positions(dlg._seq, start)
    return len(toks) / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--depths", default="256,1024,2048")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--random", metavar="SHAPE", help="N_EMBD,N_LAYER,N_HEAD,N_HEAD_KV,N_FF,N_VOCAB")
    a = ap.parse_args()
    if a.random:
        import tempfile
        shape = [int(x) for x in a.random.split(",")]
        model = write_random(os.path.join(tempfile.mkdtemp(), "random.gguf"), *shape)
        print(f"random-weight f16 llama, shape {a.random}")
    else:
        model = a.model or default_model()
    depths = [int(d) for d in a.depths.split(",")]
    rng = np.random.default_rng(0)
    print(f"model {os.path.basename(str(model))}, threads {a.threads}, n_gpu_layers {a.n_gpu_layers}, "
          f"{a.tokens} decoded tokens, best of {a.reps}")
    print(f"{'fa':>3} {'depth':>6} {'off tok/s':>10} {'on tok/s':>10} {'overhead':>9}")
    for fa in (False, True):
        llm = Llama(model, n_ctx=max(depths) + a.tokens + 8, n_threads=a.threads,
                    n_threads_batch=a.threads, flash_attn=fa, n_gpu_layers=a.n_gpu_layers,
                    loopserve=LoopServeConfig(max_resident=1))
        n_vocab = llm.n_vocab
        for depth in depths:
            dlg = llm.dialogue()
            ctx = [int(t) for t in rng.integers(100, min(n_vocab, 30000), depth)]
            llm.decode(dlg, ctx, list(range(depth)))
            toks = [int(t) for t in rng.integers(100, min(n_vocab, 30000), a.tokens)]
            decode_run(llm, dlg, depth, toks[:8])  # warm-up
            off, on = [], []
            for _ in range(a.reps):
                llm.set_score_window(0)
                off.append(decode_run(llm, dlg, depth, toks))
                llm.set_score_window(16)
                on.append(decode_run(llm, dlg, depth, toks))
                llm.reset_scores(dlg)
            llm.set_score_window(0)
            b_off, b_on = max(off), max(on)
            print(f"{'on' if fa else 'off':>3} {depth:>6} {b_off:>10.1f} {b_on:>10.1f} "
                  f"{100 * (b_off / b_on - 1):>8.1f}%", flush=True)
            llm.forget(dlg)
        llm.close()


if __name__ == "__main__":
    main()
