#pragma once

// Internal side of llama-loopserve.h: the hooks that llama-graph.cpp and
// llama-context.cpp call. Kept out of the public header so that the upstream files only
// gain one-line calls.

#include "llama.h"

#include <cstdint>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct ggml_backend_buffer;
struct llama_ubatch;
struct llama_context;
struct llm_graph_context;
class llm_graph_result;
class llama_memory_context_i;
class llama_kv_cache;
class llama_kv_cache_context;

// Per-context score accumulators, owned by llama_context (null until scoring is first
// enabled, so a context that never scores carries nothing).
struct llama_loopserve_scores_state {
    int32_t n_window    = 0;  // tokens of each batch to score, 0 = off
    int32_t n_window_ub = 0;  // rows of the ubatch being built that are scored

    // scored layers: index of the layer's first KV head among all scored heads, -1 if unscored
    std::vector<int32_t> layer_off;
    std::vector<int32_t> layer_n_head_kv;
    std::vector<int32_t> layer_n_gqa;       // query heads per KV head
    int32_t              n_head_total = 0;  // KV heads summed over the scored layers

    // per stream of the full-attention cache: [n_head_total][n_cells]
    uint32_t                        n_cells = 0;
    std::vector<std::vector<float>> acc;
    std::vector<int64_t>            n_rows;  // per sequence

    // a scored ubatch's [n_head_total][n_kv] as read from the backend: pinned host memory
    // of the backend's device where it has some (a copy into pageable memory is a
    // synchronous staged copy per layer), else `staging`
    std::vector<float>    staging;
    ggml_backend_buffer * staging_pinned = nullptr;
    bool                  no_pinned      = false;

    // budget allocation (llama_loopserve_seq_hide): 1 where a scored head's row of a cell is
    // hidden from that head's attention, per stream [n_head_total][n_cells]; empty until the
    // first hide. While any row is hidden, the graph masks each head apart
    // (llama-loopserve-hide.cpp).
    std::vector<std::vector<uint8_t>> hidden;
    int64_t                           n_hidden = 0;

    // saved queries (llama_loopserve_scores_save_queries, llama-loopserve-saved-queries.cpp):
    // per layer [n_embd_head_k, saved_max, n_head] F32 beside the layer's K, null where
    // unscored; each layer's kq_scale as its graph gave it; the saved rows' sequences and
    // positions, in slot order. n_window_ub < 0 marks a ubatch that saves -n_window_ub rows.
    int32_t                            saved_max = 0;
    bool                               saved_ok  = false;  // flash attention, one stream, no sinks, no ALiBi
    std::vector<ggml_tensor *>         saved_q;
    std::vector<float>                 saved_scale;
    std::vector<llama_seq_id>          saved_seq;
    std::vector<llama_pos>             saved_pos;
    std::vector<ggml_context *>        saved_ctx;
    std::vector<ggml_backend_buffer *> saved_buf;

    ~llama_loopserve_scores_state();
};

// The accumulators' state of ctx, made (scoring left off) if it was not yet; false for a context
// that cannot be scored.
bool loopserve_scores_made(llama_context * ctx);

// LOOPSERVE_TRACE_CUTS set: a head-wise cut prints the time of each of its parts to stderr
// (benchmarks/cut_parts.py reads them; measuring them from Python lumps them together)
bool loopserve_trace_cuts();

// graph side: the [n_kv, 1, n_head_kv] score tensor of one layer (means over the window
// rows and the query heads of each KV head), from the attention
// probabilities that the non-flash path already computed ([n_kv, n_tokens, n_head])
ggml_tensor * llama_loopserve_scores_from_probs(ggml_context * ctx,
                                                ggml_tensor *  kq_soft_max,
                                                int64_t        n_head_kv,
                                                int32_t        n_window);

// graph side, flash attention: recompute the probabilities of the window rows only
// (q [d, n_tokens, n_head], k [d, n_kv, n_head_kv]), the way ggml_flash_attn_ext does
ggml_tensor * llama_loopserve_scores_from_qk(ggml_context * ctx,
                                             ggml_tensor *  q,
                                             ggml_tensor *  k,
                                             ggml_tensor *  kq_mask,
                                             ggml_tensor *  sinks,
                                             float          kq_scale,
                                             float          max_bias,
                                             float          softcap,
                                             int32_t        n_window);

