// loopserve-edge: what it needs of llama_kv_cache. The two methods are declared in
// llama-kv-cache.h (patches 0005 and 0006) and defined here: the cells, heads and stream
// map they work on are private to the cache.

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

int32_t llama_loopserve_seq_rm_positions(llama_context * ctx, llama_seq_id seq_id, const llama_pos * pos, int32_t n) {
    llama_memory_i * mem       = ctx->get_memory();
    llama_kv_cache * caches[2] = { nullptr, nullptr };
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        caches[0] = kv;
    } else if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        caches[0] = iswa->get_base();
        caches[1] = iswa->get_swa();
    }
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
