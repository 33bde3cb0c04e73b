// Budget allocation over a head-wise layout: rows hidden from their own head's attention.
//
// A head-wise cut (llama_loopserve_seq_keep_per_head) gives every KV head the same number of
// cells. PyramidKV (per layer) and Ada-KV (per head, by score mass) give heads different
// numbers of tokens; in llama.cpp's cells, where one cell holds a row for every layer and
// head, that means the dialogue keeps as many cells as the head that keeps the most, and the
// other heads do not attend to the rows they did not choose. Those rows are hidden here: a
// mask per head added to the KQ mask. ggml's CPU flash attention could take a mask per head,
// but its CUDA kernels read one mask for every head, so each KV head of a layer attends by a
// flash attention of its own, with its own mask, and the heads' outputs are concatenated: the
// cost of hiding, paid only while some row is hidden.

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-loopserve-impl.h"
#include "llama-loopserve-prefill.h"
#include "llama-loopserve.h"
#include "llama-model.h"

#include <cmath>
#include <cstring>
#include <vector>

void llama_loopserve_unhide_cell(llama_loopserve_scores_state & st, uint32_t strm, uint32_t cell) {
    if (st.n_hidden == 0) {
        return;
    }
    uint8_t * h = st.hidden[strm].data() + cell;
    for (int32_t r = 0; r < st.n_head_total; ++r, h += st.n_cells) {
        if (*h) {
            *h = 0;
            st.n_hidden--;
        }
    }
}

int32_t llama_loopserve_seq_hide(llama_context * ctx,
                                 llama_seq_id    seq_id,
                                 const uint8_t * hidden,
                                 int32_t         n_rows,
                                 int32_t         n) {
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (kv == nullptr || (seq_id >= 0 && (uint32_t) seq_id >= kv->get_n_seq_max()) || n < 0) {
        return -1;
    }
    auto * st = ctx->loopserve_scores.get();
    if (hidden != nullptr && n > 0) {
        if (!ctx->get_cparams().flash_attn || kv->get_n_stream() != 1) {
            return -2;  // the per-head masks go with flash attention over one stream
        }
        if (st == nullptr) {
            // the accumulators' state owns the rows; make it, scoring left off
            if (llama_loopserve_scores_set(ctx, 1) != 0) {
                return -1;
            }
            llama_loopserve_scores_set(ctx, 0);
            st = ctx->loopserve_scores.get();
        }
        if (n_rows != st->n_head_total || seq_id < 0) {
            return -1;
        }
    }
    if (st == nullptr || (st->n_hidden == 0 && (hidden == nullptr || n == 0))) {
        return 0;  // nothing hidden, nothing to hide
    }
    if (seq_id < 0) {
        for (auto & h : st->hidden) {
            std::fill(h.begin(), h.end(), 0);
        }
        st->n_hidden = 0;
        return 0;
    }
    const std::vector<uint32_t> cells = loopserve_seq_cells(kv, seq_id);
    if ((size_t) n > cells.size()) {
        return -1;
    }
    const uint32_t strm = kv->get_stream(seq_id);
    for (uint32_t c : cells) {
        llama_loopserve_unhide_cell(*st, strm, c);
    }
    if (hidden == nullptr || n == 0) {
        return 0;
    }
    if (st->hidden.empty()) {
        st->hidden.assign(kv->get_n_stream(), std::vector<uint8_t>((size_t) st->n_head_total * st->n_cells, 0));
    }
    for (int32_t r = 0; r < st->n_head_total; ++r) {
        uint8_t *       dst = st->hidden[strm].data() + (size_t) r * st->n_cells;
        const uint8_t * src = hidden + (size_t) r * n;
        for (int32_t j = 0; j < n; ++j) {
            if (src[j]) {
                dst[cells[j]] = 1;
                st->n_hidden++;
            }
        }
    }
    return 0;
}

