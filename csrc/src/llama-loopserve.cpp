#include "llama-loopserve.h"

#include "ggml-backend.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-loopserve-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

// Written by the loopserve-edge build script, not by a patch: the hash covers the
// patches themselves.
#include "llama-loopserve-build.h"

#define LLAMA_LOOPSERVE_API_VERSION 9

int32_t llama_loopserve_api_version(void) {
    return LLAMA_LOOPSERVE_API_VERSION;
}

const char * llama_loopserve_patch_hash(void) {
    return LLAMA_LOOPSERVE_PATCH_HASH;
}

// The cache that holds every position of a sequence: the plain cache, or the
// non-sliding half of an interleaved one.
llama_kv_cache * loopserve_full_cache(llama_context * ctx) {
    llama_memory_i * mem = ctx->get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return nullptr;
}

int32_t llama_loopserve_set_batch_invariant(llama_context * ctx, bool on) {
    // the CPU backend's switch, through the registry as llama.cpp sets its threads: libllama
    // does not link the CPU backend's own symbols
    ggml_backend_sched_t sched = ctx->get_sched();
    int32_t              n     = 0;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
        ggml_backend_t     backend = ggml_backend_sched_get_backend(sched, i);
        ggml_backend_dev_t dev     = ggml_backend_get_device(backend);
        if (dev == nullptr || ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
            continue;
        }
        auto * set_use_ref = (void (*)(ggml_backend_t, bool)) ggml_backend_reg_get_proc_address(
            ggml_backend_dev_backend_reg(dev), "ggml_backend_cpu_set_use_ref");
        if (set_use_ref != nullptr) {
            set_use_ref(backend, on);
            n++;
        }
    }
    // LOOPSERVE_FA_ORDER=0 (read as the context is switched): without the cells' order, to
    // measure what it costs (benchmarks/results/serve/replay-s51/order_cost.py)
    const char * env   = getenv("LOOPSERVE_FA_ORDER");
    const bool   order = on && !(env != nullptr && strcmp(env, "0") == 0);
    if (llama_kv_cache * kv = loopserve_full_cache(ctx)) {
        kv->loopserve_append_only    = on;
        kv->loopserve_position_order = order;
    }
    // the sliding-window cache reuses cells in a ring: its rows read the cells' order instead
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(ctx->get_memory())) {
        iswa->get_swa()->loopserve_position_order = order;
    }
    // the graphs gain or lose the order's input: none is reused, the scheduler reserves again
    ctx->loopserve_graph_ran();
    ctx->loopserve_reserve_again();
    return n;
}

int32_t llama_loopserve_kv_tail(llama_context * ctx) {
    const llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (kv == nullptr) {
        return -1;
    }
    const auto & cells = kv->get_cells(0);
    return (int32_t) (cells.size() - cells.used_max_p1());
}

int32_t llama_loopserve_kv_n_kv(llama_context * ctx) {
    const llama_kv_cache * kv = loopserve_full_cache(ctx);
    return kv == nullptr ? -1 : (int32_t) kv->loopserve_n_kv_last;
}

int32_t llama_loopserve_seq_n_cells(llama_context * ctx, llama_seq_id seq_id) {
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (kv == nullptr || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return -1;
    }
    return (int32_t) kv->get_cells(seq_id).seq_pos_get(seq_id).size();
}

int64_t llama_loopserve_kv_bytes(llama_context * ctx) {
    const llama_memory_i * mem = ctx->get_memory();
    if (mem == nullptr) {
        return -1;
    }
    int64_t total = 0;
    for (const auto & [buft, size] : mem->memory_breakdown()) {
        total += (int64_t) size;
    }
    return total;
}

//
// observation-window scores
//

static llama_loopserve_scores_state * loopserve_scores(llama_context * ctx) {
    return ctx->loopserve_scores.get();
}

// The part of a ubatch's memory context that covers the full-attention layers.
const llama_kv_cache_context * loopserve_full_cache_context(const llama_memory_context_i * mctx) {
    if (auto * kvc = dynamic_cast<const llama_kv_cache_context *>(mctx)) {
        return kvc;
    }
    if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
        return iswa->get_base();
    }
    return nullptr;
}

