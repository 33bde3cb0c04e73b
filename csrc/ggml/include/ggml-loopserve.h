#pragma once

// loopserve-edge: the ops of LoopServe's adaptive vertical-slash sparse prefill
// (https://arxiv.org/abs/2507.13681). They are one ggml op, GGML_OP_LOOPSERVE, whose
// first op parameter says which of the three below a node is. CPU: ggml-cpu/loopserve.cpp
// (the reference); CUDA: ggml-cuda/loopserve/.
//
// Coordinates are KV cells: the key of cell j is column j, and a query row whose own K
// was written to cell c lies on diagonal ("slash") offset s = c - j of key j. For a prompt
// written to consecutive cells (the usual prefill) cells and positions differ by a
// constant, so these are the vertical and slash lines of the attention matrix.
// q_cells is the KV cache's set_rows index tensor (I64 or I32); cells are taken modulo
// cell_mod (the cache size, since the index of stream s is offset by s*size).

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

enum ggml_loopserve_op {
    GGML_LOOPSERVE_OP_VS_SCORES   = 0,
    GGML_LOOPSERVE_OP_SELECT      = 1,
    GGML_LOOPSERVE_OP_SPARSE_ATTN = 2,
    GGML_LOOPSERVE_OP_VS_ESTIMATE = 3,
};

// Vertical and slash scores.
// p:       [n_kv, n_rows, n_head] f32, attention probabilities of n_rows query rows
//          (query head h belongs to KV head h / (n_head/n_head_kv))
// q_cells: [n_rows] I64/I32, the cell of each of those rows
// result:  [n_kv, 2, n_head_kv] f32; [j, 0, g] = sum over the rows and the query heads of
//          KV head g of p[j]; [s, 1, g] = the same sum of p[cell(row) - s] (offset s).
GGML_API struct ggml_tensor * ggml_loopserve_vs_scores(struct ggml_context * ctx,
                                                       struct ggml_tensor *  p,
                                                       struct ggml_tensor *  q_cells,
                                                       int                   n_head_kv,
                                                       int                   cell_mod);

// The estimation and the scores in one op: ggml_loopserve_vs_scores of
// p = softmax(scale*QK^T + mask) over the n_rows query rows (with a logit softcap:
// softcap*tanh(scale*QK^T/softcap) + mask, the order of ggml_flash_attn_ext), without
// the [n_kv, n_rows, n_head] probabilities in memory (CUDA: f16 K of head dim 64, 128 or
// 256 on sm_80+). A row that sees no key contributes nothing.
// q:       [dk, n_rows, n_head] f32 (rows and heads may be strided)
// k:       [dk, n_kv, n_head_kv] f16
// mask:    [n_kv, >= n_rows] f16/f32 (the rows' mask rows), or NULL: a row sees the keys
//          whose cell is <= its own (causal in cells)
// q_cells: [n_rows] I64/I32
// result:  [n_kv, 2, n_head_kv] f32, as ggml_loopserve_vs_scores
GGML_API struct ggml_tensor * ggml_loopserve_vs_estimate(struct ggml_context * ctx,
                                                         struct ggml_tensor *  q,
                                                         struct ggml_tensor *  k,
                                                         struct ggml_tensor *  mask,
                                                         struct ggml_tensor *  q_cells,
                                                         float                 scale,
                                                         float                 logit_softcap,
                                                         int                   cell_mod);

// Adaptive selection, per KV head g and kind (0 = vertical columns, 1 = slash offsets):
// order the lines with a positive score by (score desc, index asc); take the shortest
// prefix whose mass reaches alpha * (total mass) (alpha = 1: all of them), at least n_min and at most n_max lines
// (n_max <= 0: no cap; never lines of score 0); add the forced lines (columns
// < n_sink, offsets < n_local).
// scores: [n_kv, 2, n_head_kv] f32 (ggml_loopserve_vs_scores)
// result: [n_kv + 1, 2, n_head_kv] I32; [0, k, g] = n, [1..n, k, g] = the lines, ascending.
GGML_API struct ggml_tensor * ggml_loopserve_select(struct ggml_context * ctx,
                                                    struct ggml_tensor *  scores,
                                                    float                 alpha,
                                                    int                   n_min_v,
                                                    int                   n_max_v,
                                                    int                   n_min_s,
                                                    int                   n_max_s,
                                                    int                   n_sink,
                                                    int                   n_local);

// Attention over the selected lines, exact softmax over that set.
// Query rows go in blocks of block_q rows (in row order); for block b with cells in
// [lo, hi] and KV head g the key set is
//     K(b, g) = { columns selected for g } U  U_{s in slashes of g} [lo - s, hi - s]
// (clipped to [0, n_kv)) and row r attends to the keys of K(b, g) that the mask lets it
// see. Same inputs and conventions as ggml_flash_attn_ext (scale, logit softcap; no
// ALiBi, no sinks):
// q:       [dk, n_tokens, n_head] f32
// k:       [dk, n_kv, n_head_kv] f32/f16/q8_0/... (rows contiguous)
// v:       [dv, n_kv, n_head_kv] f32/f16, or quantized with contiguous rows
// mask:    [n_kv, >= n_tokens] f16/f32, or NULL: causal in cells (key cell <= row cell; for
//          a sequence alone in its cells in position order, the causal mask without
//          the [n_kv, n_tokens] tensor)
// q_cells: [n_tokens] I64/I32
// sel:     [n_sel + 1, 2, n_head_kv] I32 (ggml_loopserve_select or hand-built), n_sel <= n_kv: a
//          selection made over the first n_sel cells (an earlier ubatch's) serves a longer cache
// result:  [dv, n_head, n_tokens + 1] f32: rows 0..n_tokens-1 in the layout of
//          ggml_flash_attn_ext; row n_tokens holds statistics: [0, h] = (row, key) pairs
//          computed for query head h with key cell <= the row's cell, [1, h] = the sum of
//          (cell + 1) over the rows (the causal matrix in cells).
GGML_API struct ggml_tensor * ggml_loopserve_sparse_attn(struct ggml_context * ctx,
                                                         struct ggml_tensor *  q,
                                                         struct ggml_tensor *  k,
                                                         struct ggml_tensor *  v,
                                                         struct ggml_tensor *  mask,
                                                         struct ggml_tensor *  q_cells,
                                                         struct ggml_tensor *  sel,
                                                         float                 scale,
                                                         float                 logit_softcap,
                                                         int                   block_q,
                                                         int                   cell_mod);

// Batch-invariant attention (llama_loopserve_set_batch_invariant): where a flash attention
// node (ggml_flash_attn_ext) has a source in this slot, it is [3 * n_kv + 1] I32, the cells
// grouped by sequence, each group in position order, then the range of each cell's group in that
// list (llama_kv_cache::loopserve_cell_order), then a number that changes with every ubatch. The
// CPU's flash attention (its row with f16 K and V, the stock loop with other types) walks a
// query's visible cells in that order, so its sums do not depend on where the cells sit; other
// kernels ignore it.
#define GGML_LOOPSERVE_FA_ORDER_SRC 5

#ifdef __cplusplus
}
#endif
