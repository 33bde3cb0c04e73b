#pragma once

// loopserve-edge additions to llama.cpp (https://arxiv.org/abs/2507.13681).
// Everything here is an extension: stock llama.cpp behaviour is unchanged unless a
// llama_loopserve_* function is called.

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Version of this C API; the Python controller refuses a runtime with another major.
LLAMA_API int32_t llama_loopserve_api_version(void);

// Hash of the patches/ and cuda/ trees this runtime was built from (hex string), so
// the build can tell whether the installed runtime is current.
LLAMA_API const char * llama_loopserve_patch_hash(void);

// Number of KV cells that hold seq_id (in the full-attention cache for models that
// also have a sliding-window cache). -1 if the context has no KV cache.
LLAMA_API int32_t llama_loopserve_seq_n_cells(struct llama_context * ctx, llama_seq_id seq_id);

// Bytes allocated for the context's KV memory (K and V of every layer, every cache part,
// on every backend), as llama.cpp's memory breakdown counts them. -1 without a KV cache.
LLAMA_API int64_t llama_loopserve_kv_bytes(struct llama_context * ctx);

// Batch-invariant attention on the CPU. The CPU backend's flash attention splits a lone
// query's keys among the threads (from 512 cells in view) and tiles a long batch's keys;
// either changes the order of a dialogue's sums with the number of cells in view and with
// the batch it is decoded in. With `on`, every query goes over the keys in cell order,
// skipping the masked ones (ggml's reference path, which also leaves ops unfused), and new
// tokens go after the highest cell in use (patch 0009), so each sequence's cells stay in
// position order: a dialogue's logits are then the same alone or beside others. When fewer
// cells than a batch needs are left after the highest one in use (llama_loopserve_kv_tail),
// the caller repacks the pool (a state round trip of each sequence keeps its order);
// otherwise the search wraps to the lowest free cells. Saved query rows scored on the CPU
// (llama_loopserve_scores_flush) are then scored per sequence, against its own cells in
// position order, and added one row at a time, so that a dialogue's scores too are the same
// wherever its cells sit and however its rows were split between flushes. A sliding-window
// cache hands new tokens the cells that left any sequence's window (a ring), so there the
// query rows go over their sequence's cells in position order from a list
// the cache makes before each ubatch (patch 0014), in the full cache too (not with the
// environment's LOOPSERVE_FA_ORDER=0 when the switch is made: an ablation). Returns the number
// of CPU backends set (0: none in this context).
LLAMA_API int32_t llama_loopserve_set_batch_invariant(struct llama_context * ctx, bool on);

// Free cells after the highest cell in use in the full-attention cache; -1 without a KV cache.
LLAMA_API int32_t llama_loopserve_kv_tail(struct llama_context * ctx);

// The cells the last ubatch attended over in the full-attention cache (its n_kv: the cells in
// use padded to 256, held where a cut would shrink it by one such step or less, so that the
// decode graph keeps its shape through periodic cuts); 0 before any ubatch, -1 without a KV cache.
LLAMA_API int32_t llama_loopserve_kv_n_kv(struct llama_context * ctx);

//
// Observation-window attention scores
//
// While enabled, every llama_decode scores the KV cells with the attention that the
// last n_window tokens of the batch pay them (a batch of one token: that token). For
// each of those query rows and each scored layer the softmax probabilities over all
// cells (the same scale, mask, softcap, ALiBi and sinks as the model's attention) are
// summed over the query heads of each KV head group and over the window rows, and
// added to a per-cell accumulator. Scores accumulate over decode calls until
// llama_loopserve_scores_reset; disabling keeps what has been accumulated.
//
// What is scored:
// - layers that attend over the full cache; the sliding-window layers of an
//   interleaved cache (Gemma-3 style) are not scored;
// - ubatches that hold a single sequence, or several in batch order (the next token of
//   several dialogues decoded together): each row attends to its own sequence's cells only,
//   so each sequence's cells get its own rows' scores. Another ubatch mixing sequences is
//   decoded normally but adds nothing;
// - the window is the last n_window tokens in batch order, so it may span the last
//   ubatches of a batch that is larger than n_ubatch.
//
// Scores belong to cells: a cell that receives a new token through llama_decode or a
// state load starts again from 0, so a cell freed with llama_memory_seq_rm and reused
// never carries the old token's score. With a unified cache, a cell shared by several
// sequences (llama_memory_seq_cp) carries the scores of all of them; after seq_cp into
// another stream of a non-unified cache, reset the destination sequence.
//
// Disabled (the default) the decode graph is the stock one and nothing is allocated.
// Enabled, a scored ubatch adds per full-attention layer one reduction node over the
// window's probabilities (with flash attention also the window rows' Q K^T and softmax
// over all cells, as much as the layer's own Q K^T for a 1-token decode), and reads
// n_layer x n_head_kv x n_kv floats back to the host, where they are added up. The
// cost grows with n_kv: to score only a few tokens before each compression, enable
// scoring for just those decodes.