// The mean of the probabilities in rows [row0, row0 + n_rows) of p ([n_kv, n_tokens, n_head])
// over those rows and over the query heads of each KV head: [n_kv, 1, n_head_kv]. The host
// multiplies by n_rows * n_gqa to get the sum.
static ggml_tensor * loopserve_reduce(ggml_context * ctx,
                                      ggml_tensor *  p,
                                      int64_t        row0,
                                      int64_t        n_rows,
                                      int64_t        n_head_kv) {
    const int64_t n_kv  = p->ne[0];
    const int64_t n_gqa = p->ne[2] / n_head_kv;
    GGML_ASSERT(p->type == GGML_TYPE_F32 && p->ne[3] == 1 && n_gqa * n_head_kv == p->ne[2]);

    if (n_rows < p->ne[1]) {
        // whole rows of n_kv: a cheap copy, unlike a transpose
        p = ggml_cont(ctx, ggml_view_3d(ctx, p, n_kv, n_rows, p->ne[2], p->nb[1], p->nb[2], row0 * p->nb[1]));
    }

    // ggml_mul_mat broadcasts KV head h to query heads [h*n_gqa, (h+1)*n_gqa), so in memory
    // the rows of one KV head's group follow each other: average them with one 2-d pool
    // along dim 1 (a single node, and no transpose of the [n_kv, ...] probabilities)
    ggml_tensor * s   = nullptr;
    const char *  env = std::getenv("LOOPSERVE_GQA_MAX");
    if (n_gqa > 1 && env != nullptr && std::strcmp(env, "1") == 0) {
        // an ablation (benchmarks/results/gqa-max-dev/, read at every graph): the mean over the
        // rows of each query head, then the group's maximum, so that a cell one query head of
        // the group needs counts as much as one they all need (the host's factor stays)
        ggml_tensor * m = ggml_pool_2d(ctx, p, GGML_OP_POOL_AVG, 1, (int) n_rows, 1, (int) n_rows, 0, 0);
        m               = ggml_reshape_3d(ctx, m, n_kv, n_gqa, n_head_kv);
        s               = ggml_pool_2d(ctx, m, GGML_OP_POOL_MAX, 1, (int) n_gqa, 1, (int) n_gqa, 0, 0);
    } else if (n_gqa > 1 && env != nullptr && std::strcmp(env, "2") == 0) {
        // the same, the group's maximum taken row by row, then the mean over the rows (what a
        // row adds does not depend on the rows it is reduced with)
        ggml_tensor * m = ggml_reshape_4d(ctx, p, n_kv, n_rows, n_gqa, n_head_kv);
        m               = ggml_cont(ctx, ggml_permute(ctx, m, 0, 2, 1, 3));  // [n_kv, n_gqa, n_rows, n_head_kv]
        m               = ggml_reshape_3d(ctx, m, n_kv, n_gqa, n_rows * n_head_kv);
        m               = ggml_pool_2d(ctx, m, GGML_OP_POOL_MAX, 1, (int) n_gqa, 1, (int) n_gqa, 0, 0);
        m               = ggml_reshape_3d(ctx, m, n_kv, n_rows, n_head_kv);
        s               = ggml_pool_2d(ctx, m, GGML_OP_POOL_AVG, 1, (int) n_rows, 1, (int) n_rows, 0, 0);
    } else {
        const int r = (int) (n_rows * n_gqa);
        p           = ggml_reshape_3d(ctx, p, n_kv, r, n_head_kv);
        s           = ggml_pool_2d(ctx, p, GGML_OP_POOL_AVG, 1, r, 1, r, 0, 0);
    }

    // read back after the ubatch; the allocator must not reuse its memory before that
    ggml_set_output(s);
    ggml_set_name(s, "loopserve_scores");
    return s;
}

bool loopserve_trace_cuts() {
    static const bool on = std::getenv("LOOPSERVE_TRACE_CUTS") != nullptr;
    return on;
}

// Accumulators are head-major ([n_head_total][n_cells] per stream), so that adding a
// layer's [n_head_kv][n_kv] scores is a contiguous loop; per-cell access is strided.
static float & loopserve_acc(llama_loopserve_scores_state & st, uint32_t strm, int32_t h, uint32_t cell) {
    return st.acc[strm][(size_t) h * st.n_cells + cell];
}

