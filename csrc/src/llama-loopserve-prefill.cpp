// loopserve-edge: LoopServe's adaptive vertical-slash sparse prefill (phase 1).
//
// Per full-attention layer of a long prompt ubatch, inside the graph (no host round trip):
//   1. estimate: the last last_q query rows attend to all cells (the model's own scale,
//      softcap and mask) -> probabilities p [n_kv, last_q, n_head];
//   2. ggml_loopserve_vs_scores: vertical (column) and slash (diagonal offset) mass per
//      KV head (a GQA group shares one selection, so the attention kernel reads each
//      selected K/V row once for all the group's query heads); with f16 K in GPU memory
//      1 and 2 are one op, ggml_loopserve_vs_estimate;
//   3. ggml_loopserve_select: per KV head, the fewest lines reaching alpha of the mass,
//      clamped, plus sinks and local diagonals;
//   4. ggml_loopserve_sparse_attn: exact softmax over the selected columns and the key
//      ranges the selected diagonals cover; its last row carries the density statistics.
// Everything else (decoding, short ubatches, sliding-window layers, ALiBi, sinks, KQ bias,
// MLA, several streams in a ubatch) keeps the stock path, and a context that never enables
// the phase builds the stock graph.

#include "llama-loopserve-prefill.h"

#include "ggml-backend.h"
#include "ggml-loopserve.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-loopserve-impl.h"
#include "llama-loopserve.h"
#include "llama-model.h"

#include <algorithm>
#include <cstring>
#include <memory>

//
// graph
//

llama_loopserve_prefill_cfg llama_loopserve_prefill_graph_cfg(const llama_context &          lctx,
                                                              const llama_ubatch &           ubatch,
                                                              const llama_memory_context_i * mctx) {
    llama_loopserve_prefill_cfg cfg =
        lctx.loopserve_prefill ? lctx.loopserve_prefill->cfg : llama_loopserve_prefill_cfg{};
    if (cfg.enabled && ubatch.n_tokens >= (uint32_t) std::max(cfg.n_min_tokens, 2)) {
        const auto * kv = dynamic_cast<const llama_kv_cache_context *>(mctx);
        if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
            kv = iswa->get_base();
        }
        // a ubatch whose last rows score the cache (llama-loopserve.h) reads their mask rows,
        // so it keeps the mask: the window's scores come from Q K^T as with flash attention
        const bool scored = lctx.loopserve_scores && lctx.loopserve_scores->n_window_ub > 0;
        cfg.cell_causal   = !scored && kv != nullptr && kv->loopserve_cells_causal(ubatch);
        // the next ubatch of the input whose selection is stored, within the same decode call
        // (llama_loopserve_prefill_fold clears the age at its end: between calls the cache
        // may change)
        const auto * st   = lctx.loopserve_prefill.get();
        if (cfg.reuse > 1 && st->sel_age > 0 && st->sel_age < cfg.reuse && ubatch.n_seqs_unq == 1 &&
            ubatch.seq_id[0][0] == st->sel_seq && ubatch.pos[0] == st->sel_pos_next) {
            cfg.sel_reuse = true;
            cfg.sel_n_kv  = st->sel_n_kv;
        }
    }
    cfg.st = lctx.loopserve_prefill.get();
    if (lctx.loopserve_scores && lctx.loopserve_scores->n_window_ub < 0) {
        cfg.saved = lctx.loopserve_scores.get();  // the window rows' queries are saved
    }
    if (lctx.loopserve_scores && lctx.loopserve_scores->n_hidden > 0) {
        // rows hidden per head: every layer attends densely, each KV head with its own mask
        cfg.hide    = lctx.loopserve_scores.get();
        cfg.enabled = false;
    }
    return cfg;
}

