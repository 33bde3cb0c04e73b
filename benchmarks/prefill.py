"""Sparse prefill (issue 5): checks and benchmarks.

  check  - CUDA against the CPU reference on random inputs (head dim 64/128, GQA 1/3/4/8,
           lengths not a multiple of the block, f16/q8_0 K/V, transposed V): vs_scores,
           select and sparse attention; prints a pass/fail table (exit 1 on a failure)
  ops    - attention op time at several lengths: stock ggml_flash_attn_ext vs the sparse
           op (last ubatch of a prompt of that length, a fixed selection), density reached,
           and the estimation ops' time
  ttft   - end-to-end prefill time (TTFT) of a prompt, stock vs sparse, with the density
           (and, with --profile, the sparse run's estimation, selection, attention and the
           rest of the model timed apart; --repeats N: the median of N runs a path, and their range)

  python benchmarks/prefill.py check
  python benchmarks/prefill.py ops --lengths 8192,32768,65536,131072 --shape 1b
  python benchmarks/prefill.py ttft --model M.gguf --lengths 2048,4096,8192 [--n-gpu-layers -1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loopserve_edge  # noqa: E402,F401  (llama.cpp's library before numpy)
from loopserve_edge import sparse_ops as so  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = {"135m": (9, 3, 64), "1b": (32, 8, 64), "8b": (32, 8, 128), "gemma3-270m": (4, 1, 256)}  # n_head, n_head_kv, head dim


def rand_lists(r, n_kv, n_head_kv, n_col, n_off):
    lists = []
    for _ in range(n_head_kv):
        cols = sorted(set(r.integers(0, n_kv, n_col).tolist()) | {0, 1, 2, 3})
        offs = sorted(set(r.integers(0, n_kv, n_off).tolist()) | set(range(min(64, n_kv))))
        lists.append([cols, offs])
    return lists


# -- check ------------------------------------------------------------------------------

def check(args) -> int:
    rows, fails = [], 0
    r = np.random.default_rng(0)

    def row(what, shape, ok, err):
        nonlocal fails
        fails += not ok
        rows.append((what, shape, "PASS" if ok else "FAIL", err))

    def check_select(sc, label, configs):
        for kw in configs:
            a, _ = so.run(so.OP_SELECT, scores=sc, **kw)
            b, _ = so.run(so.OP_SELECT, scores=sc, gpu=True, **kw)
            worst = 0
            for g in range(sc.shape[0]):
                for kind in range(2):
                    sa = set(a[g, kind, 1:1 + a[g, kind, 0]].tolist())
                    sb = set(b[g, kind, 1:1 + b[g, kind, 0]].tolist())
                    worst = max(worst, len(sa ^ sb))
            # float sums in another order may move the alpha cut by a line
            row("select", f"{label} {kw}", worst <= 2, f"max sym. diff {worst}")

    for d, gqas in ((64, (1, 3, 4, 8)), (128, (1, 3, 4, 8)), (256, (2, 4))):
        for gqa in gqas:
            n_head_kv = 2
            n_head = n_head_kv * gqa
            # f16 K/V with V rows go to the tensor-core kernel, the rest to the SIMT one; the
            # bigger lists span several steps of 128 offsets / columns; "gaps": the batch's
            # cells are scattered (a block's cell range is wider than the block)
            for n_tok, hist, tk, vt, n_lines, how in (
                    (300, 0, "f16", False, (20, 12), ""), (333, 517, "q8_0", False, (20, 12), ""),
                    (130, 70, "f16", True, (20, 12), ""), (700, 400, "f16", False, (300, 200), "f32 mask"),
                    (200, 900, "f16", False, (40, 30), "gaps"), (260, 333, "f16", False, (30, 20), "no mask"),
                    (190, 250, "q8_0", False, (30, 20), "no mask"), (300, 256, "f16", False, (30, 20), "short sel")):
                n_kv = hist + n_tok + 11
                q = r.standard_normal((n_head, n_tok, d)).astype(np.float32)
                k = r.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
                v = r.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
                cells = np.arange(hist, hist + n_tok)
                if how == "gaps":
                    cells = np.sort(r.choice(n_kv, n_tok, replace=False))
                mask = None if how in ("no mask", "short sel") else so.causal_mask(cells, n_kv)
                # "short sel": a selection made over fewer cells (the previous ubatch's, reused)
                n_sel = n_kv - n_tok if how == "short sel" else n_kv
                sel = so.sel_array(rand_lists(r, n_sel, n_head_kv, *n_lines), n_sel)
                # blocks as the runtime's default, and 64 for one case
                block = 64 if how == "f32 mask" else so.default_block(n_head, n_head_kv)
                kw = dict(q=q, k=k, v=v, mask=mask, cells=cells, sel=sel, type_k=tk, type_v=tk, v_trans=vt,
                          mask_f16=how != "f32 mask", scale=1 / np.sqrt(d), block_q=block)
                cpu, _ = so.run(so.OP_SPARSE, **kw, n_threads=8)
                try:
                    gpu, _ = so.run(so.OP_SPARSE, gpu=True, **kw)
                    err = float(np.max(np.abs(gpu - cpu)))
                    ok = err < (2e-2 if tk == "q8_0" else 5e-3)
                except RuntimeError as e:
                    err, ok = str(e), False
                row("sparse_attn", f"d={d} gqa={gqa} tok={n_tok} kv={n_kv} block={block} {tk}{' vT' if vt else ''} "
                    f"{how}".rstrip(),
                    ok, err)
    # the fused estimation against the CPU's, last 64 rows of a batch (a history before it);
    # 20000 keys: CTAs over several chunks, the lean path and the general one in one CTA;
    # "gaps": no mask and the rows' cells with gaps, which the lean pass 2 (its shared sums
    # unsynchronized) must leave to the general one
    est_cases = [(*cfg, n_kv, False)
                 for cfg in ((4, 4, 64, 0.0, True), (24, 8, 64, 0.0, True), (9, 3, 64, 0.0, False),
                             (8, 2, 128, 30.0, True), (4, 1, 256, 0.0, True), (32, 8, 64, 0.0, None),
                             (16, 2, 64, 0.0, None), (6, 3, 128, 0.0, None), (4, 4, 64, 0.0, None),
                             (32, 8, 128, 0.0, None),
                             (9, 3, 64, 0.0, None))
                 for n_kv in (1000, 4097, 20000)]
    est_cases += [(32, 8, 64, 0.0, None, 20000, True), (8, 1, 128, 0.0, None, 20000, True)]
    for n_head, n_head_kv, d, softcap, mf16, n_kv, gaps in est_cases:
        q = r.standard_normal((n_head, 64, d)).astype(np.float32)
        k = r.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
        cells = (np.arange(n_kv - 64 - 200, n_kv - 200) + 3 * (np.arange(64) % 2) if gaps
                 else np.arange(n_kv - 64 - 7, n_kv - 7))
        # mf16 None: no mask (causal in cells)
        kw = dict(q=q, k=k, mask=None if mf16 is None else so.causal_mask(cells, n_kv), cells=cells,
                  type_k="f16", mask_f16=bool(mf16), scale=1 / np.sqrt(d), softcap=softcap)
        cpu, _ = so.run(so.OP_ESTIMATE, **kw, n_threads=8)
        try:
            gpu, _ = so.run(so.OP_ESTIMATE, **kw, gpu=True)
            err = float(np.max(np.abs(gpu - cpu) / (np.abs(cpu) + 1e-3)))
            ok = err < 2e-3
        except RuntimeError as e:
            err, ok = str(e), False
        row("vs_estimate", f"heads={n_head}/{n_head_kv} d={d} kv={n_kv}{' softcap' if softcap else ''}"
            f"{' no mask' if mf16 is None else '' if mf16 else ' f32 mask'}{', cells with gaps' if gaps else ''}", ok, err)
    for n_head, n_head_kv in ((4, 4), (24, 8), (9, 3)):
        for n_kv in (1000, 4097):
            p = r.random((n_head, 64, n_kv)).astype(np.float32) / n_kv
            cells = np.arange(n_kv - 64, n_kv)
            cpu, _ = so.run(so.OP_VS, p=p, cells=cells, n_head_kv=n_head_kv)
            gpu, _ = so.run(so.OP_VS, p=p, cells=cells, n_head_kv=n_head_kv, gpu=True)
            err = float(np.max(np.abs(gpu - cpu) / (np.abs(cpu) + 1e-3)))
            row("vs_scores", f"heads={n_head}/{n_head_kv} kv={n_kv}", err < 1e-3, err)
            check_select(cpu, f"heads_kv={n_head_kv} kv={n_kv}", (
                dict(alpha=0.9), dict(alpha=0.5, n_min_v=30, n_max_s=50, n_sink=4, n_local=64), dict(alpha=1.0)))
    # long score rows as the runtime sees them at 128K: heavy-tailed, and with many ties
    sc = np.exp(3 * r.standard_normal((8, 2, 131072))).astype(np.float32)
    check_select(sc, "heads_kv=8 kv=131072 lognormal", (
        dict(alpha=0.95), dict(alpha=0.95, n_max_v=1024, n_max_s=128, n_sink=4, n_local=64)))
    check_select(np.round(sc, 0), "heads_kv=8 kv=131072 ties", (
        dict(alpha=0.9), dict(alpha=0.99, n_min_v=3000, n_max_s=128, n_local=64)))
    w = max(len(x[1]) for x in rows)
    for what, shape, res, err in rows:
        print(f"{what:12s} {shape:{w}s} {res}  {err}")
    print(f"{len(rows) - fails}/{len(rows)} passed")
    return 1 if fails else 0


# -- ops ----------------------------------------------------------------------------------

def ops(args) -> int:
    n_head, n_head_kv, d = SHAPES[args.shape]
    block = args.block or so.default_block(n_head, n_head_kv)
    r = np.random.default_rng(1)
    print(f"shape {args.shape}: {n_head} heads, {n_head_kv} KV heads, d={d}; last ubatch of {args.ubatch} "
          f"queries; selection {args.n_vertical} columns + {args.n_slash} diagonals (incl. 64 local) per KV head; "
          f"blocks of {block} queries; K/V {args.kv_type} for FA and sparse (the estimation reads f16 K)")
    # FA@set: stock flash attention over a dense K/V as long as the mean key set, a lower
    # bound for gathering the set into fattn.cu's sparse path
    # sparse and est fused: without a mask (causal in cells), as the runtime runs them for a
    # sequence in cell order; "w/ mask": the sparse op reading the KQ mask
    print(f"{'length':>8} {'FA ms':>9} {'sparse ms':>10} {'speedup':>8} {'density':>8} {'w/ mask':>8} "
          f"{'FA@set ms':>10} {'est chain ms':>13} {'est fused ms':>13} {'select ms':>10}")
    for L in [int(x) for x in args.lengths.split(",")]:
        n_tok = min(args.ubatch, L)
        q = r.standard_normal((n_head, n_tok, d)).astype(np.float32)
        k = r.standard_normal((n_head_kv, L, d)).astype(np.float32)
        cells = np.arange(L - n_tok, L)
        # the estimation of the ubatch's last 64 queries (the fused op: no mask, causal in cells)
        ekw = dict(q=q[:, -64:], k=k, cells=cells[-64:], type_k="f16", mask_f16=True,
                   scale=1 / np.sqrt(d), gpu=args.gpu, n_iter=args.iters, n_threads=args.threads)
        if args.est_only:
            _, t_est = so.run(so.OP_ESTIMATE, **ekw, mask=None)
            print(f"{L:8d} {'-':>9} {'-':>10} {'-':>8} {'-':>8} {'-':>8} {'-':>10} {'-':>13} {t_est:13.3f} {'-':>10}",
                  flush=True)
            continue
        v = r.standard_normal((n_head_kv, L, d)).astype(np.float32)
        mask = so.causal_mask(cells, L)
        kw = dict(q=q, k=k, v=v, mask=mask, cells=cells, type_k=args.kv_type, type_v=args.kv_type, mask_f16=True,
                  scale=1 / np.sqrt(d), gpu=args.gpu, n_iter=args.iters, n_threads=args.threads)
        _, t_fa = so.run(so.OP_FLASH, **kw)
        sel = so.sel_array(rand_lists(r, L, n_head_kv, args.n_vertical, args.n_slash), L)
        # the runtime passes no mask when the sequence sits in its cells in order (causal in cells)
        out, t_sp = so.run(so.OP_SPARSE, sel=sel, block_q=block, **{**kw, "mask": None})
        _, t_spm = so.run(so.OP_SPARSE, sel=sel, block_q=block, **kw)
        density = float(out[n_tok, :, 0].sum() / out[n_tok, :, 1].sum())
        n_set = max(1, int(density * float(np.mean(cells + 1))))
        _, t_set = so.run(so.OP_FLASH, **{**kw, "k": k[:, :n_set], "v": v[:, :n_set],
                                            "mask": np.zeros((n_tok, n_set), np.float32)})
        # the mul_mat/soft_max/vs_scores chain (reading the mask) vs the fused op
        _, t_chain = so.run(so.OP_ESTIMATE_CHAIN, **ekw, mask=mask[-64:])
        sc, t_est = so.run(so.OP_ESTIMATE, **ekw, mask=None)
        _, t_sel = so.run(so.OP_SELECT, scores=sc, alpha=0.95, gpu=args.gpu, n_iter=args.iters, n_threads=args.threads)
        print(f"{L:8d} {t_fa:9.3f} {t_sp:10.3f} {t_fa / t_sp:7.2f}x {density:8.3f} {t_spm:8.3f} {t_set:10.3f} {t_chain:13.3f} "
              f"{t_est:13.3f} {t_sel:10.3f}",
              flush=True)
    return 0


# -- ttft ---------------------------------------------------------------------------------

def real_tokens(model, n: int) -> list[int]:
    """n tokens of real text: the shared data's passages one after the other. A real model's
    attention on them is as concentrated as in use, so the selection (and its density) is
    what a user gets; on random token ids it is far more spread."""
    from loopserve_edge import Llama, LoopServeConfig
    from loopserve_edge.bench.data import passages_and_questions

    with Llama(model, loopserve=LoopServeConfig(max_resident=1), n_ctx=256) as llm:
        toks: list[int] = []
        for title, text, _ in passages_and_questions(100000):
            toks += llm.tokenize(f"{title}\n{text}\n\n", add_bos=not toks)
            if len(toks) >= n:
                return toks[:n]
    raise SystemExit(f"the shared data holds fewer than {n} tokens of passages")


def ttft(args) -> int:
    from loopserve_edge import Llama, LoopServeConfig

    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    lengths = [int(x) for x in args.lengths.split(",")]
    model = args.model
    if model is None:
        from loopserve_edge.paths import default_model
        model = default_model()
    batch = "the prompt" if args.batch == 0 else args.batch or args.ubatch
    print(f"model {Path(model).name}, n_gpu_layers {args.n_gpu_layers}, flash_attn {args.flash_attn}, "
          f"ubatch {args.ubatch}, alpha {args.alpha}, max vertical/slash {args.max_vertical}/{args.max_slash}, "
          f"last_q {args.last_q}, reuse {args.reuse}, n_batch {batch}, "
          f"block {args.block or 'default'}"
          f"{', SWA cache sized to the window' if args.no_swa_full else ''}; "
          f"{'real text (passages of the shared data)' if args.text == 'real' else 'random token ids'}")
    # "in cell order": sparse ubatches whose mask was causal in cells (the GPU path skips the mask)
    # "reused": sparse ubatches that attended over the previous one's selection (--reuse)
    print(f"{'length':>8} {'stock s':>9} {'sparse s':>9} {'speedup':>8} {'density':>8} {'sparse ubatches':>16} "
          f"{'in cell order':>14} {'reused':>7} {'profile: est / sel / attn / rest ms':>36}")
    # token ids within the vocabulary (the random Gemma shape's byte tokenizer has ~260)
    n_vocab = len(gguf.GGUFReader(model).fields["tokenizer.ggml.tokens"].data)
    hi = min(20000 if args.model else 256, n_vocab)
    rng = np.random.default_rng(2)
    real = real_tokens(model, max(lengths)) if args.text == "real" else None
    for L in lengths:
        toks = real[:L] if real is not None else [int(t) for t in rng.integers(min(100, hi // 2), hi, L)]
        res, runs = {}, {}
        for mode in ("stock", "sparse", "profile") if args.profile else ("stock", "sparse"):
            cfg = LoopServeConfig(sparse_prefill=mode != "stock", alpha=args.alpha, last_q=args.last_q,
                                  prefill_reuse=args.reuse,
                                  max_vertical=args.max_vertical,
                                  max_slash=args.max_slash, prefill_block=args.block, max_resident=1)
            n_batch = L if args.batch == 0 else max(args.batch or args.ubatch, args.ubatch)
            llm = Llama(model, loopserve=cfg, n_ctx=L + 64, n_batch=n_batch, n_ubatch=args.ubatch,
                        n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn, n_threads=args.threads,
                        n_threads_batch=args.threads, **({"swa_full": False} if args.no_swa_full else {}))
            if mode == "profile":
                llm.set_prefill_profile(True)
            dlg = llm.dialogue()
            llm.decode(dlg, toks[:64], list(range(64)))  # warm-up (graph build, allocations)
            llm.forget(dlg)
            # --repeats: the run of median time (one run's time moves by ~5% on the GPU box)
            timed = []
            for _ in range(args.repeats):
                dlg = llm.dialogue()
                t0 = time.perf_counter()
                llm.decode(dlg, toks, list(range(L)))
                timed.append((time.perf_counter() - t0, llm.prefill_stats()))
                llm.forget(dlg)
            timed.sort(key=lambda r: r[0])
            res[mode], runs[mode] = timed[(len(timed) - 1) // 2], [t for t, _ in timed]
            llm.close()
        ts, (tp, st) = res["stock"][0], res["sparse"]
        dens = f"{st['density']:.3f}" if st["density"] is not None else "-"
        prof = ""
        if "profile" in res:
            # rest: the profiled run's wall time less the three (the model's other work,
            # and the syncs of the profile itself)
            tw, sp = res["profile"]
            stages = (sp["t_estimate_ms"], sp["t_select_ms"], sp["t_attend_ms"])
            prof = " / ".join(f"{t:.0f}" for t in (*stages, tw * 1000 - sum(stages)))
        print(f"{L:8d} {ts:9.3f} {tp:9.3f} {ts / tp:7.2f}x {dens:>8} "
              f"{st['n_ubatch_sparse']:>7}/{st['n_ubatch_sparse'] + st['n_ubatch_stock']:<8} "
              f"{st['n_ubatch_cell_causal']:>14} {st['n_ubatch_reused']:>7} {prof:>36}"
              + (f"   {args.repeats} runs: stock {runs['stock'][0]:.3f}-{runs['stock'][-1]:.3f} s, sparse "
                 f"{runs['sparse'][0]:.3f}-{runs['sparse'][-1]:.3f} s" if args.repeats > 1 else ""), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    o = sub.add_parser("ops")
    o.add_argument("--shape", choices=SHAPES, default="1b")
    o.add_argument("--lengths", default="8192,32768,65536,131072")
    o.add_argument("--ubatch", type=int, default=2048)
    o.add_argument("--n-vertical", type=int, default=1024)
    o.add_argument("--n-slash", type=int, default=512)
    o.add_argument("--block", type=int, default=None, help="query rows per block (default: the runtime's)")
    o.add_argument("--iters", type=int, default=5)
    o.add_argument("--est-only", action="store_true", help="time only the fused estimation (the other columns '-')")
    o.add_argument("--threads", type=int, default=4)
    o.add_argument("--cpu", dest="gpu", action="store_false")
    o.add_argument("--kv-type", choices=("f16", "q8_0"), default="f16",
                   help="K/V type of stock flash attention and the sparse op")
    t = sub.add_parser("ttft")
    t.add_argument("--model", default=None, help="GGUF (default: the default model)")
    t.add_argument("--lengths", default="2048,4096,8192")
    t.add_argument("--ubatch", type=int, default=2048)
    t.add_argument("--alpha", type=float, default=0.95)
    t.add_argument("--last-q", type=int, default=64, help="estimation rows per ubatch (LoopServeConfig.last_q)")
    t.add_argument("--reuse", type=int, default=1,
                   help="a selection serves this many ubatches (LoopServeConfig.prefill_reuse; needs --batch 0)")
    t.add_argument("--batch", type=int, default=None,
                   help="n_batch, tokens per decode call (default: the ubatch; 0: the whole prompt in one call)")
    t.add_argument("--max-vertical", type=int, default=None)
    t.add_argument("--max-slash", type=int, default=None)
    t.add_argument("--block", type=int, default=None, help="prefill_block (default: the runtime's)")
    t.add_argument("--n-gpu-layers", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--flash-attn", action="store_true")
    t.add_argument("--repeats", type=int, default=1,
                   help="timed runs of each path (one model load each); the median's time and stats are printed")
    t.add_argument("--profile", action="store_true",
                   help="also a profiled sparse run (estimation, selection, attention and the rest apart)")
    t.add_argument("--text", choices=("random", "real"), default="random",
                   help="the input: random token ids (speed shapes) or real passages (real models)")
    t.add_argument("--no-swa-full", action="store_true",
                   help="sliding-window caches sized to the window (llama.cpp's swa_full=False; the runtime's "
                        "dialogues keep them full-size), to measure what the full-size one costs")
    a = ap.parse_args()
    return {"check": check, "ops": ops, "ttft": ttft}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