llama_loopserve_scores_state::~llama_loopserve_scores_state() {
    if (staging_pinned != nullptr) {
        ggml_backend_buffer_free(staging_pinned);
    }
    loopserve_saved_free(*this);
}

static float * loopserve_staging(llama_loopserve_scores_state & st, ggml_backend_t backend, size_t n_floats) {
    const size_t size = n_floats * sizeof(float);
    if (st.staging_pinned != nullptr && ggml_backend_buffer_get_size(st.staging_pinned) < size) {
        ggml_backend_buffer_free(st.staging_pinned);
        st.staging_pinned = nullptr;
    }
    if (st.staging_pinned == nullptr && !st.no_pinned) {
        ggml_backend_dev_t         dev  = ggml_backend_get_device(backend);
        ggml_backend_buffer_type_t buft = dev ? ggml_backend_dev_host_buffer_type(dev) : nullptr;
        st.staging_pinned               = buft ? ggml_backend_buft_alloc_buffer(buft, size + size / 2) : nullptr;
        st.no_pinned = st.staging_pinned == nullptr;  // e.g. the CPU backend: plain memory is host memory
    }
    if (st.staging_pinned != nullptr) {
        return (float *) ggml_backend_buffer_get_base(st.staging_pinned);
    }
    st.staging.resize(n_floats);
    return st.staging.data();
}

// The cells of seq_id in increasing position order.
std::vector<uint32_t> loopserve_seq_cells(const llama_kv_cache * kv, llama_seq_id seq_id) {
    std::vector<uint32_t> cells;
    const auto &          sp = kv->get_cells(seq_id).seq_pos_get(seq_id);
    cells.reserve(sp.size());
    for (const auto & pc : sp) {
        cells.push_back(pc.second);
    }
    return cells;
}

static void loopserve_zero_cell(llama_loopserve_scores_state & st, uint32_t strm, uint32_t cell) {
    for (int32_t h = 0; h < st.n_head_total; ++h) {
        loopserve_acc(st, strm, h, cell) = 0.0f;
    }
}

ggml_tensor * llama_loopserve_scores_from_probs(ggml_context * ctx,
                                                ggml_tensor *  kq_soft_max,
                                                int64_t        n_head_kv,
                                                int32_t        n_window) {
    const int64_t n_tokens = kq_soft_max->ne[1];
    const int64_t n_rows   = std::min<int64_t>(n_window, n_tokens);
    return loopserve_reduce(ctx, kq_soft_max, n_tokens - n_rows, n_rows, n_head_kv);
}

ggml_tensor * llama_loopserve_scores_from_qk(ggml_context * ctx,
                                             ggml_tensor *  q,
                                             ggml_tensor *  k,
                                             ggml_tensor *  kq_mask,
                                             ggml_tensor *  sinks,
                                             float          kq_scale,
                                             float          max_bias,
                                             float          softcap,
                                             int32_t        n_window) {
    const int64_t n_tokens = q->ne[1];
    const int64_t n_rows   = std::min<int64_t>(n_window, n_tokens);
    const int64_t row0     = n_tokens - n_rows;

    // q arrives permuted; a contiguous copy of the few window rows keeps the product on
    // the plain mul_mat path of every backend
    ggml_tensor * qw =
        ggml_view_4d(ctx, q, q->ne[0], n_rows, q->ne[2], q->ne[3], q->nb[1], q->nb[2], q->nb[3], row0 * q->nb[1]);
    qw = ggml_cont(ctx, qw);

    ggml_tensor * mask = nullptr;
    if (kq_mask) {
        GGML_ASSERT(kq_mask->ne[2] == 1 && kq_mask->ne[3] == 1);
        mask = ggml_view_2d(ctx, kq_mask, kq_mask->ne[0], n_rows, kq_mask->nb[1], row0 * kq_mask->nb[1]);
    }
    ggml_tensor * kq = loopserve_probs_from_qk(ctx, qw, k, mask, sinks, kq_scale, max_bias, softcap);
    return loopserve_reduce(ctx, kq, 0, n_rows, k->ne[2]);
}