// 1.-3.: the estimation rows (the last last_q queries) against every cell, the vertical and
// slash scores per KV head, and the selection of lines.
static ggml_tensor * loopserve_estimate_select(const llm_graph_context & g,
                                               ggml_tensor *             q,
                                               ggml_tensor *             k,
                                               ggml_tensor *             kq_mask,
                                               ggml_tensor *             q_cells,
                                               float                     kq_scale,
                                               float                     softcap,
                                               int                       cell_mod,
                                               int                       il) {
    const auto &   cfg       = g.loopserve_prefill;
    ggml_context * ctx0      = g.ctx0;
    const int64_t  n_tokens  = q->ne[1];
    const int64_t  n_head    = q->ne[2];
    const int64_t  n_head_kv = k->ne[2];
    // 1. estimation rows: the last n_est queries against every cell
    const int64_t  n_est     = std::min<int64_t>(std::max(cfg.last_q, 1), n_tokens);
    const int64_t  row0      = n_tokens - n_est;
    ggml_tensor *  qw =
        ggml_cont(ctx0, ggml_view_3d(ctx0, q, q->ne[0], n_est, n_head, q->nb[1], q->nb[2], row0 * q->nb[1]));
    ggml_format_name(qw, "loopserve_q_last-%d", il);

    ggml_tensor *               cw    = ggml_view_1d(ctx0, q_cells, n_est, row0 * q_cells->nb[0]);
    ggml_tensor *               vs    = nullptr;
    const ggml_backend_buffer_t k_buf = k->view_src ? k->view_src->buffer : k->buffer;
    const bool                  host  = k_buf && ggml_backend_buffer_is_host(k_buf);
    if (k->type == GGML_TYPE_F16 && k_buf && (host || k->ne[0] == 64 || k->ne[0] == 128 || k->ne[0] == 256)) {
        // fused: on the GPU the [n_kv, n_est, n_head] probabilities never go to memory; on the
        // CPU each K row is read once for all the estimation rows and query heads of its KV
        // head (2.2-2.6x faster than the chain below at 4K-8K); and where the mask is causal in
        // cells the ops do without it, so no layer may read it and the host neither fills nor
        // uploads it (n_kv x n_tokens: ~1 GiB per ubatch at 128K)
        ggml_tensor * mw       = kq_mask && !cfg.cell_causal ? ggml_view_2d(ctx0, kq_mask, kq_mask->ne[0], n_est,
                                                                            kq_mask->nb[1], row0 * kq_mask->nb[1]) :
                                                               nullptr;
        vs                     = ggml_loopserve_vs_estimate(ctx0, qw, k, mw, cw, kq_scale, softcap, cell_mod);
        // a GPU that cannot run the fused op takes the chain below on the device, with the
        // mask even where the ubatch is causal in cells (reading it makes the host fill it),
        // rather than the scheduler moving the op, and the whole of K, to the CPU: a consumer
        // GPU gives a block 99 KiB of shared memory, short of the op's at head dim 256 with a
        // mask and a GQA ratio of 1 or 2 (cuda/loopserve-estimate.cu); sm_75 lacks its mma
        ggml_backend_dev_t dev = host ? nullptr : ggml_backend_buft_get_device(ggml_backend_buffer_get_type(k_buf));
        if (dev != nullptr && !ggml_backend_dev_supports_op(dev, vs)) {
            vs = nullptr;
        } else if (cfg.cell_causal) {
            kq_mask = nullptr;
        }
    }
    if (vs == nullptr && !host) {
        cfg.st->est_chain_by_graph[g.res].insert(il);
    } else {
        cfg.st->est_chain_by_graph[g.res].erase(il);
    }
    if (vs == nullptr) {
        ggml_tensor * mw =
            kq_mask ? ggml_view_2d(ctx0, kq_mask, kq_mask->ne[0], n_est, kq_mask->nb[1], row0 * kq_mask->nb[1]) :
                      nullptr;
        ggml_tensor * kq = ggml_mul_mat(ctx0, k, qw);  // [n_kv, n_est, n_head]
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        float scale = kq_scale;
        if (softcap != 0.0f) {  // the order of ggml_flash_attn_ext
            kq    = ggml_scale(ctx0, kq, kq_scale / softcap);
            kq    = ggml_tanh(ctx0, kq);
            kq    = ggml_scale(ctx0, kq, softcap);
            scale = 1.0f;
        }
        ggml_tensor * p = ggml_soft_max_ext(ctx0, kq, mw, scale, 0.0f);
        vs              = ggml_loopserve_vs_scores(ctx0, p, cw, (int) n_head_kv, cell_mod);
    }
    ggml_format_name(vs, "loopserve_vs-%d", il);
    ggml_tensor * sel = ggml_loopserve_select(ctx0, vs, cfg.alpha, cfg.n_min_v, cfg.n_max_v, cfg.n_min_s, cfg.n_max_s,
                                              cfg.n_sink, cfg.n_local);
    ggml_format_name(sel, "loopserve_sel-%d", il);
    return sel;
}

