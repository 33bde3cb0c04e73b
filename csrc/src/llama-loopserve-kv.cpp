// loopserve-edge: what it needs of llama_kv_cache. The methods are declared in
// llama-kv-cache.h (patches 0005 to 0008) and defined here: the cells, heads, tensors and
// stream map they work on are private to the cache.

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"
#include "llama-loopserve-impl.h"
#include "llama-loopserve.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <vector>

uint32_t llama_kv_cache::loopserve_seq_rm_positions(llama_seq_id seq_id, const llama_pos * pos, uint32_t n) {
    GGML_ASSERT(seq_id >= 0 && (size_t) seq_id < seq_to_stream.size());
    if (other) {  // as seq_rm: a mirrored cache follows its owner
        return 0;
    }

    auto & cells = v_cells[seq_to_stream[seq_id]];
    auto & head  = v_heads[seq_to_stream[seq_id]];

    // collect first: removing edits the (position, cell) set being walked
    std::vector<uint32_t> idxs;
    uint32_t              j = 0;
    for (const auto & [p, i] : cells.seq_pos_get(seq_id)) {
        while (j < n && pos[j] < p) {
            j++;
        }
        if (j == n) {
            break;
        }
        if (pos[j] == p) {
            idxs.push_back(i);
        }
    }

    uint32_t new_head = cells.size();
    for (uint32_t i : idxs) {
        if (cells.seq_rm(i, seq_id)) {
            new_head = std::min(new_head, i);
        }
    }
    if (new_head != cells.size() && new_head < head) {
        head = new_head;
    }

    return (uint32_t) idxs.size();
}

uint32_t llama_kv_cache::loopserve_n_kv_hold(uint32_t n_kv, uint32_t n_pad, size_t n_tokens) const {
    // A dialogue cut back to its budget every interval tokens falls below a padding step at each
    // cut and climbs back above it at the next token (budget 2048, interval 128: 2304 -> 2048 ->
    // 2304). Each change of n_kv changes the decode graph's shape, and on CUDA ggml replays a
    // captured graph only after two calls of one shape, so the steps after every cut ran without
    // it. Held, n_kv costs at most n_pad masked cells more; a larger drop still shrinks it.
    // LOOPSERVE_N_KV_HOLD=0 turns the hold off (read at every ubatch: benchmarks/decode.py
    // compares both in one process).
    // Only a one-token ubatch (a decode step) is held: that is where the hold was measured to
    // pay and to change nothing but rounding. An input's first ubatch held at the n_kv the last
    // dialogue ended with (budget 512: 768 where 512 were in use) replied otherwise than full
    // attention on the H200 in 117 of 240 first replies (session 29; the CPU was not affected),
    // and a batch of several dialogues' tokens was never measured held.
    const char * env  = std::getenv("LOOPSERVE_N_KV_HOLD");
    const bool   hold = n_tokens == 1 && (env == nullptr || std::strcmp(env, "0") != 0);
    if (hold && n_kv < loopserve_n_kv_last && n_kv + n_pad >= loopserve_n_kv_last &&
        loopserve_n_kv_last <= get_size()) {
        n_kv = loopserve_n_kv_last;
    }
    loopserve_n_kv_last = n_kv;
    return n_kv;
}

int32_t llama_kv_cache::loopserve_seq_remap_positions(llama_seq_id      seq_id,
                                                      const llama_pos * old_pos,
                                                      const llama_pos * new_pos,
                                                      uint32_t          n) {
    GGML_ASSERT(seq_id >= 0 && (size_t) seq_id < seq_to_stream.size());
    if (other) {  // a mirrored cache follows its owner
        return 0;
    }

    auto & cells = v_cells[seq_to_stream[seq_id]];

    // collect first: pos_add edits the (position, cell) set being walked. A cell that
    // another sequence shares would move for both: refuse before changing anything.
    std::vector<std::pair<uint32_t, llama_pos>> moves;  // (cell, shift)
    uint32_t                                    j = 0;
    for (const auto & [p, i] : cells.seq_pos_get(seq_id)) {
        while (j < n && old_pos[j] < p) {
            j++;
        }
        if (j == n) {
            break;
        }
        if (old_pos[j] == p && new_pos[j] != p) {
            if (cells.seq_count(i) != 1) {
                return -1;
            }
            moves.emplace_back(i, new_pos[j] - p);
        }
    }

    for (const auto & [i, d] : moves) {
        cells.pos_add(i, d);
    }

    return (int32_t) moves.size();
}