ggml_tensor * loopserve_probs_from_qk(ggml_context * ctx,
                                      ggml_tensor *  qw,
                                      ggml_tensor *  k,
                                      ggml_tensor *  mask,
                                      ggml_tensor *  sinks,
                                      float          kq_scale,
                                      float          max_bias,
                                      float          softcap) {
    ggml_tensor * kq = ggml_mul_mat(ctx, k, qw);  // [n_kv, n_rows, n_head]
    ggml_prec_set_acc(kq, GGML_PREC_F32);

    // the order of ggml_flash_attn_ext: softcap * tanh(scale * qk / softcap), then the mask
    float scale = kq_scale;
    if (softcap != 0.0f) {
        kq    = ggml_scale(ctx, kq, kq_scale / softcap);
        kq    = ggml_tanh(ctx, kq);
        kq    = ggml_scale(ctx, kq, softcap);
        scale = 1.0f;
    }

    kq = ggml_soft_max_ext(ctx, kq, mask, scale, max_bias);
    ggml_soft_max_add_sinks(kq, sinks);
    return kq;
}

void llama_loopserve_ubatch_begin(llama_context & lctx, const llama_ubatch & ubatch, uint32_t n_tokens_all) {
    auto * st       = lctx.loopserve_scores.get();
    st->n_window_ub = 0;
    if (st->n_window <= 0 || !ubatch.data || ubatch.data->batch_idxs.size() != ubatch.n_tokens) {
        return;
    }
    const auto & idxs = ubatch.data->batch_idxs;
    if (ubatch.n_seqs_unq != 1) {
        // several sequences (one token each of several dialogues, decoded together): scored only
        // when the ubatch keeps batch order, so that the window is still a suffix of it; each
        // row attends to its own sequence's cells only, so the sums stay apart
        for (uint32_t i = 1; i < ubatch.n_tokens; ++i) {
            if (idxs[i] != idxs[i - 1] + 1) {
                return;
            }
        }
    }
    // the window is the batch's last n_window tokens; with one sequence per ubatch the
    // ubatches keep batch order, so the window is a suffix of the ubatch
    const int64_t first = (int64_t) n_tokens_all - st->n_window;
    int32_t       n     = 0;
    for (int64_t i = (int64_t) ubatch.n_tokens - 1; i >= 0 && idxs[i] >= first; --i) {
        n++;
    }
    st->n_window_ub = n;
    if (n > 0 && st->saved_ok && n <= st->saved_max) {
        // saved queries: the rows are scored later, all at once (llama-loopserve-saved-queries.cpp)
        if ((int32_t) st->saved_seq.size() + n > st->saved_max) {
            llama_loopserve_scores_flush(&lctx);
        }
        st->n_window_ub = -n;
    }
}

void loopserve_add_scores(llama_context &                    lctx,
                          const std::vector<ggml_tensor *> & t,
                          int64_t                            n_kv,
                          int32_t                            n_rows,
                          uint32_t                           strm) {
    auto *               st    = lctx.loopserve_scores.get();
    ggml_backend_sched_t sched = lctx.get_sched();

    float * staging = nullptr;
    for (size_t il = 0; il < st->layer_off.size(); ++il) {
        if (st->layer_off[il] < 0 || il >= t.size() || t[il] == nullptr) {
            continue;
        }
        GGML_ASSERT(t[il]->ne[0] == n_kv && ggml_nelements(t[il]) == n_kv * st->layer_n_head_kv[il]);
        ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(sched, t[il]);
        if (staging == nullptr) {
            staging = loopserve_staging(*st, backend, (size_t) n_kv * st->n_head_total);
        }
        ggml_backend_tensor_get_async(backend, t[il], staging + (size_t) n_kv * st->layer_off[il], 0,
                                      ggml_nbytes(t[il]));
    }
    ggml_backend_sched_synchronize(sched);

    // the graph gives means over the rows and the group's query heads; add sums
    auto &        acc     = st->acc[strm];
    const int64_t n_cells = st->n_cells;
    for (size_t il = 0; il < st->layer_off.size(); ++il) {
        if (st->layer_off[il] < 0 || il >= t.size() || t[il] == nullptr) {
            continue;
        }
        const float f = (float) n_rows * st->layer_n_gqa[il];
        for (int32_t h = st->layer_off[il]; h < st->layer_off[il] + st->layer_n_head_kv[il]; ++h) {
            const float * src = staging + (size_t) h * n_kv;
            float *       dst = acc.data() + (size_t) h * n_cells;
            for (int64_t c = 0; c < n_kv; ++c) {
                dst[c] += f * src[c];
            }
        }
    }
}

