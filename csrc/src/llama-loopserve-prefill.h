#pragma once

// Internal side of the sparse prefill API in llama-loopserve.h: the configuration that
// the graph is built with, the per-context state, and the hooks that llama-graph.cpp and
// llama-context.cpp call (one line each).

#include "ggml-backend.h"
#include "llama.h"

#include <cstdint>
#include <map>
#include <set>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct llama_context;
struct llama_loopserve_prefill_state;
struct llama_ubatch;
struct llm_graph_context;
class llm_graph_result;

// Part of the graph parameters: a change rebuilds the graph. enabled == false: stock graph.
struct llama_loopserve_prefill_cfg {
    bool    enabled      = false;
    float   alpha        = 0.95f;
    int32_t last_q       = 64;
    int32_t n_min_v      = 0;
    int32_t n_max_v      = 0;
    int32_t n_min_s      = 0;
    int32_t n_max_s      = 0;
    int32_t n_sink       = 4;
    int32_t n_local      = 64;
    int32_t n_min_tokens = 1024;
    int32_t block_q      = 0;  // 0: by the GQA ratio (include/llama-loopserve.h)
    int32_t reuse        = 1;  // a selection serves this many ubatches of one input (1: each estimates)
    // this ubatch: its sequence is alone in its cells in position order, so the sparse ops
    // can be causal in cells instead of reading the [n_kv, n_tokens] KQ mask (per ubatch)
    bool    cell_causal  = false;
    // this ubatch: it attends over the selection the previous ubatch of its input estimated
    // over sel_n_kv cells, stored per layer (reuse > 1), instead of estimating its own
    bool    sel_reuse    = false;
    int64_t sel_n_kv     = 0;

    // where the graph finds the stored selections (not part of the graph's identity)
    llama_loopserve_prefill_state * st = nullptr;

    // not prefill: the context's hidden rows while any is hidden, else null (its being set is
    // part of the graph's identity). It rides in this config so that upstream's graph
    // parameters carry one loopserve-edge field, not two (llama-loopserve-hide.cpp)
    struct llama_loopserve_scores_state * hide = nullptr;

    // not prefill: the scores' state while the ubatch saves its window rows' queries (its
    // being set follows the graph's loopserve_n_window < 0, which is part of its identity)
    struct llama_loopserve_scores_state * saved = nullptr;

    bool operator==(const llama_loopserve_prefill_cfg & o) const {
        return enabled == o.enabled && alpha == o.alpha && last_q == o.last_q && n_min_v == o.n_min_v &&
               n_max_v == o.n_max_v && n_min_s == o.n_min_s && n_max_s == o.n_max_s && n_sink == o.n_sink &&
               n_local == o.n_local && n_min_tokens == o.n_min_tokens && block_q == o.block_q && reuse == o.reuse &&
               cell_causal == o.cell_causal && sel_reuse == o.sel_reuse && sel_n_kv == o.sel_n_kv &&
               (hide != nullptr) == (o.hide != nullptr) && (saved != nullptr) == (o.saved != nullptr);
    }

    bool operator!=(const llama_loopserve_prefill_cfg & o) const { return !(*this == o); }
};

// Owned by llama_context; null until llama_loopserve_prefill_set is first called.
struct llama_loopserve_prefill_state {
    llama_loopserve_prefill_cfg cfg;
    bool                        profile        = false;  // time estimation vs attention (eval callback; syncs)
    bool                        profile_cb_set = false;

    // statistics since the last reset
    int32_t             n_ubatch_sparse      = 0;
    int32_t             n_ubatch_stock       = 0;  // prompt ubatches (> 1 token) that kept the stock path
    int32_t             n_ubatch_cell_causal = 0;
    int32_t             n_ubatch_reused      = 0;  // sparse ubatches that reused the previous selection
    int32_t             n_layer_est_chain    = 0;  // their layers estimated by the chain on a GPU
    int64_t             n_tokens_sparse      = 0;
    int64_t             t_sparse_us          = 0;  // wall time from a decode call's first sparse ubatch to its end
    int64_t             t_estimate_us        = 0;  // profile mode only
    int64_t             t_select_us          = 0;  // profile mode only
    int64_t             t_attend_us          = 0;  // profile mode only
    std::vector<double> computed;                  // per layer: (row, key) pairs computed
    std::vector<double> causal;                    // per layer: causal (row, key) pairs of the sparse ubatches
    int64_t             t_mark_us = 0;             // profile mode: time of the last callback

    // statistics rows on their way (ubatch_end copies them asynchronously, fold adds them up)
    struct pending_row {
        int32_t il;
        size_t  offset;
        int64_t n;
    };

    ggml_backend_buffer_t    pinned      = nullptr;  // host memory the device copies into
    size_t                   pinned_used = 0;
    std::vector<pending_row> pending;
    size_t                   n_layer    = 0;
    int64_t                  t_first_us = 0;  // start of the first sparse ubatch not folded

    // reuse > 1: each sparse layer's last selection ([n_kv + 1, 2, n_head_kv] I32, at most the
    // cache's cells), in a buffer of the layer's device; what each graph did with it (a graph
    // may be computed again for a later ubatch without being rebuilt); and the input it
    // belongs to, so that only the next ubatch of the same sequence, in the same decode
    // call, reuses it
    struct sel_use {
        int64_t n_kv;    // cells the selection was made over
        bool    reused;  // the graph read it (else it estimated and stored it)
    };

    ggml_context *                              sel_ctx = nullptr;
    std::vector<ggml_backend_buffer_t>          sel_bufs;
    std::vector<ggml_tensor *>                  sel_store;         // per layer
    std::map<const llm_graph_result *, sel_use> sel_by_graph;
    int32_t                                     sel_age      = 0;  // ubatches since the estimate, 0: none
    int64_t                                     sel_n_kv     = 0;
    int32_t                                     sel_seq      = -1;
    int32_t                                     sel_pos_next = -1;

    // the layers of each graph whose estimation is the chain on a GPU (not the fused op)
    std::map<const llm_graph_result *, std::set<int>> est_chain_by_graph;

    ~llama_loopserve_prefill_state();
};

struct llama_memory_context_i;
llama_loopserve_prefill_cfg llama_loopserve_prefill_graph_cfg(const llama_context &          lctx,
                                                              const llama_ubatch &           ubatch,
                                                              const llama_memory_context_i * mctx);

// graph side: the attention output ([n_embd_v*n_head, n_tokens], like build_attn_mha) of
// the sparse path, or nullptr when this layer/ubatch keeps the stock path
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
                                           int                       il);

// context side, around the graph compute of each ubatch (llama_context::process_ubatch)
void llama_loopserve_prefill_ubatch_begin(llama_context & lctx);
void llama_loopserve_prefill_ubatch_end(llama_context &          lctx,
                                        const llama_ubatch &     ubatch,
                                        const llm_graph_result * res,
                                        int64_t                  t_start_us);
// at the end of a decode call (and before statistics are read): waits for the device and
// adds up the statistics rows of the sparse ubatches
void llama_loopserve_prefill_fold(llama_context & lctx);
