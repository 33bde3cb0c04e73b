// Saved queries: the observation window's rows scored when the scores are read, not as they
// are decoded.
//
// With flash attention the probabilities never exist in the decode graph, so a scored decode
// recomputes its row's Q K^T and softmax beside the attention (llama_loopserve_scores_from_qk),
// then copies every layer's [n_head_kv, n_kv] scores to the host and synchronizes. For a
// one-token decode that is a handful of small nodes per layer and a round trip per step, about
// half a plain step on the GPU (benchmarks/results/scored-step.md of loopserve-edge). LoopServe
// scores the first 32 tokens of each turn past the budget and a few before each periodic cut,
// and uses the sums only at the cut. So a scored decode here only copies its row of each
// layer's Q into a buffer beside the layer's K (one set_rows node per layer, no read-back), and
// the flush scores every saved row in one graph against the cache: row r sees the cells of its
// own sequence at positions up to its own, which is what it attended to as long as no cell of
// that sequence was removed or moved in between (every such operation of ours flushes first).

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-kv-cache.h"
#include "llama-loopserve-impl.h"
#include "llama-loopserve-prefill.h"
#include "llama-loopserve.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <vector>

void loopserve_saved_free(llama_loopserve_scores_state & st) {
    for (auto * b : st.saved_buf) {
        ggml_backend_buffer_free(b);
    }
    for (auto * c : st.saved_ctx) {
        ggml_free(c);
    }
    st.saved_buf.clear();
    st.saved_ctx.clear();
    st.saved_q.clear();
    st.saved_scale.clear();
    st.saved_seq.clear();
    st.saved_pos.clear();
    st.saved_max = 0;
    st.saved_ok  = false;
}

void llama_loopserve_saved_drop(llama_context * ctx, llama_seq_id seq_id) {
    auto * st     = ctx->loopserve_scores.get();
    bool   others = false;
    for (llama_seq_id s : st->saved_seq) {
        others = others || (seq_id >= 0 && s != seq_id);
    }
    if (others) {
        // the other sequences' rows stay: score every row now (the caller then zeroes seq_id's
        // cells, which removes what its own rows added)
        llama_loopserve_scores_flush(ctx);
    }
    st->saved_seq.clear();
    st->saved_pos.clear();
}

int32_t llama_loopserve_scores_save_queries(llama_context * ctx, int32_t n_max) {
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (n_max < 0 || kv == nullptr) {
        return -1;
    }
    if (!loopserve_scores_made(ctx)) {  // the accumulators' state holds the queries
        return -1;
    }
    auto * st = ctx->loopserve_scores.get();
    llama_loopserve_scores_flush(ctx);
    loopserve_saved_free(*st);
    if (n_max == 0) {
        return 0;
    }

    const llama_model & model = ctx->get_model();
    const auto &        hp    = model.hparams;
    bool                ok    = ctx->get_cparams().flash_attn && kv->get_n_stream() == 1 && hp.f_max_alibi_bias == 0.0f;
    for (uint32_t il = 0; il < hp.n_layer() && ok; ++il) {
        ok = model.layers[il].attn_sinks == nullptr;
    }
    if (!ok) {
        return 0;  // the decodes score their rows as they run
    }

    // one context and buffer per buffer type of the scored layers' K
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctxs;
    st->saved_q.assign(hp.n_layer(), nullptr);
    st->saved_scale.assign(hp.n_layer(), NAN);
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        if (st->layer_off[il] < 0) {
            continue;
        }
        ggml_tensor *              k    = kv->get_k_storage((int32_t) il);
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(k->buffer);
        auto                       it   = ctxs.find(buft);
        if (it == ctxs.end()) {
            ggml_init_params params = {
                /*.mem_size   =*/hp.n_layer() * ggml_tensor_overhead(),
                /*.mem_buffer =*/nullptr,
                /*.no_alloc   =*/true,
            };
            it = ctxs.emplace(buft, ggml_init(params)).first;
            st->saved_ctx.push_back(it->second);
        }
        st->saved_q[il] = ggml_new_tensor_3d(it->second, GGML_TYPE_F32, hp.n_embd_head_k(il), n_max, hp.n_head(il));
        ggml_format_name(st->saved_q[il], "loopserve_saved_q-%u", il);
    }
    for (auto & [buft, c] : ctxs) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c, buft);
        if (buf == nullptr) {
            loopserve_saved_free(*st);
            return -1;
        }
        st->saved_buf.push_back(buf);
    }
    st->saved_max = n_max;
    st->saved_ok  = true;
    return 0;
}