void llama_loopserve_ubatch_end(llama_context &                lctx,
                                const llama_ubatch &           ubatch,
                                const llm_graph_result *       res,
                                const llama_memory_context_i * mctx) {
    auto *        st     = lctx.loopserve_scores.get();
    const int32_t n_win  = st->n_window_ub;
    const int32_t n_rows = std::abs(n_win);
    st->n_window_ub      = 0;

    const llama_kv_cache_context * kvc = loopserve_full_cache_context(mctx);
    if (kvc == nullptr) {
        return;
    }

    // the cells this ubatch filled hold new tokens: nothing of what they scored before
    // belongs to them, whether or not this ubatch is scored
    const auto & sinfo = kvc->loopserve_sinfo();
    for (size_t s = 0; s < sinfo.n_stream(); ++s) {
        for (uint32_t idx : sinfo.idxs[s]) {
            loopserve_zero_cell(*st, sinfo.strm[s], idx);
            llama_loopserve_unhide_cell(*st, sinfo.strm[s], idx);
        }
    }

    if (n_rows == 0) {
        return;
    }
    GGML_ASSERT(sinfo.n_stream() == 1);

    if (n_win < 0) {
        // the graph saved the rows' queries in the next slots: record whose they are
        for (uint32_t i = ubatch.n_tokens - (uint32_t) n_rows; i < ubatch.n_tokens; ++i) {
            st->saved_seq.push_back(ubatch.seq_id[i][0]);
            st->saved_pos.push_back(ubatch.pos[i]);
        }
    } else {
        loopserve_add_scores(lctx, res->t_loopserve_scores, kvc->get_n_kv(), n_rows, sinfo.strm[0]);
    }

    for (uint32_t i = ubatch.n_tokens - (uint32_t) n_rows; i < ubatch.n_tokens; ++i) {
        st->n_rows[ubatch.seq_id[i][0]] += 1;  // the rows' own sequences
    }
}

void llama_loopserve_scores_moved(llama_context &               lctx,
                                  llama_seq_id                  seq_id,
                                  const std::vector<uint32_t> & head_src,
                                  const std::vector<uint32_t> & dst,
                                  const std::vector<uint32_t> & freed) {
    auto *           st = lctx.loopserve_scores.get();
    llama_kv_cache * kv = loopserve_full_cache(&lctx);
    if (st == nullptr || kv == nullptr || st->acc.empty()) {
        return;
    }
    const uint32_t strm = kv->get_stream(seq_id);
    GGML_ASSERT(head_src.size() == (size_t) st->n_head_total * dst.size());
    // each head's row gathered before any of it is written: a destination may be a later
    // source of the same head
    const size_t       n = dst.size();
    std::vector<float> moved(n);
    for (int32_t h = 0; h < st->n_head_total; ++h) {
        float *          row = &loopserve_acc(*st, strm, h, 0);
        const uint32_t * src = head_src.data() + (size_t) h * n;
        for (size_t j = 0; j < n; ++j) {
            moved[j] = row[src[j]];
        }
        for (size_t j = 0; j < n; ++j) {
            row[dst[j]] = moved[j];
        }
    }
    // the freed cells' scores, head by head (cell by cell is a stride of n_cells per write: ~10 ms
    // for the ~14K cells freed by the first cut of a 16K-token input at the 1B shape)
    for (int32_t h = 0; h < st->n_head_total; ++h) {
        float * row = &loopserve_acc(*st, strm, h, 0);
        for (uint32_t c : freed) {
            row[c] = 0.0f;
        }
    }
}

void llama_loopserve_state_loaded(llama_context & lctx, llama_seq_id seq_id) {
    // a restored cell may have held anything before; its scores start over, and none of its
    // rows stays hidden (the controller hides them again from its state file)
    llama_loopserve_scores_reset(&lctx, seq_id);
    llama_loopserve_seq_hide(&lctx, seq_id, nullptr, 0, 0);
}