int32_t llama_kv_cache::loopserve_seq_keep_per_head(llama_context *                lctx,
                                                    llama_seq_id                   seq_id,
                                                    const std::vector<uint32_t> &  head_src,
                                                    const std::vector<uint32_t> &  dst,
                                                    const std::vector<llama_pos> & pos) {
    GGML_ASSERT(seq_id >= 0 && (size_t) seq_id < seq_to_stream.size());
    // V stored transposed would need a gather along the cells of each row: not done
    if (other || v_trans) {
        return -2;
    }
    const uint32_t strm   = seq_to_stream[seq_id];
    auto &         cells  = v_cells[strm];
    const size_t   n_keep = dst.size();

    // f16 rows move exactly (through f32); q8_0 and q4_0 ones are dequantized and quantized
    // again, which gives back the same blocks (a block's largest magnitude sets its scale and
    // comes back as the same extreme level); a head's part of a row must be whole blocks
    const auto movable = [](const ggml_tensor * t, int64_t d) {
        return (t->type == GGML_TYPE_F16 || t->type == GGML_TYPE_Q8_0 || t->type == GGML_TYPE_Q4_0) &&
               d % ggml_blck_size(t->type) == 0;
    };
    size_t n_heads = 0;
    for (const auto & layer : layers) {
        if (!movable(layer.k, hparams.n_embd_head_k(layer.il)) || !movable(layer.v, hparams.n_embd_head_v(layer.il))) {
            return -2;
        }
        n_heads += hparams.n_head_kv(layer.il);
    }
    if (head_src.size() != n_heads * n_keep || pos.size() != n_keep || n_keep == 0) {
        return -1;
    }

    // 1. move the rows: first those in a device's memory, through a graph (if it fails,
    //    nothing has moved), then those in host memory, by bytes.
    const auto on_host = [](const ggml_tensor * t) {
        return t->data != nullptr && t->buffer != nullptr && ggml_backend_buffer_is_host(t->buffer);
    };
    const int64_t        t0    = ggml_time_us();
    ggml_backend_sched_t sched = lctx->get_sched();
    ggml_backend_sched_synchronize(sched);  // nothing queued may still read or write them
    int64_t t_sync = ggml_time_us(), t_alloc = t_sync, t_set = t_sync, t_dev = t_sync;
    bool    any_device = false;
    for (const auto & layer : layers) {
        any_device = any_device || !on_host(layer.k_stream[strm]) || !on_host(layer.v_stream[strm]);
    }

    //    In a device's memory: per layer, one get_rows of every KV head's part of the K
    //    (then V) rows at that head's kept cells (a view with the heads outermost, indexed per
    //    head), one set_rows into the destination cells, all in one graph on the cache's backend
    //    (the sources are read before anything is written: set_rows waits for them). A pair per
    //    KV head instead was 512 small ops and 128 uploads a cut for the 1B shape.
    if (any_device) {
        ggml_backend_sched_reset(sched);
        llm_graph_result * res = lctx->get_gf_res_reserve();
        res->reset();
        ggml_context * ctx = res->get_ctx();
        ggml_cgraph *  gf  = res->get_gf();

        ggml_tensor * dst_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) n_keep);
        ggml_set_input(dst_idx);
        ggml_tensor * src_idx = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, (int64_t) n_keep, (int64_t) n_heads);
        ggml_set_input(src_idx);
        size_t h = 0;
        for (const auto & layer : layers) {
            const int64_t n_head_kv = hparams.n_head_kv(layer.il);
            ggml_tensor * idx =
                ggml_view_2d(ctx, src_idx, (int64_t) n_keep, n_head_kv, src_idx->nb[1], h * src_idx->nb[1]);
            for (auto [t, d] : {
                     std::pair{ layer.k_stream[strm], hparams.n_embd_head_k(layer.il) },
                     std::pair{ layer.v_stream[strm], hparams.n_embd_head_v(layer.il) }
            }) {
                if (on_host(t)) {
                    continue;  // moved below
                }
                // [d, cells, heads]: row j of head hh is the head's part of cell j
                ggml_tensor * part =
                    ggml_view_3d(ctx, t, d, t->ne[1], n_head_kv, t->nb[1], ggml_row_size(t->type, d), 0);
                ggml_tensor * rows = ggml_get_rows(ctx, part, idx);
                ggml_build_forward_expand(gf, ggml_set_rows(ctx, part, rows, dst_idx));
            }
            h += n_head_kv;
        }
        if (!ggml_backend_sched_alloc_graph(sched, gf)) {
            lctx->loopserve_graph_ran();
            return -3;
        }
        t_alloc = ggml_time_us();
        static_assert(sizeof(uint32_t) == sizeof(int32_t), "cell indices are read as I32");
        ggml_backend_tensor_set(dst_idx, dst.data(), 0, ggml_nbytes(dst_idx));
        ggml_backend_tensor_set(src_idx, head_src.data(), 0, ggml_nbytes(src_idx));
        t_set         = ggml_time_us();
        const bool ok = lctx->graph_compute(gf, false) == GGML_STATUS_SUCCESS;
        if (loopserve_trace_cuts()) {
            ggml_backend_sched_synchronize(sched);  // the device's time, not the launch's
        }
        lctx->loopserve_graph_ran();                // the scheduler's allocation is this graph's now
        t_dev = ggml_time_us();
        if (!ok) {
            return -3;
        }
    }

    //    K/V in host memory (the CPU backend) move by bytes: a head's part of a row is whole
    //    blocks, so a copy is exact for every movable type, and it skips get_rows/set_rows's
    //    conversions through f32 (a cut of the default model's 90 heads x 512 cells on 2 cores
    //    took ~10 ms through the graph). Each head's rows are gathered before any is written: a
    //    destination may be a later source of the same head.
    std::vector<uint8_t> rows_tmp;
    size_t               h0 = 0;
    for (const auto & layer : layers) {
        const int64_t n_head_kv = hparams.n_head_kv(layer.il);
        for (auto [t, d] : {
                 std::pair{ layer.k_stream[strm], hparams.n_embd_head_k(layer.il) },
                 std::pair{ layer.v_stream[strm], hparams.n_embd_head_v(layer.il) }
        }) {
            if (!on_host(t)) {
                continue;  // moved above
            }
            const size_t part = ggml_row_size(t->type, d);
            uint8_t *    base = (uint8_t *) t->data;
            rows_tmp.resize(n_keep * part);
            for (int64_t hh = 0; hh < n_head_kv; ++hh) {
                const uint32_t * src = head_src.data() + (h0 + hh) * n_keep;
                for (size_t j = 0; j < n_keep; ++j) {
                    memcpy(rows_tmp.data() + j * part, base + (size_t) src[j] * t->nb[1] + hh * part, part);
                }
                for (size_t j = 0; j < n_keep; ++j) {
                    memcpy(base + (size_t) dst[j] * t->nb[1] + hh * part, rows_tmp.data() + j * part, part);
                }
            }
        }
        h0 += n_head_kv;
    }

    const int64_t t_host = ggml_time_us();

    // 2. the cells: every cell of the sequence is emptied, then the destinations hold it again
    //    at their new positions (a position is the latest of the cell's heads' tokens, so every
    //    new token still comes after all of them); pos_set records no shift
    std::vector<uint32_t> all;
    for (const auto & pc : cells.seq_pos_get(seq_id)) {
        all.push_back(pc.second);
    }
    uint32_t new_head = cells.size();
    for (uint32_t i : all) {
        cells.seq_rm(i, seq_id);
        new_head = std::min(new_head, i);
    }
    for (size_t j = 0; j < n_keep; ++j) {
        cells.pos_set(dst[j], pos[j]);
        cells.seq_add(dst[j], seq_id);
    }
    auto & head = v_heads[strm];
    if (new_head < head) {
        head = new_head;
    }
    if (loopserve_trace_cuts()) {
        fprintf(stderr, "loopserve cut move: sync %.3f alloc %.3f set %.3f device %.3f host %.3f cells %.3f ms\n",
                (t_sync - t0) / 1e3, (t_alloc - t_sync) / 1e3, (t_set - t_alloc) / 1e3, (t_dev - t_set) / 1e3,
                (t_host - t_dev) / 1e3, (ggml_time_us() - t_host) / 1e3);
    }
    return (int32_t) (all.size() - n_keep);
}