int32_t llama_loopserve_scores_n_saved(llama_context * ctx) {
    const auto * st = ctx->loopserve_scores.get();
    return st ? (int32_t) st->saved_seq.size() : 0;
}

// Whether every scored layer's saved rows (and K, beside them) are in host memory: the CPU
// backend computes them.
static bool loopserve_saved_on_host(const llama_loopserve_scores_state & st) {
    for (size_t il = 0; il < st.saved_q.size(); ++il) {
        if (st.saved_q[il] != nullptr && !ggml_backend_buffer_is_host(st.saved_q[il]->buffer)) {
            return false;
        }
    }
    return true;
}

// The flush with batch-invariant attention on the CPU (llama_loopserve_set_batch_invariant):
// what it adds to a dialogue's scores depends on nothing but the dialogue, as its logits do.
// The flush below scores every saved row against all the cells in view, so the softmax's sums
// follow where a sequence's visible cells fall among the vector lanes (its cells' place in the
// pool), and it adds the mean of whatever rows it holds, scaled back (other dialogues' rows,
// or part of this one's when another dialogue's removal flushed in between). Here each
// sequence's rows are scored against its own cells only, gathered in position order, and each
// row is added to the sums on its own, in the order the rows were saved. A dialogue's scores
// were up to ~2e-6 apart between a busy server and one client, enough to flip a near-tie
// at a cut's boundary (benchmarks/results/serve/replay-s50 of loopserve-edge).
static int32_t loopserve_flush_by_sequence(llama_context *                ctx,
                                           llama_loopserve_scores_state * st,
                                           llama_kv_cache *               kv) {
    const auto &           hp      = ctx->get_model().hparams;
    const llama_kv_cells & cells   = kv->get_cells(0);
    const int32_t          n_all   = (int32_t) st->saved_seq.size();
    const float            softcap = hp.attn_soft_cap ? hp.f_attn_logit_softcapping : 0.0f;
    const int64_t          t0      = ggml_time_us();
    ggml_backend_sched_t   sched   = ctx->get_sched();
    ggml_backend_sched_synchronize(sched);

    // the sequences in the order of their first row, each with its rows (saved order)
    std::vector<llama_seq_id>         seqs;
    std::vector<std::vector<int32_t>> rows;
    for (int32_t r = 0; r < n_all; ++r) {
        const size_t g = std::find(seqs.begin(), seqs.end(), st->saved_seq[r]) - seqs.begin();
        if (g == seqs.size()) {
            seqs.push_back(st->saved_seq[r]);
            rows.emplace_back();
        }
        rows[g].push_back(r);
    }

    int32_t            result = n_all;
    auto &             acc    = st->acc[0];
    std::vector<float> sum, tmp;
    for (size_t g = 0; g < seqs.size() && result > 0; ++g) {
        // the sequence's cells in position order, its rows' slots (get_rows takes a list per
        // head) and which cells each row saw
        const std::vector<uint32_t> sc    = loopserve_seq_cells(kv, seqs[g]);
        const int64_t               n_vis = (int64_t) sc.size();
        const int64_t               m     = (int64_t) rows[g].size();
        if (n_vis == 0) {
            continue;
        }
        // at least two rows in the product: the CPU backend takes llamafile's sgemm from two
        // columns on and its vec_dot for one, which round differently (a row flushed alone, as
        // another dialogue's removal does, would not add what it adds among others); a second
        // copy of the row is computed and not added
        const int64_t        m_eff = std::max<int64_t>(m, 2);
        // and the cells padded to a multiple of 64 (masked): the softmax takes its exponentials
        // in vectors from the row's start and the last few one by one, which round differently,
        // so the row's length must not decide which cells those are (a row flushed early, when
        // its dialogue held fewer cells, would add other values); the product then also stays on
        // one path (sgemm wants the rows a multiple of 4)
        const int64_t        n_pad = (n_vis + 63) / 64 * 64;
        std::vector<int32_t> ic(n_pad, (int32_t) sc[0]);
        std::copy(sc.begin(), sc.end(), ic.begin());
        std::vector<float> mk((size_t) n_pad * m_eff, -INFINITY);
        for (int64_t r = 0; r < m_eff; ++r) {
            for (int64_t i = 0; i < n_vis; ++i) {
                const int32_t row = rows[g][std::min(r, m - 1)];
                mk[r * n_pad + i] = cells.pos_get(sc[i]) <= st->saved_pos[row] ? 0.0f : -INFINITY;
            }
        }
        sum.resize((size_t) n_vis);

        // a graph for as many layers as keep their probabilities [n_pad, m_eff, n_head] within
        // ~64 MiB (a long dialogue's deferred cut: 8K cells x 72 rows x 9 heads is 20 MiB a layer)
        uint32_t il0 = 0;
        while (il0 < hp.n_layer() && result > 0) {
            ggml_backend_sched_reset(sched);
            llm_graph_result * res = ctx->get_gf_res_reserve();
            res->reset();
            ggml_context * ctx0 = res->get_ctx();
            ggml_cgraph *  gf   = res->get_gf();

            ggml_tensor * idx_cells = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, n_pad);
            ggml_tensor * mask      = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, n_pad, m_eff);
            ggml_set_input(idx_cells);
            ggml_set_input(mask);
            std::vector<ggml_tensor *> idx_rows, out(hp.n_layer(), nullptr);
            std::vector<int32_t>       ir_data;
            size_t                     bytes = 0;
            uint32_t                   il    = il0;
            for (; il < hp.n_layer(); ++il) {
                ggml_tensor * qs = st->saved_q[il];
                if (qs == nullptr || std::isnan(st->saved_scale[il]) || st->layer_off[il] < 0) {
                    continue;
                }
                const size_t b = (size_t) n_pad * m_eff * qs->ne[2] * sizeof(float);
                if (bytes > 0 && bytes + b > ((size_t) 64 << 20)) {
                    break;
                }
                bytes += b;
                const int64_t d         = hp.n_embd_head_k(il);
                const int64_t n_head_kv = hp.n_head_kv(il);
                ggml_tensor * ir        = ggml_new_tensor_2d(ctx0, GGML_TYPE_I32, m_eff, qs->ne[2]);
                ggml_set_input(ir);
                idx_rows.push_back(ir);
                ggml_tensor * q  = ggml_get_rows(ctx0, qs, ir);  // [d, m_eff, n_head]
                ggml_tensor * ks = kv->get_k_storage((int32_t) il);
                ggml_tensor * k  = ggml_view_2d(ctx0, ks, d * n_head_kv, ks->ne[1], ks->nb[1], 0);
                k                = ggml_get_rows(ctx0, k, idx_cells);  // [d * n_head_kv, n_pad] F32
                if (ks->type == GGML_TYPE_F16) {
                    k = ggml_cast(ctx0, k, GGML_TYPE_F16);             // exact: the product as from the cache
                }
                k       = ggml_permute(ctx0, ggml_reshape_3d(ctx0, k, d, n_head_kv, n_pad), 0, 2, 1, 3);
                out[il] = loopserve_probs_from_qk(ctx0, q, k, mask, nullptr, st->saved_scale[il], 0.0f, softcap);
                ggml_set_output(out[il]);
                ggml_build_forward_expand(gf, out[il]);
            }
            const uint32_t il1 = il;
            if (bytes == 0) {
                break;  // no scored layer left
            }
            if (!ggml_backend_sched_alloc_graph(sched, gf)) {
                result = -1;
            } else {
                ggml_backend_tensor_set(idx_cells, ic.data(), 0, ggml_nbytes(idx_cells));
                ggml_backend_tensor_set(mask, mk.data(), 0, ggml_nbytes(mask));
                for (ggml_tensor * ir : idx_rows) {
                    ir_data.resize((size_t) ggml_nelements(ir));
                    for (size_t i = 0; i < ir_data.size(); ++i) {
                        ir_data[i] = rows[g][std::min<int64_t>((int64_t) i % m_eff, m - 1)];
                    }
                    ggml_backend_tensor_set(ir, ir_data.data(), 0, ggml_nbytes(ir));
                }
                if (ctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
                    result = -1;
                }
            }
            ctx->loopserve_graph_ran();  // the scheduler's allocation is this graph's now

            // each row's probabilities summed over its KV head's query heads, then added to
            // the cell's sum: the order of every addition is the sequence's own
            for (il = il0; il < il1 && result > 0; ++il) {
                if (out[il] == nullptr) {
                    continue;
                }
                const float * p = (const float *) out[il]->data;
                if (out[il]->buffer == nullptr || !ggml_backend_buffer_is_host(out[il]->buffer)) {
                    tmp.resize((size_t) ggml_nelements(out[il]));
                    ggml_backend_tensor_get(out[il], tmp.data(), 0, ggml_nbytes(out[il]));
                    p = tmp.data();
                }
                const int32_t n_gqa = st->layer_n_gqa[il];
                for (int32_t h = 0; h < st->layer_n_head_kv[il]; ++h) {
                    float * dst = acc.data() + (size_t) (st->layer_off[il] + h) * st->n_cells;
                    for (int64_t r = 0; r < m; ++r) {
                        std::fill(sum.begin(), sum.end(), 0.0f);
                        for (int32_t j = h * n_gqa; j < (h + 1) * n_gqa; ++j) {
                            const float * src = p + ((size_t) j * m_eff + r) * n_pad;
                            for (int64_t i = 0; i < n_vis; ++i) {
                                sum[i] += src[i];
                            }
                        }
                        for (int64_t i = 0; i < n_vis; ++i) {
                            dst[sc[i]] += sum[i];
                        }
                    }
                }
            }
            il0 = il1;
        }
    }
    if (loopserve_trace_cuts()) {
        fprintf(stderr, "loopserve flush by sequence: %.3f ms (%d rows, %zu sequences)\n", (ggml_time_us() - t0) / 1e3,
                n_all, seqs.size());
    }
    st->saved_seq.clear();
    st->saved_pos.clear();
    return result;
}