// The layer's stored selection (reuse > 1), made on first use in a buffer of the device that
// holds the layer's K: room for the cache's cells (k's view source), I32.
static ggml_tensor * loopserve_sel_store(llama_loopserve_prefill_state * st,
                                         const ggml_tensor *             k,
                                         int64_t                         n_head_kv,
                                         int                             il) {
    const ggml_tensor *         src = k->view_src ? k->view_src : k;
    const ggml_backend_buffer_t buf = src->buffer;
    if (st == nullptr || buf == nullptr || il < 0) {
        return nullptr;
    }
    const int64_t n_cells = std::max(src->ne[1], k->ne[1]);
    if ((size_t) il >= st->sel_store.size()) {
        st->sel_store.resize(il + 1, nullptr);
    }
    ggml_tensor * t = st->sel_store[il];
    if (t != nullptr && t->ne[0] >= (n_cells + 1) * 2 * n_head_kv) {
        return t;
    }
    if (st->sel_ctx == nullptr) {
        const ggml_init_params ip = { LLAMA_MAX_LAYERS * 2 * ggml_tensor_overhead(), nullptr, true };
        st->sel_ctx               = ggml_init(ip);
    }
    t = ggml_new_tensor_1d(st->sel_ctx, GGML_TYPE_I32, (n_cells + 1) * 2 * n_head_kv);
    ggml_format_name(t, "loopserve_sel_store-%d", il);
    ggml_backend_buffer_t b = ggml_backend_buft_alloc_buffer(ggml_backend_buffer_get_type(buf), ggml_nbytes(t));
    GGML_ASSERT(b != nullptr);
    ggml_backend_tensor_alloc(b, t, ggml_backend_buffer_get_base(b));
    st->sel_bufs.push_back(b);
    st->sel_store[il] = t;
    return t;
}

// A [n1, 2, n_head_kv] selection inside the layer's store.
static ggml_tensor * loopserve_sel_view(ggml_context * ctx, ggml_tensor * store, int64_t n1, int64_t n_head_kv) {
    return ggml_view_3d(ctx, store, n1, 2, n_head_kv, n1 * sizeof(int32_t), 2 * n1 * sizeof(int32_t), 0);
}