int32_t llama_kv_cache::loopserve_value_norms(const std::vector<uint32_t> & idx,
                                              llama_seq_id                  seq_id,
                                              float *                       out) const {
    GGML_ASSERT(seq_id >= 0 && (size_t) seq_id < seq_to_stream.size());
    if (v_trans) {  // a head's V row is spread over the cells' columns
        return -2;
    }
    const uint32_t strm = seq_to_stream[seq_id];
    const size_t   n    = idx.size();
    if (n == 0) {
        return 0;
    }
    const auto [lo_it, hi_it] = std::minmax_element(idx.begin(), idx.end());
    const uint32_t lo         = *lo_it;
    const uint32_t hi         = *hi_it;

    // one read per layer of the rows lo..hi (a superset of the sequence's cells where other
    // dialogues' cells sit between them), then each head's part dequantized by its to_float
    std::vector<uint8_t> raw;
    std::vector<float>   row;
    size_t               h = 0;
    for (const auto & layer : layers) {
        const ggml_tensor * t         = layer.v_stream[strm];
        const int64_t       d         = hparams.n_embd_head_v(layer.il);
        const int64_t       n_head_kv = hparams.n_head_kv(layer.il);
        const auto *        traits    = ggml_get_type_traits(t->type);
        if (traits->to_float == nullptr || d % ggml_blck_size(t->type) != 0) {
            return -2;
        }
        raw.resize((size_t) (hi - lo + 1) * t->nb[1]);
        ggml_backend_tensor_get(t, raw.data(), (size_t) lo * t->nb[1], raw.size());
        row.resize((size_t) d);
        const size_t part = ggml_row_size(t->type, d);
        for (int64_t hh = 0; hh < n_head_kv; ++hh) {
            float * o = out + (h + hh) * n;
            for (size_t i = 0; i < n; ++i) {
                traits->to_float(raw.data() + (size_t) (idx[i] - lo) * t->nb[1] + hh * part, row.data(), d);
                double ss = 0.0;
                for (int64_t e = 0; e < d; ++e) {
                    ss += (double) row[e] * row[e];
                }
                o[i] = (float) std::sqrt(ss);
            }
        }
        h += n_head_kv;
    }
    return (int32_t) n;
}