// Score the last n_window tokens of every decoded batch; 0 turns scoring off.
// Returns 0, or -1 if this context cannot be scored (no KV cache, a recurrent or
// hybrid memory, an encoder-decoder model, n_window < 0).
LLAMA_API int32_t llama_loopserve_scores_set(struct llama_context * ctx, int32_t n_window);

// The current window (0 = off).
LLAMA_API int32_t llama_loopserve_scores_window(struct llama_context * ctx);

// Saved queries. With flash attention the window rows' probabilities are not in the graph,
// so a scored decode computes them apart: per layer a few small nodes, then a copy of the
// scores to the host and a synchronize, which a one-token decode pays every step. With
// n_max > 0, a scored ubatch instead saves its window rows' queries (each scored layer's Q,
// in device memory beside the layer's K) together with their sequence and position, and
// llama_loopserve_scores_flush scores every saved row at once against the cache as it is
// then: the cells of the row's own sequence at positions up to the row's, which are the cells
// it attended to while nothing was removed or moved. The sums are the same as scoring each
// decode as it runs. Flushed first, automatically: every read of the scores and the
// llama_loopserve_ cell operations (removals, position compaction, head-wise cuts); a state
// load or llama_loopserve_scores_reset drops the saved rows of the sequences they cover; a
// ubatch whose rows do not fit beside the saved ones flushes before it runs. A caller that
// removes cells by other means (llama_memory_seq_rm) flushes first. Rows are saved only
// with flash attention over one stream, in a model without attention sinks or ALiBi;
// otherwise the decode scores them as it runs. n_max = 0 (the default) turns saving off,
// after a flush. Returns 0, or -1 if the context cannot be scored or the memory for the
// queries cannot be allocated (saving then stays off).
LLAMA_API int32_t llama_loopserve_scores_save_queries(struct llama_context * ctx, int32_t n_max);

// Score the saved rows now (see above). Returns the number of rows scored, or -1 if the
// scoring graph failed (the rows are dropped).
LLAMA_API int32_t llama_loopserve_scores_flush(struct llama_context * ctx);

// Rows saved and not yet scored.
LLAMA_API int32_t llama_loopserve_scores_n_saved(struct llama_context * ctx);

// Zero the accumulated scores of seq_id's cells and its row count; seq_id < 0: all
// sequences.
LLAMA_API void llama_loopserve_scores_reset(struct llama_context * ctx, llama_seq_id seq_id);

// Query rows accumulated for seq_id since its last reset (window rows of each scored
// ubatch). With it and the number of scored query heads (sum over scored layers of
// n_head), a sum converts to a mean probability.
LLAMA_API int64_t llama_loopserve_scores_n_rows(struct llama_context * ctx, llama_seq_id seq_id);

// The cells of seq_id in increasing position order: their positions and their scores
// summed over the scored layers and their KV heads (each KV head already sums its
// query heads and the window rows), i.e. the total probability mass the scored rows
// put on the cell across all scored query heads. Writes min(n, n_max) entries of pos
// and scores (either may be NULL) and returns n, the number of cells (the same as
// llama_loopserve_seq_n_cells); -1 on error.
LLAMA_API int32_t llama_loopserve_scores_get(struct llama_context * ctx,
                                             llama_seq_id           seq_id,
                                             llama_pos *            pos,
                                             float *                scores,
                                             int32_t                n_max);