int32_t llama_loopserve_seq_hidden(llama_context * ctx, llama_seq_id seq_id, uint8_t * out, int64_t n_max) {
    llama_kv_cache * kv = loopserve_full_cache(ctx);
    if (kv == nullptr || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return -1;
    }
    const auto *                st    = ctx->loopserve_scores.get();
    const std::vector<uint32_t> cells = loopserve_seq_cells(kv, seq_id);
    const int64_t               n     = (int64_t) cells.size();
    const int32_t               rows  = st ? st->n_head_total : 0;
    if (out != nullptr && rows * n <= n_max) {
        const uint32_t strm = kv->get_stream(seq_id);
        for (int32_t r = 0; r < rows; ++r) {
            for (int64_t j = 0; j < n; ++j) {
                out[r * n + j] = st->n_hidden > 0 ? st->hidden[strm][(size_t) r * st->n_cells + cells[j]] : 0;
            }
        }
    }
    return (int32_t) n;
}

//
// graph
//

uint32_t llama_loopserve_graph_extra_nodes(const llama_model & model) {
    // per KV head: the views of its queries, K, V, sinks and hide row, its mask, its flash
    // attention and the concatenation; per layer a few more (casts, the reshape), and the input
    const auto & hp = model.hparams;
    uint32_t     n  = 16;
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        if (!hp.is_swa(il)) {
            n += 8 * hp.n_head_kv(il) + 4;
        }
    }
    return n;
}

// [n_kv, n_head_total] F16: 0 where a head sees a cell's row, -inf where it is hidden; set
// from the context's rows before each ubatch, after the cells the ubatch writes are shown.
class llm_graph_input_loopserve_hide : public llm_graph_input_i {
  public:
    llm_graph_input_loopserve_hide(llama_loopserve_scores_state * st, const llama_kv_cache_context * kvc) :
        st(st),
        kvc(kvc) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        const auto & sinfo = kvc->loopserve_sinfo();
        GGML_ASSERT(sinfo.n_stream() == 1);
        const uint32_t strm = sinfo.strm[0];
        for (uint32_t idx : sinfo.idxs[0]) {
            llama_loopserve_unhide_cell(*st, strm, idx);
        }
        const int64_t     n_kv  = hide->ne[0];
        const ggml_fp16_t zero  = ggml_fp32_to_fp16(0.0f);
        const ggml_fp16_t inf_n = ggml_fp32_to_fp16(-INFINITY);
        buf.assign((size_t) n_kv * st->n_head_total, zero);
        if (st->n_hidden > 0) {
            for (int32_t r = 0; r < st->n_head_total; ++r) {
                const uint8_t * h   = st->hidden[strm].data() + (size_t) r * st->n_cells;
                ggml_fp16_t *   dst = buf.data() + (size_t) r * n_kv;
                for (int64_t c = 0; c < n_kv; ++c) {
                    if (h[c]) {
                        dst[c] = inf_n;
                    }
                }
            }
        }
        ggml_backend_tensor_set(hide, buf.data(), 0, ggml_nbytes(hide));
    }

    bool can_reuse(const llm_graph_params & params) override {
        kvc = loopserve_full_cache_context(params.mctx);
        return kvc != nullptr && kvc->get_n_kv() == hide->ne[0];
    }

    ggml_tensor * hide = nullptr;

  private:
    llama_loopserve_scores_state * st;
    const llama_kv_cache_context * kvc;
    std::vector<ggml_fp16_t>       buf;
};

// The graph's hide input, made by its first scored layer.
static ggml_tensor * loopserve_hide_input(const llm_graph_context &      g,
                                          llama_loopserve_scores_state * st,
                                          int64_t                        n_kv) {
    for (auto & inp : g.res->inputs) {
        if (auto * h = dynamic_cast<llm_graph_input_loopserve_hide *>(inp.get())) {
            return h->hide;
        }
    }
    const llama_kv_cache_context * kvc = loopserve_full_cache_context(g.mctx);
    if (kvc == nullptr) {
        return nullptr;
    }
    auto inp  = std::make_unique<llm_graph_input_loopserve_hide>(st, kvc);
    inp->hide = ggml_new_tensor_2d(g.ctx0, GGML_TYPE_F16, n_kv, st->n_head_total);
    ggml_set_input(inp->hide);
    ggml_set_name(inp->hide, "loopserve_hide");
    ggml_tensor * t = inp->hide;
    g.res->add_input(std::move(inp));
    return t;
}