bool llama_kv_cache::loopserve_cells_causal(const llama_ubatch & ubatch, uint32_t n_kv) const {
    if (ubatch.n_seqs_unq != 1 || ubatch.seq_id_unq == nullptr || swa_type != LLAMA_SWA_TYPE_NONE) {
        return false;
    }
    const llama_seq_id s     = ubatch.seq_id_unq[0];
    const auto &       cells = v_cells[seq_to_stream[s]];
    llama_pos          prev  = -1;
    bool               tail  = false;
    for (uint32_t j = 0; j < std::min(n_kv, cells.size()); ++j) {
        if (cells.is_empty(j)) {
            tail = true;
            continue;
        }
        if (tail || cells.seq_count(j) != 1 || !cells.seq_has(j, s) || cells.pos_get(j) <= prev) {
            return false;
        }
        prev = cells.pos_get(j);
    }
    return true;
}

// Whether an eviction cut removes its positions from the sliding-window cache too. By default
// it does not: the window layers (Gemma 3: five of every six) attend to the last n_swa positions
// only, their cache holds about that many cells whatever is cut (llama.cpp drops older ones), so
// a cut there saves no memory and only leaves holes in the window the next tokens attend to.
// The cut is for the full-attention layers, which hold the whole history. LOOPSERVE_SWA_CUT=1
// cuts both alike, as before (read at every cut: a benchmark compares both in one process).
static bool loopserve_swa_cut() {
    const char * env = std::getenv("LOOPSERVE_SWA_CUT");
    return env != nullptr && std::strcmp(env, "0") != 0;
}