// KV heads of layer il if that layer is scored, else 0 (a sliding-window layer, or il
// out of range).
LLAMA_API int32_t llama_loopserve_scores_n_head_kv(struct llama_context * ctx, int32_t il);

// Per KV head scores of layer il for the cells of seq_id, in the order of
// llama_loopserve_scores_get, laid out [n_head_kv][n] (head-major). Writes only when
// n <= n_max (n_head_kv * n floats) and returns n; -1 on error or an unscored layer.
LLAMA_API int32_t llama_loopserve_scores_get_layer(struct llama_context * ctx,
                                                   llama_seq_id           seq_id,
                                                   int32_t                il,
                                                   float *                scores,
                                                   int32_t                n_max);

// Every scored layer's per KV head scores in one call: [n_heads][n], the layers in
// order (each as llama_loopserve_scores_get_layer lays it out), n_heads the sum of
// llama_loopserve_scores_n_head_kv over all layers. Writes only when n_heads * n <= n_max
// and returns n; -1 on error.
LLAMA_API int32_t llama_loopserve_scores_get_heads(struct llama_context * ctx,
                                                   llama_seq_id           seq_id,
                                                   float *                scores,
                                                   int64_t                n_max);

// The inverse of llama_loopserve_scores_get_heads: seq_id's scores become `scores`
// ([n_heads][n], n the sequence's cells in position order) and its count of scored rows
// n_rows. For scores kept on the host through a state round trip (a dialogue swapped out of
// the pool and back, a repack), which a sequence state load starts at zero: put back, the sums
// go on from the same floats, as they would have without the round trip (added to the
// runtime's at each read instead, the order of the additions, and the last bits, changed).
// Returns n; -1 on error (n not the sequence's cell count, a model that cannot be scored).
LLAMA_API int32_t llama_loopserve_scores_set_heads(struct llama_context * ctx,
                                                   llama_seq_id           seq_id,
                                                   const float *          scores,
                                                   int64_t                n,
                                                   int64_t                n_rows);

// The L2 norm of the V row of every scored layer's KV heads at the cells of seq_id, laid
// out as llama_loopserve_scores_get_heads lays out the scores ([n_heads][n]), so that a
// score can be weighted by how much its token can move the output (VATP, CriticalKV).
// Writes only when n_heads * n <= n_max and returns n; -1 on error, -2 with V stored
// transposed (flash attention off) or of a type without a dequantizer.
LLAMA_API int32_t llama_loopserve_value_norms(struct llama_context * ctx,
                                              llama_seq_id           seq_id,
                                              float *                out,
                                              int64_t                n_max);

//
// Adaptive vertical-slash sparse prefill (LoopServe phase 1)
//
// While enabled, every prompt ubatch of at least n_min_tokens tokens runs, in each
// full-attention layer, inside the graph:
// 1. estimation: the ubatch's last last_q query rows attend to every KV cell (the
//    model's scale, softcap and mask);
// 2. per KV head (its query heads summed), the vertical score of each cell column and
//    the slash score of each diagonal offset (cell of the query - cell of the key);
// 3. per KV head and kind, the fewest top lines holding alpha of the mass, clamped to
//    [n_min, n_max] (n_max <= 0: no cap), plus the first n_sink columns and the offsets
//    0..n_local-1;
// 4. attention of every query row over the selected columns and the key ranges the
//    selected diagonals cover for its block of block_q rows, exact softmax over them
//    (block_q 0: 64 / the GQA ratio, at least 16, so a block of rows times a KV head's
//    query heads fills one tile of the CUDA kernel; a diagonal then costs about block_q
//    keys per block instead of 64).
// With alpha = 1 (and no cap) every column the last row sees is selected, which is the
// dense result. Decoding, shorter ubatches, sliding-window layers and models with ALiBi,
// attention sinks, a KQ bias or MLA keep the stock path. Disabled (the default) the
// graph is the stock one. KV cache types: f16, q8_0, f32 (others are refused).
// Coordinates are KV cells: for a prompt in consecutive cells they are positions.
struct llama_loopserve_prefill_params {
    float   alpha;
    int32_t last_q;
    int32_t n_min_vertical;
    int32_t n_max_vertical;
    int32_t n_min_slash;
    int32_t n_max_slash;
    int32_t n_sink;
    int32_t n_local;
    int32_t n_min_tokens;
    int32_t block_q;
    // >= 1: the selection estimated on one ubatch of an input also serves its next reuse - 1
    // ubatches (their own keys are reached through the diagonals and the local window); the
    // estimation then runs on one ubatch in reuse. Within one decode call, one sequence. 1: each
    // ubatch estimates its own.
    int32_t reuse;
};