int32_t llama_loopserve_scores_flush(llama_context * ctx) {
    auto *           st = ctx->loopserve_scores.get();
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (st == nullptr || kv == nullptr || st->saved_seq.empty()) {
        return 0;
    }
    const int32_t n_rows = (int32_t) st->saved_seq.size();
    const auto &  hp     = ctx->get_model().hparams;

    // the cells in view: every cell up to the highest in use of the (single) stream
    const llama_kv_cells & cells = kv->get_cells(0);
    const int64_t          n_kv  = cells.used_max_p1();

    // which layers saved rows: those whose graph recorded a scale
    bool any = false;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        any = any || (st->saved_q[il] != nullptr && !std::isnan(st->saved_scale[il]));
    }
    if (n_kv == 0 || !any) {
        st->saved_seq.clear();
        st->saved_pos.clear();
        return 0;
    }

    if (kv->loopserve_append_only && loopserve_saved_on_host(*st)) {
        return loopserve_flush_by_sequence(ctx, st, kv);
    }

    const int64_t        t0    = ggml_time_us();
    ggml_backend_sched_t sched = ctx->get_sched();
    ggml_backend_sched_synchronize(sched);
    ggml_backend_sched_reset(sched);
    llm_graph_result * res = ctx->get_gf_res_reserve();
    res->reset();
    ggml_context * ctx0 = res->get_ctx();
    ggml_cgraph *  gf   = res->get_gf();

    // [n_kv, n_rows]: 0 where row r saw the cell, -inf elsewhere
    ggml_tensor * mask = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, n_kv, n_rows);
    ggml_set_input(mask);

    const float                softcap = hp.attn_soft_cap ? hp.f_attn_logit_softcapping : 0.0f;
    std::vector<ggml_tensor *> out(hp.n_layer(), nullptr);
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        ggml_tensor * qs = st->saved_q[il];
        if (qs == nullptr || std::isnan(st->saved_scale[il])) {
            continue;
        }
        // q [d, n_rows, n_head], k [d, n_kv, n_head_kv] as build_attn_mha sees them
        ggml_tensor * q  = ggml_view_3d(ctx0, qs, qs->ne[0], n_rows, qs->ne[2], qs->nb[1], qs->nb[2], 0);
        ggml_tensor * ks = kv->get_k_storage((int32_t) il);
        const int64_t d  = hp.n_embd_head_k(il);
        ggml_tensor * k  = ggml_view_3d(ctx0, ks, d, hp.n_head_kv(il), n_kv, ggml_row_size(ks->type, d), ks->nb[1], 0);
        k                = ggml_permute(ctx0, k, 0, 2, 1, 3);
        // (on the GPU, sparse prefill's fused estimation computes these sums in one kernel a
        // layer, but measured slower here: ~2 ms a flush at the 1B shape whatever the rows,
        // against 0.5 ms for 4 rows this way; benchmarks/results/decode.md, session 21)
        out[il] = llama_loopserve_scores_from_qk(ctx0, q, k, mask, nullptr, st->saved_scale[il], 0.0f, softcap, n_rows);
        ggml_build_forward_expand(gf, out[il]);
    }

    int32_t       result  = n_rows;
    const int64_t t_build = ggml_time_us();
    int64_t       t_alloc = t_build, t_mask = t_build;
    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        result = -1;
    } else {
        t_alloc = ggml_time_us();
        std::vector<float> m((size_t) n_kv * n_rows, -INFINITY);
        for (int32_t r = 0; r < n_rows; ++r) {
            const llama_seq_id s   = st->saved_seq[r];
            float *            row = m.data() + (size_t) r * n_kv;
            for (int64_t c = 0; c < n_kv; ++c) {
                if (!cells.is_empty(c) && cells.seq_has(c, s) && cells.pos_get(c) <= st->saved_pos[r]) {
                    row[c] = 0.0f;
                }
            }
        }
        ggml_backend_tensor_set(mask, m.data(), 0, ggml_nbytes(mask));
        t_mask = ggml_time_us();
        if (ctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
            result = -1;
        }
    }
    ctx->loopserve_graph_ran();  // the scheduler's allocation is this graph's now
    const int64_t t_run = ggml_time_us();
    if (result > 0) {
        loopserve_add_scores(*ctx, out, n_kv, n_rows, 0);
    }
    if (loopserve_trace_cuts()) {
        fprintf(
            stderr,
            "loopserve flush: sync+build %.3f alloc %.3f mask %.3f run %.3f read+add %.3f ms (%d rows x %lld cells)\n",
            (t_build - t0) / 1e3, (t_alloc - t_build) / 1e3, (t_mask - t_alloc) / 1e3, (t_run - t_mask) / 1e3,
            (ggml_time_us() - t_run) / 1e3, n_rows, (long long) n_kv);
    }
    st->saved_seq.clear();
    st->saved_pos.clear();
    return result;
}

