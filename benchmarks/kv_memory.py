"""KV memory: what a context allocates, against stock llama-cpp-python / llama.cpp at the same
n_ctx, and what a budgeted dialogue needs for a long input (issue 16).

    python benchmarks/kv_memory.py alloc  [--models default,gemma] [--n-ctx 8192,32768]
    python benchmarks/kv_memory.py budget [--tokens 8192,32768] [--budget 1024] [--threads 2]
    python benchmarks/kv_memory.py resident [--budget 512] [--granularity head] [--turns 4]
    python benchmarks/kv_memory.py fits   [--budget 8192] [--pool 14336]

`alloc` prints, per model, n_ctx and KV type, the bytes of KV that each allocates
(llama_loopserve_kv_bytes: llama.cpp's own memory breakdown): stock llama-cpp-python (one
sequence; its default swa_full=True), stock llama.cpp's tools (swa_full=False), and
loopserve-edge's pool for 1 and 4 (the default) resident dialogues, with the ratio to
llama.cpp's.

`budget` feeds one dialogue an input of real passages of each length and prints, for full
attention with n_ctx large enough and for a budgeted dialogue (loopserve, budget B, n_ctx 2B:
budgeted prefill in chunks), the KV bytes allocated, the cells held after the turn, the
chunks, the time to the first token and the peak RSS of the process so far.

`resident` runs two budgeted dialogues of real passages interleaved in one pool and each alone,
and compares their replies and first-token logits turn by turn.

`fits` computes (does not measure) a "what fits" table for the 1B/3B/8B shapes at 32K and
128K inputs: stock vs. a budgeted dialogue, f16 and q8_0 KV, against 8/12/16/24 GB cards.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

# real passages, read in place (LOOPSERVE_DATA); loads llama.cpp before numpy
from loopserve_edge.bench.data import passages_and_questions

import llama_cpp  # noqa: E402  (after loopserve_edge: llama.cpp's library before numpy)

TYPES = ("f16", "q8_0", "q4_0")
TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}   # per element (ggml blocks of 32)
# the speed shapes (random_gguf.SHAPES): layers, KV heads, head dim; published parameter counts
# (Llama-3.2-1B/3B, Llama-3.1-8B model cards)
FIT_SHAPES = {"1B": (16, 8, 64, 1.24e9), "3B": (28, 8, 128, 3.21e9), "8B": (32, 8, 128, 8.03e9)}
Q4_K_M_BITS = 4.85   # llama.cpp's Q4_K_M: about this many bits per weight on average
CARDS_GB = (8, 12, 16, 24)


def bytes_per_cell(n_layer: int, n_head_kv: int, head_dim: int, kv_type: str) -> float:
    """K and V of one cell in every layer (all layers full-attention)."""
    return 2 * n_layer * n_head_kv * head_dim * TYPE_BYTES[kv_type]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _model(name: str) -> Path:
    from loopserve_edge.paths import data_dir, default_model

    if name == "default":
        return default_model()
    if name == "gemma":
        path = data_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"
        if not path.exists():
            raise SystemExit(f"{path} is missing: python scripts/get_gemma.py")
        return path
    return Path(name)


def alloc(a) -> None:
    from loopserve_edge import Llama, LoopServeConfig, bindings
    from loopserve_edge.context import kv_type_kwargs

    print("| model | n_ctx | KV type | llama-cpp-python MiB | llama.cpp (swa_full off) MiB | "
          "loopserve-edge MiB, max_resident 1 / 4 | ratio to llama.cpp, 1 / 4 | "
          "formula, all layers full-attention MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in a.models.split(","):
        path = _model(name)
        for n_ctx in (int(x) for x in a.n_ctx.split(",")):
            for t in TYPES:
                kw = dict(kv_type_kwargs(t), n_ctx=n_ctx, n_threads=a.threads, verbose=False)
                stock = {}
                for swa_full in (True, False):
                    s = llama_cpp.Llama(str(path), swa_full=swa_full, **kw)
                    stock[swa_full] = int(bindings.llama_loopserve_kv_bytes(s._ctx.ctx))
                    s.close()
                ours = []
                for resident in (1, 4):
                    with Llama(path, loopserve=LoopServeConfig(max_resident=resident), **kw) as llm:
                        ours.append(llm.kv_bytes)
                        md = llm.metadata
                arch = md["general.architecture"]
                shape = (int(md[f"{arch}.block_count"]), int(md[f"{arch}.attention.head_count_kv"]),
                         int(md.get(f"{arch}.attention.key_length") or
                             int(md[f"{arch}.embedding_length"]) // int(md[f"{arch}.attention.head_count"])))
                formula = bytes_per_cell(*shape, t) * n_ctx
                print(f"| {path.name} | {n_ctx} | {t} | {_mib(stock[True])} | {_mib(stock[False])} | "
                      f"{_mib(ours[0])} / {_mib(ours[1])} | "
                      f"{ours[0] / stock[False]:.2f} / {ours[1] / stock[False]:.2f} | {_mib(formula)} |", flush=True)


def _document(llm, n_tokens: int) -> str:
    """Real passages up to n_tokens, then a question (llm: ours, or llama-cpp-python's)."""
    parts, total = [], 0
    for title, text, _ in passages_and_questions(100000):
        piece = f"Document ({title}): {text}\n\n"
        parts.append(piece)
        total += len(llm.tokenize(piece.encode() if isinstance(llm, llama_cpp.Llama) else piece))
        if total >= n_tokens:
            break
    return "".join(parts) + "Question: which documents above mention a year?"


class _DevicePeak:
    """Peak memory used on GPU 0, polled through NVML (the driver's library, no Python package)
    every few milliseconds while a setting runs; None where there is no NVIDIA driver."""

    def __init__(self):
        import ctypes
        import threading

        try:
            self._nvml = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            self._nvml = None
            return
        self._nvml.nvmlInit_v2()
        self._dev = ctypes.c_void_p()
        self._nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self._dev))

        class Mem(ctypes.Structure):
            _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

        self._mem = Mem()
        self.peak = self.base = 0
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def used(self) -> int:
        import ctypes

        self._nvml.nvmlDeviceGetMemoryInfo(self._dev, ctypes.byref(self._mem))
        return self._mem.used

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.used())

    def reset(self) -> None:
        """From now on: the peak, and what was in use before (the CUDA context, other processes)."""
        if self._nvml is not None:
            self.peak = self.base = self.used()

    def above_base(self) -> int:
        return self.peak - self.base