LLAMA_API struct llama_loopserve_prefill_params llama_loopserve_prefill_default_params(void);

// Enable with params, or disable with NULL. Returns 0; -1 for invalid parameters or a
// context without a KV cache; -2 for an unsupported KV cache type.
LLAMA_API int32_t llama_loopserve_prefill_set(struct llama_context *                        ctx,
                                              const struct llama_loopserve_prefill_params * params);

// Time estimation, selection and attention separately: runs the graph in pieces (a sync at
// each sparse layer's scores, selection and attention node), so it slows prefill; for
// measurements.
// Refused (-1) when the context already has an eval callback or prefill was never set.
LLAMA_API int32_t llama_loopserve_prefill_set_profile(struct llama_context * ctx, bool profile);

struct llama_loopserve_prefill_stats {
    int32_t n_ubatch_sparse;       // ubatches that ran the sparse path
    int32_t n_ubatch_stock;        // prompt ubatches (> 1 token) that kept the stock path
    int64_t n_tokens_sparse;       // their tokens
    double  density;               // computed / causal (row, key) pairs, all sparse layers
    double  t_sparse_ms;           // wall time from a decode call's first sparse ubatch to its end
    double  t_estimate_ms;         // profile mode: estimation (the vertical and slash scores)
    double  t_attend_ms;           // profile mode: sparse attention
    int32_t n_ubatch_cell_causal;  // sparse ubatches whose KQ mask was causal in cells (the
                                   // GPU path then does without it)
    double  t_select_ms;           // profile mode: selection of the lines from the scores
    int32_t n_ubatch_reused;       // sparse ubatches that reused the previous one's selection
    int32_t n_layer_est_chain;     // their layers whose estimation on a GPU ran as stock ops (a
                                   // matrix product, softmax, sums), not the fused op: K not
                                   // f16, a head dim not 64/128/256, a GPU before sm_80, or the
                                   // op's shared memory more than the device gives a block
};

// Statistics since the last reset; returns 1 if the phase is enabled, else 0.
LLAMA_API int32_t llama_loopserve_prefill_stats_get(struct llama_context *                 ctx,
                                                    struct llama_loopserve_prefill_stats * out);

LLAMA_API void llama_loopserve_prefill_stats_reset(struct llama_context * ctx);

// Per layer since the last reset: (row, key) pairs computed with key cell <= the row's
// cell, and causal pairs (sum of cell + 1 over rows), each summed over query heads;
// their ratio is the layer's density (0/0 for stock layers). Writes min(n_layer, n_max)
// entries of each (either may be NULL) and returns n_layer.
LLAMA_API int32_t llama_loopserve_prefill_layer_pairs(struct llama_context * ctx,
                                                      double *               computed,
                                                      double *               causal,
                                                      int32_t                n_max);