ggml_tensor * llama_loopserve_prefill_attn(const llm_graph_context & g,
                                           ggml_tensor *             q,
                                           ggml_tensor *             k,
                                           ggml_tensor *             v,
                                           ggml_tensor *             kq_b,
                                           ggml_tensor *             kq_mask,
                                           ggml_tensor *             sinks,
                                           ggml_tensor *             v_mla,
                                           ggml_tensor *             q_cells,
                                           float                     kq_scale,
                                           int                       il) {
    llama_loopserve_save_queries_graph(g, q, kq_scale, il);
    if (ggml_tensor * hidden = llama_loopserve_hide_attn(g, q, k, v, kq_b, kq_mask, sinks, v_mla, kq_scale, il)) {
        return hidden;  // rows hidden per head (llama-loopserve-hide.cpp); no sparse prefill then
    }
    const auto & cfg = g.loopserve_prefill;
    const auto & hp  = g.hparams;
    const auto & cp  = g.cparams;
    if (!cfg.enabled || q_cells == nullptr || hp.is_swa(il) || kq_b || v_mla || sinks || hp.f_max_alibi_bias != 0.0f ||
        g.arch == LLM_ARCH_GROK || !cp.causal_attn || cp.training) {
        return nullptr;
    }
    // q [dk, n_tokens, n_head, n_stream], k/v [d, n_kv, n_head_kv, n_stream] (permuted views)
    const int64_t n_tokens = q->ne[1];
    if (q->ne[3] != 1 || k->ne[3] != 1 || n_tokens < std::max(cfg.n_min_tokens, 2) || q_cells->ne[0] != n_tokens ||
        (kq_mask && (kq_mask->ne[2] != 1 || kq_mask->ne[3] != 1))) {
        return nullptr;
    }

    ggml_context * ctx0      = g.ctx0;
    const int64_t  n_head    = q->ne[2];
    const int64_t  n_head_kv = k->ne[2];
    const int      cell_mod  = (int) cp.n_ctx_seq;
    const float    softcap   = hp.attn_soft_cap ? hp.f_attn_logit_softcapping : 0.0f;

    const int64_t n_kv  = k->ne[1];
    ggml_tensor * store = cfg.reuse > 1 ? loopserve_sel_store(cfg.st, k, n_head_kv, il) : nullptr;
    ggml_tensor * sel   = nullptr;
    if (cfg.sel_reuse && store != nullptr && cfg.sel_n_kv <= n_kv) {
        // the previous ubatch's selection: its columns are cells every row here sees, its
        // offsets apply to these rows as to that ubatch's. Copied out (a few MiB at 128K
        // cells) so that the profile has a node that marks where this layer's sparse work begins
        sel = ggml_cont(ctx0, loopserve_sel_view(ctx0, store, cfg.sel_n_kv + 1, n_head_kv));
        ggml_format_name(sel, "loopserve_q_last-%d", il);
        cfg.st->sel_by_graph[g.res] = { cfg.sel_n_kv, true };
    } else {
        sel = loopserve_estimate_select(g, q, k, kq_mask, q_cells, kq_scale, softcap, cell_mod, il);
        if (store != nullptr) {
            ggml_build_forward_expand(g.gf, ggml_cpy(ctx0, sel, loopserve_sel_view(ctx0, store, n_kv + 1, n_head_kv)));
            cfg.st->sel_by_graph[g.res] = { n_kv, false };
        }
    }
    if (cfg.cell_causal) {
        kq_mask = nullptr;  // as the estimation did: no layer reads it (below: the op without it)
    }

    // 2. attention over the selection; unless configured, a block's rows times the group's
    //    query heads fill one 64-row tile of the CUDA kernel (a diagonal costs ~block_q keys)
    const int block_q = cfg.block_q > 0 ? cfg.block_q : std::max<int>(16, (int) (64 / (n_head / n_head_kv)));
    // V stored transposed (no flash attention) is read as such
    if (v->nb[2] > v->nb[1]) {
        v = ggml_transpose(ctx0, v);
    }
    // causal in cells: the op needs no mask (the same numbers), and without one the CPU op
    // takes each chunk's visible keys as a prefix instead of reading a mask value per key
    ggml_tensor * out = ggml_loopserve_sparse_attn(ctx0, q, k, v, cfg.cell_causal ? nullptr : kq_mask, q_cells, sel,
                                                   kq_scale, softcap, block_q, cell_mod);
    ggml_format_name(out, "loopserve_attn-%d", il);
    if (!cp.offload_kqv) {
        ggml_backend_sched_set_tensor_backend(g.sched, out, g.backend_cpu);
    }

    // its last row: statistics, read back after the ubatch
    ggml_tensor * st = ggml_cont(ctx0, ggml_view_2d(ctx0, out, 2, n_head, out->nb[1], n_tokens * out->nb[2]));
    ggml_set_output(st);
    ggml_format_name(st, "loopserve_stats-%d", il);
    ggml_build_forward_expand(g.gf, st);
    g.res->loopserve_cell_causal = cfg.cell_causal;
    if (il >= 0 && il < (int) g.res->t_loopserve_prefill.size()) {
        g.res->t_loopserve_prefill[il] = st;
    }

    // the observation window's scores (the stock path computes them after its attention,
    // which this layer skips): without them a cut after a sparse prefill chose blindly
    if (g.loopserve_n_window > 0 && il >= 0 && il < (int) g.res->t_loopserve_scores.size()) {
        ggml_tensor * scores =
            llama_loopserve_scores_from_qk(ctx0, q, k, kq_mask, nullptr, kq_scale, 0.0f, softcap, g.loopserve_n_window);
        ggml_build_forward_expand(g.gf, scores);
        g.res->t_loopserve_scores[il] = scores;
    }

    ggml_tensor * cur = ggml_view_3d(ctx0, out, out->ne[0], n_head, n_tokens, out->nb[1], out->nb[2], 0);
    return ggml_reshape_2d(ctx0, cur, cur->ne[0] * n_head, n_tokens);
}