def budget(a) -> None:
    """One dialogue fed one long input: full attention in a context that holds it against a
    budgeted dialogue (budgeted prefill in chunks). On the GPU box, peak device memory too."""
    from loopserve_edge import Llama, LoopServeConfig
    from loopserve_edge.context import kv_type_kwargs

    path = _model(a.model)
    pool = a.pool or 2 * a.budget
    peak = _DevicePeak() if a.n_gpu_layers else None
    gpu = peak is not None and peak._nvml is not None
    if gpu:
        # the CUDA context is made by the first model on the GPU: one layer of it, once, so that
        # every setting is measured above it
        llama_cpp.Llama(str(path), n_ctx=64, n_gpu_layers=1, verbose=False).close()
    where = f"GPU ({a.n_gpu_layers} layers), flash attention" if a.n_gpu_layers else f"{a.threads} threads"
    print(f"{path.name}, {where}, reply {a.reply_tokens} tokens greedy, n_batch {a.n_ubatch} / "
          f"n_ubatch {a.n_ubatch}; full: {'stock llama-cpp-python, n_ctx = input + 256' if a.stock else 'one dialogue, n_ctx = input + 1024'}; "
          f"budgeted: policy loopserve, budget {a.budget}, n_ctx {pool}\n")
    head = "| input tokens | KV type | setting | n_ctx | KV MiB allocated | cells held | chunks | TTFT s |"
    head += (" GPU MiB in use before | peak GPU MiB | weights MiB | peak less weights and what was in use before MiB |"
             if gpu else " peak RSS MiB |")
    print(head)
    print("|---:|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if gpu else "---:|"))
    stock_f16 = {}
    for n in (int(x) for x in a.tokens.split(",")):
        for kv in a.kv_type.split(","):
            kw = dict(kv_type_kwargs(kv), n_threads=a.threads, n_batch=a.n_ubatch, n_ubatch=a.n_ubatch,
                      n_gpu_layers=a.n_gpu_layers)
            if a.n_gpu_layers:
                kw["flash_attn"] = True
            less = {}
            for label in ("full", "budgeted") if kv in a.full_kv.split(",") else ("budgeted",):
                if peak is not None:
                    peak.reset()
                if label == "full" and a.stock:
                    # the stock path: llama-cpp-python's own object, no LoopServe controller
                    from loopserve_edge import bindings

                    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
                    tokens = vocab.tokenize(_document(vocab, n).encode())
                    vocab.close()
                    # a context just large enough for the input (its tokens counted whole)
                    llm = llama_cpp.Llama(str(path), n_ctx=len(tokens) + 256, verbose=False, **kw)
                    t0 = time.perf_counter()
                    llm.eval(tokens)
                    ttft = time.perf_counter() - t0
                    row = (len(tokens), llm.n_ctx(), bindings.llama_loopserve_kv_bytes(llm.ctx), len(tokens), 1, ttft)
                    weights = llama_cpp.llama_model_size(llm.model)
                    llm.close()
                else:
                    if label == "full":
                        cfg, n_ctx = LoopServeConfig(max_resident=1), n + 1024
                    else:
                        cfg = LoopServeConfig(max_resident=1, policy="loopserve", budget=a.budget)
                        n_ctx = pool
                    with Llama(path, loopserve=cfg, n_ctx=n_ctx, **kw) as llm:
                        d = llm.dialogue()
                        d.send(_document(llm, n), max_tokens=a.reply_tokens, temperature=0)
                        s = d.last_stats
                        row = (s.prompt_tokens, llm.n_ctx, llm.kv_bytes, s.kv_cells, s.prefill_chunks, s.ttft_s)
                        weights = llama_cpp.llama_model_size(llm._llm._model.model)
                cells = f"| {row[0]} | {kv} | {label} | {row[1]} | {_mib(row[2])} | {row[3]} | {row[4]} | {row[5]:.1f} |"
                if gpu:
                    less[label] = peak.above_base() - weights
                    if kv == "f16" and label == "full":
                        stock_f16[n] = less[label]
                    cells += f" {_mib(peak.base)} | {_mib(peak.peak)} | {_mib(weights)} | {_mib(less[label])} |"
                else:
                    cells += f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |"
                print(cells, flush=True)
            if gpu:
                for ref, value in (("full, same KV type", less.get("full")),
                                   ("full with f16 KV", stock_f16.get(n) if kv != "f16" else None)):
                    if value:
                        print(f"\n{n} tokens, {kv} budgeted against {ref}, peak GPU memory less weights: "
                              f"{less['budgeted'] / value:.3f} (1/{value / less['budgeted']:.1f})", flush=True)
                print(flush=True)


def _kl(p_logits, q_logits) -> float:
    import numpy as np

    lp = p_logits - p_logits.max()
    lp = lp - np.log(np.exp(lp).sum())
    lq = q_logits - q_logits.max()
    lq = lq - np.log(np.exp(lq).sum())
    return float(np.sum(np.exp(lp) * (lp - lq)))


def resident(a) -> None:
    """Two budgeted dialogues of real passages, interleaved in one pool, against each alone."""
    import numpy as np

    from loopserve_edge import Llama, LoopServeConfig

    path = _model(a.model)
    items = passages_and_questions(1000)
    turns = {}
    for name in ("A", "B"):
        turns[name] = []
        for _ in range(a.turns):
            title, text, q = next(items)
            turns[name].append(f"Document ({title}): {text[:1500]}\n\nQuestion: {q}?")
    print(f"{path.name}, {a.threads} threads, policy loopserve, budget {a.budget}, granularity {a.granularity}, "
          f"n_ctx 8192, {a.turns} turns each, replies of {a.reply_tokens} tokens greedy\n")
    print("| dialogue | turn | same reply | same first token | max abs logit diff | KL(alone || pooled) |")
    print("|---|---:|---|---|---:|---:|")
    cfg = dict(policy="loopserve", budget=a.budget, granularity=a.granularity)
    alone = {}
    for name, ts in turns.items():
        with Llama(path, n_ctx=8192, n_threads=a.threads, loopserve=LoopServeConfig(max_resident=1, **cfg)) as llm:
            d = llm.dialogue()
            alone[name] = [(d.send(t, max_tokens=a.reply_tokens, temperature=0), d.first_token_logits) for t in ts]
    with Llama(path, n_ctx=8192, n_threads=a.threads, loopserve=LoopServeConfig(max_resident=2, **cfg)) as llm:
        ds = {name: llm.dialogue() for name in turns}
        for i in range(a.turns):
            for name, d in ds.items():
                reply = d.send(turns[name][i], max_tokens=a.reply_tokens, temperature=0)
                want, lg = alone[name][i]
                diff = float(np.abs(lg - d.first_token_logits).max())
                print(f"| {name} | {i + 1} | {reply == want} | {int(lg.argmax()) == int(d.first_token_logits.argmax())} "
                      f"| {diff:.2e} | {_kl(lg, d.first_token_logits):.2e} |", flush=True)


def fits(a) -> None:
    """Computed, not measured: weights at Q4_K_M's average bits plus KV by bytes_per_cell (which
    `alloc` checks against llama.cpp's own count); compute buffers and the CUDA context excluded."""
    gb = 1e9
    print(f"GB of GPU memory: weights (Q4_K_M, ~{Q4_K_M_BITS} bits per weight) + KV. stock: n_ctx = the "
          f"input; loopserve-edge: budget {a.budget}, n_ctx {a.pool} (budgeted prefill in chunks of "
          f"{a.pool - a.budget}). The smallest of {'/'.join(map(str, CARDS_GB))} GB cards that holds it "
          "(compute buffers and the CUDA context, ~0.5-1 GB, not counted).\n")
    print("| shape | input | weights | stock f16 KV | stock q8_0 KV | loopserve-edge f16 | loopserve-edge q8_0 |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def cell(total: float) -> str:
        card = next((c for c in CARDS_GB if total <= c), None)
        return f"{total:.1f} ({f'{card} GB' if card else 'none'})"

    for name, (n_layer, n_kv, hd, params) in FIT_SHAPES.items():
        w = params * Q4_K_M_BITS / 8 / gb
        for n in (32768, 131072):
            row = [w + bytes_per_cell(n_layer, n_kv, hd, t) * n / gb for t in ("f16", "q8_0")]
            row += [w + bytes_per_cell(n_layer, n_kv, hd, t) * a.pool / gb for t in ("f16", "q8_0")]
            print(f"| {name} | {n // 1024}K | {w:.1f} | " + " | ".join(cell(x) for x in row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("alloc")
    p.add_argument("--models", default="default,gemma")
    p.add_argument("--n-ctx", default="8192,32768")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("budget")
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", default="8192,32768")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--reply-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-type", default="f16", help="comma-separated: f16,q8_0")
    p.add_argument("--n-ubatch", type=int, default=512, help="n_batch and n_ubatch of both settings")
    p.add_argument("--pool", type=int, default=0, help="n_ctx of the budgeted dialogue (default 2 x budget)")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--full-kv", default="f16,q8_0,q4_0", help="the KV types the full setting runs with")
    p.add_argument("--stock", action="store_true",
                   help="full attention through llama-cpp-python's own Llama (the stock path)")
    p = sub.add_parser("resident")
    p.add_argument("--model", default="default")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--granularity", default="head")
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("fits")
    p.add_argument("--budget", type=int, default=8192)
    p.add_argument("--pool", type=int, default=14336, help="n_ctx of the budgeted dialogue")
    a = ap.parse_args()
    {"alloc": alloc, "budget": budget, "resident": resident, "fits": fits}[a.cmd](a)


if __name__ == "__main__":
    main()