// Test and benchmark entry point: run one op on host arrays (C order, outermost
// first) on the CPU or the first GPU backend. Returns 0, or -1 when the backend is
// missing or does not support the op.
struct llama_loopserve_op_test {
    int32_t         op;         // 0 vs_scores, 1 select, 2 sparse attention, 3 ggml_flash_attn_ext,
                                // 4 vs_estimate, 5 the chain vs_estimate replaces (mul_mat, soft_max, vs_scores)
    int32_t         gpu;        // 0: CPU backend, 1: first GPU backend
    int32_t         n_threads;  // CPU threads (0: 4)
    int32_t         n_iter;     // timed runs after one warm-up run (0: a single untimed run)
    int32_t         type_k;     // enum ggml_type of K and V (ops 2-5; 4 and 5 take no V)
    int32_t         type_v;
    int32_t         v_trans;    // op 2: V held transposed (f16/f32), as without flash attention
    int32_t         mask_f16;   // mask type f16 (op 3 always), else f32
    int32_t         dk, dv, n_kv, n_tokens, n_head, n_head_kv;
    int32_t         n_rows;     // op 0: rows of p
    float           scale, softcap;
    int32_t         block_q, cell_mod;
    float           alpha;
    int32_t         n_min_v, n_max_v, n_min_s, n_max_s, n_sink, n_local;
    const float *   q;       // [n_head][n_tokens][dk]
    const float *   k;       // [n_head_kv][n_kv][dk]
    const float *   v;       // [n_head_kv][n_kv][dv]
    const float *   mask;    // [n_tokens][n_kv] (0 / -INFINITY) or NULL
    const float *   p;       // op 0: [n_head][n_rows][n_kv]
    const float *   scores;  // op 1: [n_head_kv][2][n_kv]
    const int32_t * cells;   // [n_tokens] (op 0: [n_rows])
    const int32_t * sel;     // op 2: [n_head_kv][2][n_sel + 1]
    void *          out;     // ops 0, 4, 5: f32 [n_head_kv][2][n_kv]; op 1: i32 [n_head_kv][2][n_kv + 1];
                             // op 2: f32 [n_tokens + 1][n_head][dv]; op 3: f32 [n_tokens][n_head][dv]
    double          t_ms;    // out: mean wall time of one run (graph compute, synchronized)
    int32_t         n_sel;   // op 2: cells the selection was made over (<= n_kv; 0: n_kv)
};

LLAMA_API int32_t llama_loopserve_op_test_run(struct llama_loopserve_op_test * t);

//
// Bulk removal
//

// Remove seq_id from its KV cells at positions pos[0..n) (any order; positions the
// sequence does not hold are skipped), in every cache of the context (both halves of
// an interleaved sliding-window cache). Same effect as one llama_memory_seq_rm per
// position, but one pass over the sequence's cells: an eviction that drops scattered
// cells from a large context costs O(cells of the sequence), not O(n_ctx) per run.
// Returns the number of cells removed from the full-attention cache, or -1 if the
// context's memory is not a KV cache (recurrent, hybrid) or an argument is invalid.
LLAMA_API int32_t llama_loopserve_seq_rm_positions(struct llama_context * ctx,
                                                   llama_seq_id           seq_id,
                                                   const llama_pos *      pos,
                                                   int32_t                n);

// Give seq_id's cells, in position order, the consecutive positions p0, p0 + 1, ... and
// re-rotate their keys by the change (RoPE, llama.cpp's K-shift), before returning. After an
// eviction this closes the gaps the removed cells left, so that a sequence's positions stay as
// few as its cells however many tokens went through it (a model attends badly at positions
// beyond its trained context). An interleaved sliding-window model's two caches are numbered
// together: the window cache's positions that later tokens still see (cuts leave them there)
// are ranked with the full-attention cache's, so the window stays whole, and its older cells
// are dropped; the full-attention cache's new positions then have gaps where only the window
// holds a token (read them back with llama_loopserve_scores_get). Returns the number of
// full-attention cells that moved (0: already in place); -1 on bad arguments or a cell that
// another sequence shares; -2 if the positions cannot be shifted
// (llama_loopserve_can_compact_positions is 0).
LLAMA_API int32_t llama_loopserve_seq_compact_positions(struct llama_context * ctx, llama_seq_id seq_id, llama_pos p0);