int32_t llama_loopserve_scores_set(llama_context * ctx, int32_t n_window) {
    llama_kv_cache *    kv    = loopserve_full_cache(ctx);
    const llama_model & model = ctx->get_model();
    if (n_window < 0 || kv == nullptr || llama_model_has_encoder(&model)) {
        return -1;
    }
    auto & st = ctx->loopserve_scores;
    if (!st && n_window > 0) {
        st                    = std::make_unique<llama_loopserve_scores_state>();
        const auto &  hparams = model.hparams;
        const int32_t n_layer = (int32_t) hparams.n_layer();
        st->layer_off.assign(n_layer, -1);
        st->layer_n_head_kv.assign(n_layer, 0);
        st->layer_n_gqa.assign(n_layer, 0);
        for (int32_t il = 0; il < n_layer; ++il) {
            if (!hparams.is_swa(il) && hparams.n_head_kv(il) > 0) {
                st->layer_off[il]       = st->n_head_total;
                st->layer_n_head_kv[il] = (int32_t) hparams.n_head_kv(il);
                st->layer_n_gqa[il]     = (int32_t) (hparams.n_head(il) / hparams.n_head_kv(il));
                st->n_head_total += (int32_t) hparams.n_head_kv(il);
            }
        }
        st->n_cells = kv->get_size();
        st->acc.assign(kv->get_n_stream(), std::vector<float>((size_t) st->n_cells * st->n_head_total, 0.0f));
        st->n_rows.assign(kv->get_n_seq_max(), 0);
    }
    if (st) {
        st->n_window = n_window;
    }
    return 0;
}

int32_t llama_loopserve_scores_window(llama_context * ctx) {
    const auto * st = loopserve_scores(ctx);
    return st ? st->n_window : 0;
}

bool loopserve_scores_made(llama_context * ctx) {
    if (!ctx->loopserve_scores) {
        const int32_t w = llama_loopserve_scores_window(ctx);
        if (llama_loopserve_scores_set(ctx, 1) != 0) {
            return false;
        }
        llama_loopserve_scores_set(ctx, w);
    }
    return true;
}

void llama_loopserve_scores_reset(llama_context * ctx, llama_seq_id seq_id) {
    auto *           st = loopserve_scores(ctx);
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (st == nullptr || kv == nullptr) {
        return;
    }
    llama_loopserve_saved_drop(ctx, seq_id);
    if (seq_id < 0) {
        for (auto & acc : st->acc) {
            std::fill(acc.begin(), acc.end(), 0.0f);
        }
        std::fill(st->n_rows.begin(), st->n_rows.end(), 0);
        return;
    }
    if ((uint32_t) seq_id >= kv->get_n_seq_max()) {
        return;
    }
    // head by head: each accumulator row is contiguous, a cell's heads are n_cells apart
    const uint32_t              strm  = kv->get_stream(seq_id);
    const std::vector<uint32_t> cells = loopserve_seq_cells(kv, seq_id);
    for (int32_t h = 0; h < st->n_head_total; ++h) {
        float * row = &loopserve_acc(*st, strm, h, 0);
        for (uint32_t c : cells) {
            row[c] = 0.0f;
        }
    }
    st->n_rows[seq_id] = 0;
}

int64_t llama_loopserve_scores_n_rows(llama_context * ctx, llama_seq_id seq_id) {
    const auto * st = loopserve_scores(ctx);
    if (st == nullptr || seq_id < 0 || (size_t) seq_id >= st->n_rows.size()) {
        return 0;
    }
    return st->n_rows[seq_id];
}

int32_t llama_loopserve_scores_get(llama_context * ctx,
                                   llama_seq_id    seq_id,
                                   llama_pos *     pos,
                                   float *         scores,
                                   int32_t         n_max) {
    llama_loopserve_scores_flush(ctx);  // saved rows count as scored
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (kv == nullptr || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return -1;
    }
    auto *        st = loopserve_scores(ctx);
    const auto &  sp = kv->get_cells(seq_id).seq_pos_get(seq_id);
    const int32_t n  = (int32_t) sp.size();
    const int32_t m  = std::min(n, n_max);
    if (pos) {
        int32_t i = 0;
        for (auto it = sp.begin(); i < m; ++it, ++i) {
            pos[i] = it->first;
        }
    }
    if (scores && m > 0) {
        std::fill(scores, scores + m, 0.0f);
        if (st) {
            const uint32_t              strm  = kv->get_stream(seq_id);
            const std::vector<uint32_t> cells = loopserve_seq_cells(kv, seq_id);
            for (int32_t h = 0; h < st->n_head_total; ++h) {
                const float * row = &loopserve_acc(*st, strm, h, 0);
                for (int32_t i = 0; i < m; ++i) {
                    scores[i] += row[cells[i]];
                }
            }
        }
    }
    return n;
}