//
// context
//

static bool loopserve_prefill_eval_cb(ggml_tensor * t, bool ask, void * user_data) {
    auto *       st     = (llama_loopserve_prefill_state *) user_data;
    const char * name   = t->name;
    const bool   q_last = strncmp(name, "loopserve_q_last-", 17) == 0;
    const bool   vs     = strncmp(name, "loopserve_vs-", 13) == 0;
    const bool   sel    = strncmp(name, "loopserve_sel-", 14) == 0;
    const bool   attn   = strncmp(name, "loopserve_attn-", 15) == 0;
    if (ask) {
        return q_last || vs || sel || attn;
    }
    // the graph has been computed up to t and synchronized
    const int64_t now = ggml_time_us();
    if (vs) {
        st->t_estimate_us += now - st->t_mark_us;
    } else if (sel) {
        st->t_select_us += now - st->t_mark_us;
    } else if (attn) {
        st->t_attend_us += now - st->t_mark_us;
    }
    st->t_mark_us = now;
    return true;
}

void llama_loopserve_prefill_ubatch_begin(llama_context & lctx) {
    auto *               st    = lctx.loopserve_prefill.get();
    ggml_backend_sched_t sched = lctx.get_sched();
    if (st->profile) {
        ggml_backend_sched_set_eval_callback(sched, loopserve_prefill_eval_cb, st);
        st->profile_cb_set = true;
    } else if (st->profile_cb_set) {
        const auto & cp = lctx.get_cparams();
        ggml_backend_sched_set_eval_callback(sched, cp.cb_eval, cp.cb_eval_user_data);
        st->profile_cb_set = false;
    }
}

static void loopserve_prefill_fold_rows(llama_context & lctx);

