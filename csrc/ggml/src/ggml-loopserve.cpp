// loopserve-edge: graph constructors of GGML_OP_LOOPSERVE (see ggml-loopserve.h)

#include "ggml-loopserve.h"

#include "ggml-impl.h"

#include <cstring>

static void loopserve_params(ggml_tensor * t, enum ggml_loopserve_op op, const int32_t * p, int n) {
    int32_t params[GGML_MAX_OP_PARAMS / sizeof(int32_t)] = { 0 };
    params[0]                                            = op;
    for (int i = 0; i < n; ++i) {
        params[1 + i] = p[i];
    }
    ggml_set_op_params(t, params, sizeof(params));
    t->op = GGML_OP_LOOPSERVE;
}

static int32_t f2i(float f) {
    int32_t i;
    memcpy(&i, &f, sizeof(i));
    return i;
}

static bool is_index(const ggml_tensor * t) {
    return t->type == GGML_TYPE_I64 || t->type == GGML_TYPE_I32;
}

ggml_tensor * ggml_loopserve_vs_scores(ggml_context * ctx,
                                       ggml_tensor *  p,
                                       ggml_tensor *  q_cells,
                                       int            n_head_kv,
                                       int            cell_mod) {
    GGML_ASSERT(p->type == GGML_TYPE_F32 && p->nb[0] == sizeof(float) && p->ne[3] == 1);
    GGML_ASSERT(n_head_kv > 0 && p->ne[2] % n_head_kv == 0);
    GGML_ASSERT(is_index(q_cells) && ggml_is_contiguous(q_cells) && q_cells->ne[0] == p->ne[1]);
    GGML_ASSERT(cell_mod > 0);
    ggml_tensor * t     = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, p->ne[0], 2, n_head_kv);
    const int32_t prm[] = { n_head_kv, cell_mod };
    loopserve_params(t, GGML_LOOPSERVE_OP_VS_SCORES, prm, 2);
    t->src[0] = p;
    t->src[1] = q_cells;
    return t;
}

ggml_tensor * ggml_loopserve_vs_estimate(ggml_context * ctx,
                                         ggml_tensor *  q,
                                         ggml_tensor *  k,
                                         ggml_tensor *  mask,
                                         ggml_tensor *  q_cells,
                                         float          scale,
                                         float          logit_softcap,
                                         int            cell_mod) {
    GGML_ASSERT(q->type == GGML_TYPE_F32 && q->nb[0] == sizeof(float) && q->ne[3] == 1);
    GGML_ASSERT(k->type == GGML_TYPE_F16 && k->nb[0] == ggml_type_size(k->type) && k->ne[3] == 1);
    GGML_ASSERT(q->ne[0] == k->ne[0] && q->ne[2] % k->ne[2] == 0);
    GGML_ASSERT(mask == nullptr || ((mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32) &&
                                    mask->ne[0] == k->ne[1] && mask->ne[1] >= q->ne[1]));
    GGML_ASSERT(is_index(q_cells) && ggml_is_contiguous(q_cells) && q_cells->ne[0] == q->ne[1]);
    GGML_ASSERT(cell_mod > 0);
    ggml_tensor * t     = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, k->ne[1], 2, k->ne[2]);
    const int32_t prm[] = { f2i(scale), f2i(logit_softcap), cell_mod };
    loopserve_params(t, GGML_LOOPSERVE_OP_VS_ESTIMATE, prm, 3);
    t->src[0] = q;
    t->src[1] = k;
    t->src[2] = mask;
    t->src[3] = q_cells;
    return t;
}

ggml_tensor * ggml_loopserve_select(ggml_context * ctx,
                                    ggml_tensor *  scores,
                                    float          alpha,
                                    int            n_min_v,
                                    int            n_max_v,
                                    int            n_min_s,
                                    int            n_max_s,
                                    int            n_sink,
                                    int            n_local) {
    GGML_ASSERT(scores->type == GGML_TYPE_F32 && ggml_is_contiguous(scores) && scores->ne[1] == 2);
    GGML_ASSERT(alpha > 0.0f && alpha <= 1.0f);
    ggml_tensor * t     = ggml_new_tensor_3d(ctx, GGML_TYPE_I32, scores->ne[0] + 1, 2, scores->ne[2]);
    const int32_t prm[] = { f2i(alpha), n_min_v, n_max_v, n_min_s, n_max_s, n_sink, n_local };
    loopserve_params(t, GGML_LOOPSERVE_OP_SELECT, prm, 7);
    t->src[0] = scores;
    return t;
}

ggml_tensor * ggml_loopserve_sparse_attn(ggml_context * ctx,
                                         ggml_tensor *  q,
                                         ggml_tensor *  k,
                                         ggml_tensor *  v,
                                         ggml_tensor *  mask,
                                         ggml_tensor *  q_cells,
                                         ggml_tensor *  sel,
                                         float          scale,
                                         float          logit_softcap,
                                         int            block_q,
                                         int            cell_mod) {
    const int64_t n_kv = k->ne[1];
    GGML_ASSERT(q->type == GGML_TYPE_F32 && q->nb[0] == sizeof(float) && q->ne[3] == 1);
    GGML_ASSERT(k->nb[0] == ggml_type_size(k->type) && k->ne[3] == 1 && q->ne[0] == k->ne[0]);
    GGML_ASSERT(v->ne[1] == n_kv && v->ne[2] == k->ne[2] && v->ne[3] == 1);
    GGML_ASSERT(v->nb[0] == ggml_type_size(v->type) || v->type == GGML_TYPE_F16 || v->type == GGML_TYPE_F32);
    GGML_ASSERT(q->ne[2] % k->ne[2] == 0);
    GGML_ASSERT(mask == nullptr || ((mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32) &&
                                    mask->ne[0] == n_kv && mask->ne[1] >= q->ne[1]));
    GGML_ASSERT(is_index(q_cells) && ggml_is_contiguous(q_cells) && q_cells->ne[0] == q->ne[1]);
    // a selection made for fewer cells (an earlier ubatch's, reused) names no cell >= n_kv
    GGML_ASSERT(sel->type == GGML_TYPE_I32 && ggml_is_contiguous(sel) && sel->ne[0] >= 1 && sel->ne[0] <= n_kv + 1 &&
                sel->ne[1] == 2 && sel->ne[2] == k->ne[2]);
    GGML_ASSERT(block_q > 0 && cell_mod > 0);
    ggml_tensor * t     = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, v->ne[0], q->ne[2], q->ne[1] + 1);
    const int32_t prm[] = { f2i(scale), f2i(logit_softcap), block_q, cell_mod };
    loopserve_params(t, GGML_LOOPSERVE_OP_SPARSE_ATTN, prm, 4);
    t->src[0] = q;
    t->src[1] = k;
    t->src[2] = v;
    t->src[3] = mask;
    t->src[4] = q_cells;
    t->src[5] = sel;
    return t;
}