int32_t llama_loopserve_scores_n_head_kv(llama_context * ctx, int32_t il) {
    const auto & hparams = ctx->get_model().hparams;
    if (il < 0 || il >= (int32_t) hparams.n_layer() || hparams.is_swa(il)) {
        return 0;
    }
    return (int32_t) hparams.n_head_kv(il);
}

int32_t llama_loopserve_scores_get_layer(llama_context * ctx,
                                         llama_seq_id    seq_id,
                                         int32_t         il,
                                         float *         scores,
                                         int32_t         n_max) {
    llama_loopserve_scores_flush(ctx);  // saved rows count as scored
    llama_kv_cache * kv        = loopserve_full_cache(ctx);
    const int32_t    n_head_kv = llama_loopserve_scores_n_head_kv(ctx, il);
    if (kv == nullptr || n_head_kv == 0 || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return -1;
    }
    const auto &  cells = kv->get_cells(seq_id).seq_pos_get(seq_id);
    const int32_t n     = (int32_t) cells.size();
    if (scores == nullptr || n > n_max) {
        return n;
    }
    auto * st = loopserve_scores(ctx);
    if (st == nullptr) {
        std::fill(scores, scores + (size_t) n_head_kv * n, 0.0f);
        return n;
    }
    const uint32_t              strm = kv->get_stream(seq_id);
    const std::vector<uint32_t> idx  = loopserve_seq_cells(kv, seq_id);
    for (int32_t h = 0; h < n_head_kv; ++h) {
        const float * row = &loopserve_acc(*st, strm, st->layer_off[il] + h, 0);
        float *       out = scores + (size_t) h * n;
        for (int32_t i = 0; i < n; ++i) {
            out[i] = row[idx[i]];
        }
    }
    return n;
}

int32_t llama_loopserve_scores_set_heads(llama_context * ctx,
                                         llama_seq_id    seq_id,
                                         const float *   scores,
                                         int64_t         n,
                                         int64_t         n_rows) {
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (kv == nullptr || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max() || n_rows < 0) {
        return -1;
    }
    if (!loopserve_scores_made(ctx)) {  // scores from a state file, in a context that has not scored
        return -1;
    }
    auto *                      st  = loopserve_scores(ctx);
    const std::vector<uint32_t> idx = loopserve_seq_cells(kv, seq_id);
    if (scores == nullptr || n != (int64_t) idx.size()) {
        return -1;
    }
    const uint32_t strm = kv->get_stream(seq_id);
    for (int32_t h = 0; h < st->n_head_total; ++h) {
        float *       row = &loopserve_acc(*st, strm, h, 0);
        const float * src = scores + (size_t) h * n;
        for (int64_t i = 0; i < n; ++i) {
            row[idx[i]] = src[i];
        }
    }
    st->n_rows[seq_id] = n_rows;
    return (int32_t) n;
}

int32_t llama_loopserve_scores_get_heads(llama_context * ctx, llama_seq_id seq_id, float * scores, int64_t n_max) {
    llama_loopserve_scores_flush(ctx);  // saved rows count as scored
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (kv == nullptr || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return -1;
    }
    const auto & hparams = ctx->get_model().hparams;
    int64_t      n_heads = 0;
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        n_heads += llama_loopserve_scores_n_head_kv(ctx, (int32_t) il);
    }
    const std::vector<uint32_t> idx = loopserve_seq_cells(kv, seq_id);
    const int32_t               n   = (int32_t) idx.size();
    if (scores == nullptr || n_heads * n > n_max) {
        return n;
    }
    auto * st = loopserve_scores(ctx);
    if (st == nullptr) {
        std::fill(scores, scores + n_heads * n, 0.0f);
        return n;
    }
    // scored heads are numbered in layer order, as the rows of the output
    const uint32_t strm = kv->get_stream(seq_id);
    for (int32_t h = 0; h < st->n_head_total; ++h) {
        const float * row = &loopserve_acc(*st, strm, h, 0);
        float *       out = scores + (size_t) h * n;
        for (int32_t i = 0; i < n; ++i) {
            out[i] = row[idx[i]];
        }
    }
    return n;
}