void llama_loopserve_prefill_ubatch_end(llama_context &          lctx,
                                        const llama_ubatch &     ubatch,
                                        const llm_graph_result * res,
                                        int64_t                  t_start_us) {
    auto *       st     = lctx.loopserve_prefill.get();
    const auto & ts     = res->t_loopserve_prefill;
    bool         sparse = false;
    for (auto * t : ts) {
        sparse = sparse || t != nullptr;
    }
    if (!sparse) {
        if (st->cfg.enabled && ubatch.n_tokens > 1) {
            st->n_ubatch_stock++;
        }
        st->sel_age = 0;
        return;
    }
    // the stored selection: made by this ubatch (the next ones of its input may reuse it) or
    // reused by it
    const auto su = st->sel_by_graph.find(res);
    if (st->cfg.reuse > 1 && su != st->sel_by_graph.end() && ubatch.n_seqs_unq == 1) {
        st->n_ubatch_reused += su->second.reused;
        st->sel_age      = su->second.reused ? st->sel_age + 1 : 1;
        st->sel_n_kv     = su->second.n_kv;
        st->sel_seq      = ubatch.seq_id[0][0];
        st->sel_pos_next = ubatch.pos[ubatch.n_tokens - 1] + 1;
    } else {
        st->sel_age = 0;
    }
    // The statistics rows go to pinned memory asynchronously and are added up at the end of
    // the decode call: a sync here would keep the host from preparing the next ubatch (its
    // KQ mask grows with the cache: ~0.1 s per ubatch at 128K cells) while the device works.
    st->n_ubatch_sparse++;
    st->n_ubatch_cell_causal += res->loopserve_cell_causal;
    const auto ec = st->est_chain_by_graph.find(res);
    st->n_layer_est_chain += ec != st->est_chain_by_graph.end() ? (int32_t) ec->second.size() : 0;
    st->n_tokens_sparse += ubatch.n_tokens;
    if (st->t_first_us == 0) {
        st->t_first_us = t_start_us;
    }
    ggml_backend_sched_t sched = lctx.get_sched();
    size_t               need  = 0;
    for (auto * t : ts) {
        need += t ? ggml_nbytes(t) : 0;
    }
    if (st->pinned == nullptr || st->pinned_used + need > ggml_backend_buffer_get_size(st->pinned)) {
        loopserve_prefill_fold_rows(lctx);
        if (st->pinned == nullptr || need > ggml_backend_buffer_get_size(st->pinned)) {
            ggml_backend_buffer_free(st->pinned);
            ggml_tensor * t0 = nullptr;
            for (auto * t : ts) {
                t0 = t0 ? t0 : t;
            }
            ggml_backend_dev_t         dev  = ggml_backend_get_device(ggml_backend_sched_get_tensor_backend(sched, t0));
            ggml_backend_buffer_type_t buft = dev ? ggml_backend_dev_host_buffer_type(dev) : nullptr;
            // room for the ubatches of a long prompt before a fold
            st->pinned = ggml_backend_buft_alloc_buffer(buft ? buft : ggml_backend_cpu_buffer_type(), 64 * need);
            GGML_ASSERT(st->pinned != nullptr);
        }
    }
    char * base = (char *) ggml_backend_buffer_get_base(st->pinned);
    for (size_t il = 0; il < ts.size(); ++il) {
        ggml_tensor * t = ts[il];
        if (t == nullptr) {
            continue;
        }
        ggml_backend_tensor_get_async(ggml_backend_sched_get_tensor_backend(sched, t), t, base + st->pinned_used, 0,
                                      ggml_nbytes(t));
        st->pending.push_back({ (int32_t) il, st->pinned_used, ggml_nelements(t) });
        st->pinned_used += ggml_nbytes(t);
    }
    st->n_layer = std::max(st->n_layer, ts.size());
}

// the statistics rows so far (also in the middle of a decode call, when the pinned buffer is full)
static void loopserve_prefill_fold_rows(llama_context & lctx) {
    auto * st = lctx.loopserve_prefill.get();
    if (st == nullptr || (st->pending.empty() && st->t_first_us == 0)) {
        return;
    }
    ggml_backend_sched_synchronize(lctx.get_sched());
    if (st->computed.size() < st->n_layer) {
        st->computed.resize(st->n_layer, 0.0);
        st->causal.resize(st->n_layer, 0.0);
    }
    const char * base = st->pinned ? (const char *) ggml_backend_buffer_get_base(st->pinned) : nullptr;
    for (const auto & p : st->pending) {
        const float * x = (const float *) (base + p.offset);
        for (int64_t h = 0; h < p.n / 2; ++h) {
            st->computed[p.il] += x[2 * h + 0];
            st->causal[p.il] += x[2 * h + 1];
        }
    }
    st->pending.clear();
    st->pinned_used = 0;
    if (st->t_first_us != 0) {
        st->t_sparse_us += ggml_time_us() - st->t_first_us;
        st->t_first_us = 0;
    }
}

