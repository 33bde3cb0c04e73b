"""Random-weight Llama-shaped GGUF models, for tests and speed benchmarks (and a tiny
Gemma-3-shaped one, for the interleaved sliding-window KV cache that Gemma 3 gets).

The weights are noise, so the text is gibberish, but the file goes through exactly the
same llama.cpp paths as a real model: tokenizer, chat template, KV cache, sampling. The
tokenizer is either a tiny self-contained byte-level BPE (fast tests) or copied from a
real GGUF (benchmarks at real shapes, where token counts must match real text). Same
arguments -> byte-identical file.
"""
from __future__ import annotations

import pathlib
import sys

import gguf
import numpy as np

from .chat_template import CHATML

# name: (n_embd, n_layer, n_head, n_head_kv, n_ff), after public Llama-family configs
SHAPES = {
    "135m": (576, 30, 9, 3, 1536),     # SmolLM2-135M
    "1b": (2048, 16, 32, 8, 8192),     # Llama-3.2-1B
    "3b": (3072, 28, 24, 8, 8192),     # Llama-3.2-3B
    "8b": (4096, 32, 32, 8, 14336),    # Llama-3.1-8B
}
# Gemma-3-270M's attention and layers (its 262K-token vocabulary aside): head dim 256, and
# every sixth layer global, the others in a window of 512
GEMMA3_270M = dict(n_layer=18, n_embd=640, n_head=4, n_head_kv=1, head_dim=256, n_ff=2048, n_swa=512,
                   swa_pattern=6)

# The role names become single tokens, as in real ChatML vocabularies, so the template's
# glue around a message costs ~5 tokens rather than one per letter.
ROLE_WORDS = ("system", "user", "assistant")
# llama.cpp refuses a "gpt2" tokenizer without a merges key, and the gguf writer drops
# empty arrays, so merges are needed anyway; these also make BPE merging get exercised.
# Role-word merges rank first so that no other merge can split a role word.
MERGES = [f"{w[:i]} {w[i]}" for w in ROLE_WORDS for i in range(1, len(w))]
MERGES += ["Ġ t", "h e", "Ġt he", "i n", "e r", "o n", "Ġ a", "r e"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (token id == byte value)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:  # unprintable bytes are shifted past 255 so every byte gets a visible symbol
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _vocab() -> tuple[list[str], list[int]]:
    merged = list(dict.fromkeys(m.replace(" ", "") for m in MERGES))  # a vocab has no duplicates
    tokens = _byte_symbols() + merged + SPECIALS
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    types += [gguf.TokenType.CONTROL] * len(SPECIALS)
    return tokens, [int(t) for t in types]


def _copy_tokenizer(w: gguf.GGUFWriter, source: pathlib.Path) -> int:
    """Copy every tokenizer.* key of `source`; returns its vocabulary size."""
    n_vocab = 0
    for name, field in gguf.GGUFReader(source).fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, field.types[0], sub_type=sub)
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    return n_vocab


def _byte_tokenizer(w: gguf.GGUFWriter, chat_template: str | None = CHATML, add_bos: bool = False) -> int:
    tokens, types = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")  # SmolLM2's pre-tokenizer regex; plain GPT-2-style splitting
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))  # so a chat reply ends on <|im_end|>
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    return len(tokens)