// The caches a sequence's cells live in: the full-attention one, and the sliding-window one
// of an interleaved model (nullptr otherwise); both nullptr without a KV cache.
static void loopserve_caches(llama_context * ctx, llama_kv_cache * caches[2]) {
    llama_memory_i * mem = ctx->get_memory();
    caches[0] = caches[1] = nullptr;
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        caches[0] = kv;
    } else if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        caches[0] = iswa->get_base();
        caches[1] = iswa->get_swa();
    }
}

int32_t llama_loopserve_seq_rm_positions(llama_context * ctx, llama_seq_id seq_id, const llama_pos * pos, int32_t n) {
    llama_loopserve_scores_flush(ctx);  // saved rows are scored by the cells they saw
    llama_kv_cache * caches[2];
    loopserve_caches(ctx, caches);
    if (caches[0] == nullptr || seq_id < 0 || (uint32_t) seq_id >= caches[0]->get_n_seq_max() || n < 0 ||
        (n > 0 && pos == nullptr)) {
        return -1;
    }

    std::vector<llama_pos> sorted(pos, pos + n);
    std::sort(sorted.begin(), sorted.end());

    const int32_t removed = (int32_t) caches[0]->loopserve_seq_rm_positions(seq_id, sorted.data(), (uint32_t) n);
    if (caches[1] != nullptr && loopserve_swa_cut()) {
        caches[1]->loopserve_seq_rm_positions(seq_id, sorted.data(), (uint32_t) n);
    }
    return removed;
}

// Whether a sequence's positions can be compacted: every cache re-rotates its keys (RoPE).
// llama.cpp shifts no interleaved cache whose window part is window-sized
// (llama_kv_cache_iswa::get_can_shift): a context shift would bring into the window positions
// that cache no longer holds. Compaction keeps the window the next tokens see whole (below),
// which takes a plain sliding window (a chunked one would change its chunks).
static bool loopserve_can_compact(llama_context * ctx, llama_kv_cache * caches[2]) {
    if (caches[0] == nullptr || !caches[0]->get_can_shift()) {
        return false;
    }
    if (caches[1] == nullptr || ctx->get_memory()->get_can_shift()) {
        return true;
    }
    return caches[1]->get_can_shift() && ctx->get_model().hparams.swa_type == LLAMA_SWA_TYPE_STANDARD;
}

int32_t llama_loopserve_can_compact_positions(llama_context * ctx) {
    llama_kv_cache * caches[2];
    loopserve_caches(ctx, caches);
    return loopserve_can_compact(ctx, caches) ? 1 : 0;
}

