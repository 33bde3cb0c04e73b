// loopserve-edge: what it needs of llama_kv_cache. The methods are declared in
// llama-kv-cache.h (patches 0005, 0006 and 0007) and defined here: the cells, heads and
// stream map they work on are private to the cache.

#include "llama-context.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"
#include "llama-loopserve.h"

#include <algorithm>
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
    llama_kv_cache * caches[2];
    loopserve_caches(ctx, caches);
    if (caches[0] == nullptr || seq_id < 0 || (uint32_t) seq_id >= caches[0]->get_n_seq_max() || n < 0 ||
        (n > 0 && pos == nullptr)) {
        return -1;
    }

    std::vector<llama_pos> sorted(pos, pos + n);
    std::sort(sorted.begin(), sorted.end());

    const int32_t removed = (int32_t) caches[0]->loopserve_seq_rm_positions(seq_id, sorted.data(), (uint32_t) n);
    if (caches[1] != nullptr) {
        caches[1]->loopserve_seq_rm_positions(seq_id, sorted.data(), (uint32_t) n);
    }
    return removed;
}

int32_t llama_loopserve_seq_compact_positions(llama_context * ctx, llama_seq_id seq_id, llama_pos p0) {
    llama_kv_cache * caches[2];
    loopserve_caches(ctx, caches);
    if (caches[0] == nullptr || seq_id < 0 || (uint32_t) seq_id >= caches[0]->get_n_seq_max() || p0 < 0) {
        return -1;
    }
    if (!ctx->get_memory()->get_can_shift()) {
        return -2;
    }

    // the full-attention cache holds every position of the sequence: rank them
    std::vector<llama_pos> old_pos;
    for (const auto & pc : caches[0]->get_cells(seq_id).seq_pos_get(seq_id)) {
        old_pos.push_back(pc.first);
    }
    std::vector<llama_pos> new_pos(old_pos.size());
    for (size_t k = 0; k < new_pos.size(); ++k) {
        new_pos[k] = p0 + (llama_pos) k;
    }
    if (old_pos == new_pos) {
        return 0;
    }

    const int32_t moved =
        caches[0]->loopserve_seq_remap_positions(seq_id, old_pos.data(), new_pos.data(), (uint32_t) old_pos.size());
    if (moved < 0) {
        return -1;
    }
    // the sliding-window cache holds the same positions or fewer: the same map
    if (caches[1] != nullptr && caches[1]->loopserve_seq_remap_positions(seq_id, old_pos.data(), new_pos.data(),
                                                                         (uint32_t) old_pos.size()) < 0) {
        return -1;
    }

    // re-rotate the keys now (the K-shift graph): a state saved before the next decode would
    // otherwise hold the new positions with keys rotated for the old ones
    ctx->memory_update(false);
    return moved;
}