void llama_loopserve_prefill_fold(llama_context & lctx) {
    auto * st = lctx.loopserve_prefill.get();
    if (st == nullptr) {
        return;
    }
    loopserve_prefill_fold_rows(lctx);
    // a selection serves the ubatches of one decode call only: before the next, the cache
    // may have been cut or rewritten
    st->sel_age = 0;
}

llama_loopserve_prefill_state::~llama_loopserve_prefill_state() {
    ggml_backend_buffer_free(pinned);
    for (auto * b : sel_bufs) {
        ggml_backend_buffer_free(b);
    }
    if (sel_ctx != nullptr) {
        ggml_free(sel_ctx);
    }
}

//
// public API
//

struct llama_loopserve_prefill_params llama_loopserve_prefill_default_params(void) {
    const llama_loopserve_prefill_cfg c;
    llama_loopserve_prefill_params    p;
    p.alpha          = c.alpha;
    p.last_q         = c.last_q;
    p.n_min_vertical = c.n_min_v;
    p.n_max_vertical = c.n_max_v;
    p.n_min_slash    = c.n_min_s;
    p.n_max_slash    = c.n_max_s;
    p.n_sink         = c.n_sink;
    p.n_local        = c.n_local;
    p.n_min_tokens   = c.n_min_tokens;
    p.block_q        = c.block_q;
    p.reuse          = c.reuse;
    return p;
}

static bool loopserve_prefill_kv_type_ok(ggml_type t) {
    return t == GGML_TYPE_F16 || t == GGML_TYPE_Q8_0 || t == GGML_TYPE_F32;
}

int32_t llama_loopserve_prefill_set(llama_context * ctx, const llama_loopserve_prefill_params * params) {
    auto & st = ctx->loopserve_prefill;
    if (params == nullptr) {
        if (st && st->cfg.enabled) {
            st->cfg.enabled = false;
            ctx->loopserve_reserve_again();
        }
        return 0;
    }
    const auto & p = *params;
    if (!(p.alpha > 0.0f && p.alpha <= 1.0f) || p.last_q < 1 || p.block_q < 0 || p.n_sink < 0 || p.n_local < 0 ||
        p.n_min_vertical < 0 || p.n_min_slash < 0 || p.n_min_tokens < 0 || p.reuse < 1) {
        LLAMA_LOG_ERROR("%s: invalid sparse prefill parameters\n", __func__);
        return -1;
    }
    llama_memory_i * mem = ctx->get_memory();
    llama_kv_cache * kv  = dynamic_cast<llama_kv_cache *>(mem);
    if (kv == nullptr) {
        if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
            kv = iswa->get_base();
        }
    }
    if (kv == nullptr || llama_model_has_encoder(&ctx->get_model())) {
        LLAMA_LOG_ERROR("%s: sparse prefill needs a decoder-only model with a KV cache\n", __func__);
        return -1;
    }
    if (!loopserve_prefill_kv_type_ok(kv->type_k()) || !loopserve_prefill_kv_type_ok(kv->type_v())) {
        LLAMA_LOG_ERROR("%s: sparse prefill supports KV caches of type f16, q8_0 and f32, not %s/%s\n", __func__,
                        ggml_type_name(kv->type_k()), ggml_type_name(kv->type_v()));
        return -2;
    }
    if (!st) {
        st = std::make_unique<llama_loopserve_prefill_state>();
    }
    auto &                            c      = st->cfg;
    const llama_loopserve_prefill_cfg before = c;
    c.enabled                                = true;
    c.alpha                                  = p.alpha;
    c.last_q                                 = p.last_q;
    c.n_min_v                                = p.n_min_vertical;
    c.n_max_v                                = p.n_max_vertical;
    c.n_min_s                                = p.n_min_slash;
    c.n_max_s                                = p.n_max_slash;
    c.n_sink                                 = p.n_sink;
    c.n_local                                = p.n_local;
    c.n_min_tokens                           = p.n_min_tokens;
    c.block_q                                = p.block_q;
    c.reuse                                  = p.reuse;
    st->sel_age                              = 0;
    if (!(c == before)) {
        ctx->loopserve_reserve_again();
    }
    return 0;
}