int32_t llama_loopserve_seq_compact_positions(llama_context * ctx, llama_seq_id seq_id, llama_pos p0) {
    llama_loopserve_scores_flush(ctx);  // saved rows are scored by the cells they saw
    llama_kv_cache * caches[2];
    loopserve_caches(ctx, caches);
    if (caches[0] == nullptr || seq_id < 0 || (uint32_t) seq_id >= caches[0]->get_n_seq_max() || p0 < 0) {
        return -1;
    }
    if (!loopserve_can_compact(ctx, caches)) {
        return -2;
    }

    const auto seq_positions = [seq_id](llama_kv_cache * kv) {
        std::vector<llama_pos> pos;
        for (const auto & pc : kv->get_cells(seq_id).seq_pos_get(seq_id)) {
            pos.push_back(pc.first);
        }
        return pos;
    };
    const std::vector<llama_pos> full    = seq_positions(caches[0]);
    std::vector<llama_pos>       old_pos = full;
    if (caches[1] != nullptr) {
        // the window cache holds the positions the next tokens' window layers attend to, cut
        // from the full-attention cache or not (cuts leave the window its window): they are
        // ranked with the full-attention cache's, so the window stays whole and at its
        // distances; the older ones the window cache still holds are masked for every later
        // token, and consecutive new positions leave them no place: they go
        const std::vector<llama_pos> window = seq_positions(caches[1]);
        const llama_pos next = std::max(full.empty() ? -1 : full.back(), window.empty() ? -1 : window.back()) + 1;
        const auto &    hp   = ctx->get_model().hparams;
        std::vector<llama_pos> seen, gone;
        for (const llama_pos p : window) {
            (llama_hparams::is_masked_swa(hp.n_swa, hp.swa_type, p, next) ? gone : seen).push_back(p);
        }
        caches[1]->loopserve_seq_rm_positions(seq_id, gone.data(), (uint32_t) gone.size());
        old_pos.clear();
        std::set_union(full.begin(), full.end(), seen.begin(), seen.end(), std::back_inserter(old_pos));
    }
    std::vector<llama_pos> new_pos(old_pos.size());
    for (size_t k = 0; k < new_pos.size(); ++k) {
        new_pos[k] = p0 + (llama_pos) k;
    }
    if (old_pos == new_pos) {
        return 0;
    }

    // a monotone map: each cache's cells keep their order
    const int32_t moved =
        caches[0]->loopserve_seq_remap_positions(seq_id, old_pos.data(), new_pos.data(), (uint32_t) old_pos.size());
    if (moved < 0) {
        return -1;
    }
    if (caches[1] != nullptr && caches[1]->loopserve_seq_remap_positions(seq_id, old_pos.data(), new_pos.data(),
                                                                         (uint32_t) old_pos.size()) < 0) {
        return -1;
    }

    // re-rotate the keys now (the K-shift graph): a state saved before the next decode would
    // otherwise hold the new positions with keys rotated for the old ones
    ctx->memory_update(false);
    return moved;
}