ggml_tensor * llama_loopserve_hide_attn(const llm_graph_context & g,
                                        ggml_tensor *             q,
                                        ggml_tensor *             k,
                                        ggml_tensor *             v,
                                        ggml_tensor *             kq_b,
                                        ggml_tensor *             kq_mask,
                                        ggml_tensor *             sinks,
                                        ggml_tensor *             v_mla,
                                        float                     kq_scale,
                                        int                       il) {
    llama_loopserve_scores_state * st = g.loopserve_prefill.hide;
    const auto &                   hp = g.hparams;
    // q [dk, n_tokens, n_head, n_stream], k/v [d, n_kv, n_head_kv, n_stream] (permuted views)
    if (st == nullptr || !g.cparams.flash_attn || kq_b || v_mla || kq_mask == nullptr || hp.is_swa(il) || il < 0 ||
        il >= (int) st->layer_off.size() || st->layer_off[il] < 0 || q->ne[3] != 1 || k->ne[3] != 1 ||
        kq_mask->ne[2] != 1 || kq_mask->ne[3] != 1) {
        return nullptr;
    }
    ggml_context * ctx0      = g.ctx0;
    const int64_t  n_tokens  = q->ne[1];
    const int64_t  n_kv      = k->ne[1];
    const int64_t  n_head    = q->ne[2];
    const int64_t  n_head_kv = k->ne[2];
    const int64_t  n_gqa     = n_head / n_head_kv;
    const float    max_bias  = hp.f_max_alibi_bias;
    const float    softcap   = hp.attn_soft_cap ? hp.f_attn_logit_softcapping : 0.0f;
    GGML_ASSERT(n_head_kv == st->layer_n_head_kv[il] && n_gqa * n_head_kv == n_head);

    ggml_tensor * hide = loopserve_hide_input(g, st, n_kv);
    if (hide == nullptr) {
        return nullptr;
    }
    if (k->type == GGML_TYPE_F32) {
        k = ggml_cast(ctx0, k, GGML_TYPE_F16);
    }
    if (v->type == GGML_TYPE_F32) {
        v = ggml_cast(ctx0, v, GGML_TYPE_F16);
    }

    ggml_tensor * cur = nullptr;
    for (int64_t h = 0; h < n_head_kv; ++h) {
        ggml_tensor * qh =
            ggml_view_4d(ctx0, q, q->ne[0], n_tokens, n_gqa, 1, q->nb[1], q->nb[2], q->nb[3], h * n_gqa * q->nb[2]);
        ggml_tensor * kh = ggml_view_4d(ctx0, k, k->ne[0], n_kv, 1, 1, k->nb[1], k->nb[2], k->nb[3], h * k->nb[2]);
        ggml_tensor * vh = ggml_view_4d(ctx0, v, v->ne[0], n_kv, 1, 1, v->nb[1], v->nb[2], v->nb[3], h * v->nb[2]);
        // this head's row of the hide input, broadcast over the mask's query rows
        ggml_tensor * hr = ggml_view_2d(ctx0, hide, n_kv, 1, hide->nb[1], (st->layer_off[il] + h) * hide->nb[1]);
        ggml_tensor * mh = ggml_add(ctx0, kq_mask, hr);

        ggml_tensor * oh = ggml_flash_attn_ext(ctx0, qh, kh, vh, mh, kq_scale, max_bias, softcap);
        if (sinks) {
            ggml_flash_attn_ext_add_sinks(oh, ggml_view_1d(ctx0, sinks, n_gqa, h * n_gqa * sinks->nb[0]));
        }
        ggml_prec_set_acc(oh, GGML_PREC_F32);
        llama_loopserve_fa_cell_order(g, oh, il);
        // [dv, n_gqa, n_tokens]: the heads of the next KV head follow along dim 1
        cur = cur ? ggml_concat(ctx0, cur, oh, 1) : oh;
    }

    // the observation window's scores see every row, hidden or not: a hidden token that the
    // reply turns to again can come back at the next cut
    if (g.loopserve_n_window > 0 && il < (int) g.res->t_loopserve_scores.size()) {
        ggml_tensor * scores = llama_loopserve_scores_from_qk(ctx0, q, k, kq_mask, sinks, kq_scale, max_bias, softcap,
                                                              g.loopserve_n_window);
        ggml_build_forward_expand(g.gf, scores);
        g.res->t_loopserve_scores[il] = scores;
    }

    cur = ggml_reshape_2d(ctx0, cur, cur->ne[0] * cur->ne[1], cur->ne[2] * cur->ne[3]);
    ggml_build_forward_expand(g.gf, cur);
    return cur;
}