def _writer(path, arch, seed, *, n_ctx_train, n_embd, n_layer, n_ff, n_head, n_head_kv) -> "gguf.GGUFWriter":
    """A GGUF writer with the name and the shape every architecture here shares."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"random-{arch}-{n_embd}x{n_layer}-{seed}")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    return w


def write_random_llama(path, *, seed=0, n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=128,
                       n_ctx_train=4096, tokenizer_from=None, dtype=np.float32,
                       std=0.02, qk_std=None, embd_std=None, fast=False, quant=None,
                       chat_template=CHATML, add_bos=False) -> pathlib.Path:
    """Write a Llama-architecture GGUF with N(0, std) weights (norms are ones).

    tokenizer_from: a GGUF whose tokenizer is copied; None for the tiny byte-level one, with
    `chat_template` (None: none, as a base model's GGUF) and `add_bos` (the tokenizer starts a
    text with BOS, as Llama's and Gemma's do).
    dtype: np.float32 or np.float16 (half the file for large shapes).
    qk_std, embd_std: other scales for attn_q/attn_k and token_embd (default: std); large
    Q/K scales make attention far from uniform, which attention-score checks need.
    fast (f16 only): random signs and mantissas at one exponent (|w| in [2^-6, 2^-5), about
    std 0.02) made from random bytes, several times quicker for the 8B shape; for runs that
    measure memory, where the values do not matter.
    quant: "q4_1" stores the layers' matrices and the output matrix in Q4_1 (the default
    model's type: the CPU's Q4_1 products are tested on it); n_embd and n_ff must then be
    multiples of its block of 32.
    The default head size, n_embd / n_head = 32, is the smallest a quantized KV cache
    accepts: llama.cpp wants it to be a multiple of q8_0's block of 32.
    """
    path = pathlib.Path(path)
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv
    rng = np.random.default_rng(seed)

    if quant not in (None, "q4_1"):
        raise ValueError(f"quant: {quant!r} (None or 'q4_1')")

    def add_matrix(name, *shape, s=std):  # a layer's or the output's matrix, quantized if asked
        m = rand(*shape, s=s)
        if quant is None:
            w.add_tensor(name, m)
        else:
            q4_1 = gguf.GGMLQuantizationType.Q4_1
            w.add_tensor(name, gguf.quants.quantize(m.astype(np.float32), q4_1), raw_dtype=q4_1)

    def rand(*shape, s=std):  # numpy shape is ggml's reversed: (rows=out, cols=in)
        if fast:
            bits = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), dtype=np.uint16)
            return ((bits & 0x83FF) | 0x2400).view(np.float16).reshape(shape)
        return (rng.standard_normal(shape, dtype=np.float32) * s).astype(dtype)

    w = _writer(path, "llama", seed, n_ctx_train=n_ctx_train, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                n_head=n_head, n_head_kv=n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if quant else
                    gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    if tokenizer_from:
        n_vocab = _copy_tokenizer(w, pathlib.Path(tokenizer_from))
    else:
        n_vocab = _byte_tokenizer(w, chat_template, add_bos)
    w.add_vocab_size(n_vocab)

    # Norm weights are ones (and f32, as llama.cpp expects): random norms add nothing.
    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd, s=embd_std or std))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        add_matrix(f"blk.{i}.attn_q.weight", n_embd, n_embd, s=qk_std or std)
        add_matrix(f"blk.{i}.attn_k.weight", n_embd_kv, n_embd, s=qk_std or std)
        add_matrix(f"blk.{i}.attn_v.weight", n_embd_kv, n_embd)
        add_matrix(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        add_matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        add_matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        add_matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.add_tensor("output_norm.weight", ones)
    add_matrix("output.weight", n_vocab, n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_random_gemma3(path, *, seed=0, n_layer=4, n_embd=128, n_head=4, n_head_kv=1, head_dim=32,
                        n_ff=128, n_swa=32, swa_pattern=2, n_ctx_train=4096, std=0.02,
                        qk_std=None) -> pathlib.Path:
    """Write a Gemma-3-architecture GGUF with N(0, std) weights and the tiny byte-level
    tokenizer. Every `swa_pattern`-th layer (the last of each group) attends to all
    positions, the others to the last `n_swa` (sliding window), so llama.cpp gives it an
    interleaved KV cache (llama_kv_cache_iswa: a base and a sliding-window cache), as it
    does Gemma 3 (pattern 6, window 512)."""
    path = pathlib.Path(path)
    rng = np.random.default_rng(seed)

    def rand(*shape, s=std):
        return rng.standard_normal(shape, dtype=np.float32) * s

    w = _writer(path, "gemma3", seed, n_ctx_train=n_ctx_train, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff,
                n_head=n_head, n_head_kv=n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_sliding_window(n_swa)
    w.add_sliding_window_pattern(swa_pattern)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    n_vocab = _byte_tokenizer(w)
    w.add_vocab_size(n_vocab)

    ones, head_ones = np.ones(n_embd, np.float32), np.ones(head_dim, np.float32)
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd))  # tied output, as in Gemma 3
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(n_head * head_dim, n_embd, s=qk_std or std))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(n_head_kv * head_dim, n_embd, s=qk_std or std))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(n_head_kv * head_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_q_norm.weight", head_ones)
        w.add_tensor(f"blk.{i}.attn_k_norm.weight", head_ones)
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(n_embd, n_head * head_dim))
        w.add_tensor(f"blk.{i}.post_attention_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(n_embd, n_ff))
        w.add_tensor(f"blk.{i}.post_ffw_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_shape(path, shape: str, tokenizer_from, seed=0, fast=False) -> pathlib.Path:
    """A benchmark model: a named shape from SHAPES, f16 weights, a real tokenizer; or
    Gemma-3-270M's shape (GEMMA3_270M: f32 weights, the byte tokenizer)."""
    if shape == "gemma3-270m":
        return write_random_gemma3(path, seed=seed, n_ctx_train=131072, **GEMMA3_270M)
    n_embd, n_layer, n_head, n_head_kv, n_ff = SHAPES[shape]
    return write_random_llama(path, seed=seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                              n_head_kv=n_head_kv, n_ff=n_ff, n_ctx_train=131072,
                              tokenizer_from=tokenizer_from, dtype=np.float16, fast=fast)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--fast"]
    if len(args) != 3 or args[1] not in [*SHAPES, "gemma3-270m"]:
        sys.exit(f"usage: python -m loopserve_edge.random_gguf OUT.gguf {{{','.join(SHAPES)},gemma3-270m}} "
                 "TOKENIZER.gguf [--fast]  (--fast: quick random f16 values, for memory runs)")
    print(write_shape(*args, fast="--fast" in sys.argv))