int32_t llama_loopserve_seq_keep_per_head(llama_context * ctx,
                                          llama_seq_id    seq_id,
                                          const int32_t * sel,
                                          int32_t         n_keep) {
    const int64_t t0 = ggml_time_us();
    llama_loopserve_scores_flush(ctx);  // saved rows are scored by the cells they saw
    const int64_t    t_flush = ggml_time_us();
    llama_kv_cache * caches[2];
    loopserve_caches(ctx, caches);
    if (caches[0] == nullptr || seq_id < 0 || (uint32_t) seq_id >= caches[0]->get_n_seq_max() || sel == nullptr ||
        n_keep <= 0) {
        return -1;
    }

    // the sequence's cells in position order, each its own (a shared cell would move for both)
    const llama_kv_cells & cells = caches[0]->get_cells(seq_id);
    std::vector<uint32_t>  cell;
    std::vector<llama_pos> old_pos;
    for (const auto & pc : cells.seq_pos_get(seq_id)) {
        if (cells.seq_count(pc.second) != 1) {
            return -1;
        }
        old_pos.push_back(pc.first);
        cell.push_back(pc.second);
    }
    if ((size_t) n_keep > cell.size()) {
        return -1;
    }

    int32_t n_heads = 0;
    for (int32_t il = 0; il < (int32_t) llama_model_n_layer(&ctx->get_model()); ++il) {
        n_heads += llama_loopserve_scores_n_head_kv(ctx, il);
    }
    // each head's cells: ascending indices into the sequence's cells. A destination cell's
    // position is the latest of its heads' tokens: the cells are in position order, so that is
    // the position of the highest index in column j (one gather per column instead of a
    // position lookup per head and column: ~0.5 ms a cut at the 1B shape's 128 x 2048)
    std::vector<uint32_t> head_src((size_t) n_heads * n_keep);  // head-major
    std::vector<int32_t>  top(n_keep, -1);
    const int32_t         n_cell = (int32_t) cell.size();
    for (int32_t h = 0; h < n_heads; ++h) {
        const int32_t * row  = sel + (size_t) h * n_keep;
        uint32_t *      src  = head_src.data() + (size_t) h * n_keep;
        int32_t         prev = -1;
        for (int32_t j = 0; j < n_keep; ++j) {
            const int32_t k = row[j];
            if (k <= prev || k >= n_cell) {
                return -1;
            }
            prev   = k;
            src[j] = cell[k];
            top[j] = std::max(top[j], k);
        }
    }
    std::vector<llama_pos> pos(n_keep);
    for (int32_t j = 0; j < n_keep; ++j) {
        pos[j] = old_pos[top[j]];
    }
    // the kept rows go to the sequence's lowest cells: a packed sequence stays packed, so no
    // packing pass is needed after the cut
    std::vector<uint32_t> slots(cell);
    std::sort(slots.begin(), slots.end());
    const std::vector<uint32_t> dst(slots.begin(), slots.begin() + n_keep);

    const int64_t t_index = ggml_time_us();
    const int32_t freed   = caches[0]->loopserve_seq_keep_per_head(ctx, seq_id, head_src, dst, pos);
    const int64_t t_move  = ggml_time_us();
    if (freed >= 0) {
        // the scores of each head follow its tokens; the freed cells start over
        llama_loopserve_scores_moved(*ctx, seq_id, head_src, dst,
                                     std::vector<uint32_t>(slots.begin() + n_keep, slots.end()));
        if (loopserve_trace_cuts()) {
            fprintf(stderr, "loopserve cut: flush %.3f index %.3f move %.3f scores %.3f ms (%d heads x %d cells)\n",
                    (t_flush - t0) / 1e3, (t_index - t_flush) / 1e3, (t_move - t_index) / 1e3,
                    (ggml_time_us() - t_move) / 1e3, n_heads, n_keep);
        }
        if (caches[1] != nullptr && loopserve_swa_cut()) {
            // sliding-window layers mask by each cell's true position: with LOOPSERVE_SWA_CUT
            // their cache is cut cell-wise, keeping the tokens at the moved cells' positions (the
            // latest token of each); by default it keeps its window whole
            std::vector<llama_pos> gone;
            std::set_difference(old_pos.begin(), old_pos.end(), pos.begin(), pos.end(), std::back_inserter(gone));
            caches[1]->loopserve_seq_rm_positions(seq_id, gone.data(), (uint32_t) gone.size());
        }
    }
    return freed;
}

int32_t llama_loopserve_value_norms(llama_context * ctx, llama_seq_id seq_id, float * out, int64_t n_max) {
    llama_kv_cache * caches[2];
    loopserve_caches(ctx, caches);
    if (caches[0] == nullptr || seq_id < 0 || (uint32_t) seq_id >= caches[0]->get_n_seq_max()) {
        return -1;
    }
    // the order of llama_loopserve_scores_get_heads: the sequence's cells by position
    std::vector<uint32_t> idx;
    for (const auto & pc : caches[0]->get_cells(seq_id).seq_pos_get(seq_id)) {
        idx.push_back(pc.second);
    }
    int64_t n_heads = 0;
    for (int32_t il = 0; il < (int32_t) llama_model_n_layer(&ctx->get_model()); ++il) {
        n_heads += llama_loopserve_scores_n_head_kv(ctx, il);
    }
    const int32_t n = (int32_t) idx.size();
    if (out == nullptr || n_heads * n > n_max) {
        return n;
    }
    return caches[0]->loopserve_value_norms(idx, seq_id, out);
}