//
// graph
//

// [n_rows] I32: the slots the ubatch's window rows take, after the rows already saved.
class llm_graph_input_loopserve_saved : public llm_graph_input_i {
  public:
    explicit llm_graph_input_loopserve_saved(llama_loopserve_scores_state * st) : st(st) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        std::vector<int32_t> v(slots->ne[0]);
        for (size_t i = 0; i < v.size(); ++i) {
            v[i] = (int32_t) (st->saved_seq.size() + i);
        }
        GGML_ASSERT((int64_t) st->saved_seq.size() + slots->ne[0] <= st->saved_max);
        ggml_backend_tensor_set(slots, v.data(), 0, ggml_nbytes(slots));
    }

    bool can_reuse(const llm_graph_params & params) override { return params.loopserve_n_window == -slots->ne[0]; }

    ggml_tensor * slots = nullptr;

  private:
    llama_loopserve_scores_state * st;
};

void llama_loopserve_save_queries_graph(const llm_graph_context & g, ggml_tensor * q, float kq_scale, int il) {
    llama_loopserve_scores_state * st = g.loopserve_prefill.saved;
    if (st == nullptr || g.loopserve_n_window >= 0 || il < 0 || il >= (int) st->saved_q.size() ||
        st->saved_q[il] == nullptr || g.hparams.is_swa(il) || q->ne[3] != 1) {
        return;
    }
    const int64_t n_rows = -g.loopserve_n_window;
    const int64_t row0   = q->ne[1] - n_rows;
    GGML_ASSERT(row0 >= 0 && q->ne[0] == st->saved_q[il]->ne[0] && q->ne[2] == st->saved_q[il]->ne[2]);

    ggml_tensor * slots = nullptr;
    for (auto & inp : g.res->inputs) {
        if (auto * s = dynamic_cast<llm_graph_input_loopserve_saved *>(inp.get())) {
            slots = s->slots;
        }
    }
    if (slots == nullptr) {
        auto inp   = std::make_unique<llm_graph_input_loopserve_saved>(st);
        inp->slots = ggml_new_tensor_1d(g.ctx0, GGML_TYPE_I32, n_rows);
        ggml_set_input(inp->slots);
        ggml_set_name(inp->slots, "loopserve_saved_slots");
        slots = inp->slots;
        g.res->add_input(std::move(inp));
    }
    // the window rows [d, n_rows, n_head] into slots along dim 1 of [d, saved_max, n_head]
    ggml_tensor * rows = ggml_view_3d(g.ctx0, q, q->ne[0], n_rows, q->ne[2], q->nb[1], q->nb[2], row0 * q->nb[1]);
    ggml_build_forward_expand(g.gf, ggml_set_rows(g.ctx0, st->saved_q[il], rows, slots));
    st->saved_scale[il] = kq_scale;
}