int32_t llama_loopserve_prefill_set_profile(llama_context * ctx, bool profile) {
    auto & st = ctx->loopserve_prefill;
    if (!st) {
        return -1;
    }
    if (profile && ctx->get_cparams().cb_eval != nullptr) {
        LLAMA_LOG_ERROR("%s: the context already has an eval callback\n", __func__);
        return -1;
    }
    st->profile = profile;
    return 0;
}

void llama_loopserve_prefill_stats_reset(llama_context * ctx) {
    auto * st = ctx->loopserve_prefill.get();
    if (st == nullptr) {
        return;
    }
    llama_loopserve_prefill_fold(*ctx);
    st->n_ubatch_sparse      = 0;
    st->n_ubatch_stock       = 0;
    st->n_ubatch_cell_causal = 0;
    st->n_ubatch_reused      = 0;
    st->n_layer_est_chain    = 0;
    st->n_tokens_sparse      = 0;
    st->t_sparse_us          = 0;
    st->t_estimate_us        = 0;
    st->t_select_us          = 0;
    st->t_attend_us          = 0;
    std::fill(st->computed.begin(), st->computed.end(), 0.0);
    std::fill(st->causal.begin(), st->causal.end(), 0.0);
}

int32_t llama_loopserve_prefill_stats_get(llama_context * ctx, llama_loopserve_prefill_stats * out) {
    *out = {};
    llama_loopserve_prefill_fold(*ctx);
    const auto * st = ctx->loopserve_prefill.get();
    if (st == nullptr) {
        return 0;
    }
    out->n_ubatch_sparse      = st->n_ubatch_sparse;
    out->n_ubatch_stock       = st->n_ubatch_stock;
    out->n_ubatch_cell_causal = st->n_ubatch_cell_causal;
    out->n_ubatch_reused      = st->n_ubatch_reused;
    out->n_layer_est_chain    = st->n_layer_est_chain;
    out->n_tokens_sparse      = st->n_tokens_sparse;
    out->t_sparse_ms          = st->t_sparse_us / 1000.0;
    out->t_estimate_ms        = st->t_estimate_us / 1000.0;
    out->t_select_ms          = st->t_select_us / 1000.0;
    out->t_attend_ms          = st->t_attend_us / 1000.0;
    double c = 0.0, d = 0.0;
    for (size_t i = 0; i < st->computed.size(); ++i) {
        c += st->computed[i];
        d += st->causal[i];
    }
    out->density = d > 0.0 ? c / d : 0.0;
    return st->cfg.enabled ? 1 : 0;
}

int32_t llama_loopserve_prefill_layer_pairs(llama_context * ctx, double * computed, double * causal, int32_t n_max) {
    const int32_t n_layer = (int32_t) ctx->get_model().hparams.n_layer();
    llama_loopserve_prefill_fold(*ctx);
    const auto * st = ctx->loopserve_prefill.get();
    for (int32_t il = 0; il < std::min(n_layer, n_max); ++il) {
        const bool have = st && (size_t) il < st->computed.size();
        if (computed) {
            computed[il] = have ? st->computed[il] : 0.0;
        }
        if (causal) {
            causal[il] = have ? st->causal[il] : 0.0;
        }
    }
    return n_layer;
}