// the probabilities of contiguous query rows qw [d, n_rows, n_head] against k [d, n_kv,
// n_head_kv] under mask [n_kv, n_rows] (or none): [n_kv, n_rows, n_head], computed as
// ggml_flash_attn_ext orders it (softcap, then the mask)
ggml_tensor * loopserve_probs_from_qk(ggml_context * ctx,
                                      ggml_tensor *  qw,
                                      ggml_tensor *  k,
                                      ggml_tensor *  mask,
                                      ggml_tensor *  sinks,
                                      float          kq_scale,
                                      float          max_bias,
                                      float          softcap);

// the cache that holds every position of a sequence (the plain cache, or the non-sliding half
// of an interleaved one), and the part of a ubatch's memory context that covers it
llama_kv_cache *               loopserve_full_cache(llama_context * ctx);
const llama_kv_cache_context * loopserve_full_cache_context(const llama_memory_context_i * mctx);

// The cells of seq_id in increasing position order.
std::vector<uint32_t> loopserve_seq_cells(const llama_kv_cache * kv, llama_seq_id seq_id);

// A cell now holds a new token (or nothing): none of its rows stays hidden.
void llama_loopserve_unhide_cell(llama_loopserve_scores_state & st, uint32_t strm, uint32_t cell);

// graph side, flash attention with hidden rows (llama_loopserve_seq_hide active): each KV head
// of a scored layer attends with its own mask (the KQ mask plus its hidden rows), as
// build_attn_mha's output [n_embd_v * n_head, n_tokens]; nullptr when this layer keeps the
// stock path (nothing hidden, a sliding-window layer, no flash attention, several streams)
ggml_tensor * llama_loopserve_hide_attn(const llm_graph_context & g,
                                        ggml_tensor *             q,
                                        ggml_tensor *             k,
                                        ggml_tensor *             v,
                                        ggml_tensor *             kq_b,
                                        ggml_tensor *             kq_mask,
                                        ggml_tensor *             sinks,
                                        ggml_tensor *             v_mla,
                                        float                     kq_scale,
                                        int                       il);

// graph side, batch-invariant attention: give flash attention node fa of layer il the order of
// its cache's cells (GGML_LOOPSERVE_FA_ORDER_SRC, llama-loopserve-order.cpp) where the cache
// asks for it (llama_kv_cache::loopserve_position_order) and K is the cache's own
void llama_loopserve_fa_cell_order(const llm_graph_context & g, ggml_tensor * fa, int il);

// context side: graph nodes to add to a context's budget (llama_context::graph_max_nodes) for
// the per-head attention of llama_loopserve_hide_attn, in case rows get hidden
struct llama_model;
uint32_t llama_loopserve_graph_extra_nodes(const llama_model & model);

// context side: called by llama_context::decode around each ubatch
void llama_loopserve_ubatch_begin(llama_context & lctx, const llama_ubatch & ubatch, uint32_t n_tokens_all);

void llama_loopserve_ubatch_end(llama_context &                lctx,
                                const llama_ubatch &           ubatch,
                                const llm_graph_result *       res,
                                const llama_memory_context_i * mctx);

// context side: cells of seq_id were overwritten by a state load (seq_id < 0: all)
void llama_loopserve_state_loaded(llama_context & lctx, llama_seq_id seq_id);

// Add one graph's score tensors (per layer [n_kv, n_head_kv] means over the rows and the query
// heads of each KV head, null where unscored) to stream strm's accumulators as sums over n_rows
// rows. Reads them back first (the graph must have run).
void loopserve_add_scores(llama_context &                    lctx,
                          const std::vector<ggml_tensor *> & t,
                          int64_t                            n_kv,
                          int32_t                            n_rows,
                          uint32_t                           strm);

// graph side, saved queries: a ubatch that saves its window rows copies each scored layer's
// rows of q ([dk, n_tokens, n_head], permuted) into the layer's saved queries
void llama_loopserve_save_queries_graph(const llm_graph_context & g, ggml_tensor * q, float kq_scale, int il);

// the saved queries' memory and rows freed (saving off)
void loopserve_saved_free(llama_loopserve_scores_state & st);

// before seq_id's scores are zeroed (all when < 0): its saved rows go; other sequences'
// saved rows are scored first
void llama_loopserve_saved_drop(llama_context * ctx, llama_seq_id seq_id);

// After llama_loopserve_seq_keep_per_head: each scored head's scores follow its tokens
// (head_src[h*n + j] -> dst[j], n = dst.size(), heads in layer order), the freed cells' start over.
void llama_loopserve_scores_moved(llama_context &               lctx,
                                  llama_seq_id                  seq_id,
                                  const std::vector<uint32_t> & head_src,
                                  const std::vector<uint32_t> & dst,
                                  const std::vector<uint32_t> & freed);