// 1 if llama_loopserve_seq_compact_positions can renumber this context's sequences: every
// cache's keys can be re-rotated (RoPE; llama_memory_can_shift), and also for an interleaved
// model whose window cache is window-sized (swa_full off), which llama.cpp does not shift,
// where the window is a plain sliding one (compaction keeps it whole); else 0.
LLAMA_API int32_t llama_loopserve_can_compact_positions(struct llama_context * ctx);

// Head-wise KV compression: in each full-attention layer and each of its KV heads, keep that
// head's own n_keep of seq_id's cells. sel is [n_heads][n_keep], n_heads the KV heads of the
// scored layers in layer order (the rows of llama_loopserve_scores_get_heads), each row
// strictly ascending indices into the sequence's cells in position order (the order of
// llama_loopserve_scores_get). Each head's K and V rows of its kept cells move, on the cache's
// backend, into the sequence's n_keep lowest cells (a packed sequence stays packed); the others
// are freed. Keys keep the rotation of their own positions; the j-th kept cell takes the latest
// position among its heads' tokens (so causal masking holds for every later token), and the
// heads' scores move with their tokens. An interleaved sliding-window model's window cache is
// cut cell-wise to those positions (its layers mask by each cell's true position). Returns the
// number of cells freed; -1 on bad arguments or a cell shared with another sequence; -2 where
// this cannot be done: V stored transposed (flash attention off), K or V other than f16,
// q8_0 or q4_0 (whole blocks per head); -3 if the graph failed.
LLAMA_API int32_t llama_loopserve_seq_keep_per_head(struct llama_context * ctx,
                                                    llama_seq_id           seq_id,
                                                    const int32_t *        sel,
                                                    int32_t                n_keep);

// Budget allocation over a head-wise layout (PyramidKV / Ada-KV style): rows of scored heads
// hidden from their own head's attention. hidden is [n_rows][n] (n_rows: the rows of
// llama_loopserve_scores_get_heads), 1 = hidden, for the first n cells of seq_id in position
// order; every other row of seq_id's cells is shown. A hidden row keeps its token's K and V (a
// later call may show it again) and is still scored by the observation window; a cell that
// takes a new token, or is restored by a state load, shows all its rows. While any row is
// hidden, each scored layer attends per KV head, each with its own mask, and sparse prefill is
// off. hidden NULL or n 0: show all rows of seq_id's cells (seq_id < 0: of every cell). Returns
// 0; -1 on bad arguments; -2 without flash attention or with several KV streams.
LLAMA_API int32_t llama_loopserve_seq_hide(struct llama_context * ctx,
                                           llama_seq_id           seq_id,
                                           const uint8_t *        hidden,
                                           int32_t                n_rows,
                                           int32_t                n);

// The hidden rows of seq_id's cells as llama_loopserve_seq_hide lays them out ([n_rows][n],
// all n cells in position order): written when n_rows * n <= n_max. Returns n; -1 on error.
LLAMA_API int32_t llama_loopserve_seq_hidden(struct llama_context * ctx,
                                             llama_seq_id           seq_id,
                                             uint8_t *              out,
                                             int64_t                n_max);

// The choice of a head-wise cut, on the host (no context needed): for each of n_rows rows of
// n scores (row-major), the `budget` cells it keeps, as ascending indices into out
// [n_rows][budget]. Each row is smoothed first by the mean over `kernel` neighbouring cells
// (edges repeated, summed left to right in double precision); cells below `lo` and from `hi`
// on (the sinks and the recent cells) are always kept; of the rest the highest, and among
// those tied at the budget-th highest value, the latest cells. The controller's numpy choice
// (eviction.choose_keep_rows) is the same, rounding included. Rows run on up to n_threads
// threads. Returns 0; -1 on bad arguments (budget outside [lo + n - hi, n], a NaN score).
LLAMA_API int32_t llama_loopserve_select_rows(const float * scores,
                                              int32_t       n_rows,
                                              int32_t       n,
                                              int32_t       kernel,
                                              int32_t       lo,
                                              int32_t       hi,
                                              int32_t       budget,
                                              int32_t       n_threads,
                                              int32_t *     out);

#ifdef __cplusplus
}
#endif
