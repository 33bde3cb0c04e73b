// loopserve-edge: each sequence's cells in position order, for batch-invariant attention.
//
// With batch-invariant attention the CPU's flash attention (ggml_cpu_loopserve_fa_row) sums a
// query's visible cells block by block; the sums are the same alone and on a busy server only
// if the cells come in the same order. Append-only placement (patch 0009) keeps a sequence's
// cells in position order in the full cache, but a sliding-window cache reuses the cells that
// fell out of a window wherever they are (a ring shared by every sequence), so there a window's
// cells sit in an order that follows what else the pool held. The row therefore reads the
// order from an input of the graph: the cache's first n_kv cells grouped by sequence, each
// group in position order, and for each cell the range of its group, so that a row finds its
// own group from any cell it sees and walks nothing else.

#include "ggml-backend.h"
#include "ggml-loopserve.h"
#include "llama-graph.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"
#include "llama-loopserve-impl.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

// out [3 * n_kv]: [0, n_kv) the non-empty cells, grouped by sequence, each group by position;
// [n_kv, 2 n_kv) and [2 n_kv, 3 n_kv) the first and one past the last index into that list of
// each cell's group (0 and 0 for an empty cell). The cells keep each sequence's (position,
// cell) pairs in order, so the groups are read off, not sorted. A cell of several sequences (a
// prefix shared by seq_cp) would belong to several groups: then every non-empty cell is one
// group, by position, which is still the order of each row's cells (a row sees one sequence's).
void llama_kv_cache::loopserve_cell_order(uint32_t strm, uint32_t n_kv, int32_t * out) const {
    const llama_kv_cells & cells = v_cells[strm];
    GGML_ASSERT(n_kv <= cells.size());
    int32_t * order = out;
    int32_t * lo    = out + n_kv;
    int32_t * hi    = out + 2 * (size_t) n_kv;
    std::fill(lo, lo + n_kv, 0);
    std::fill(hi, hi + n_kv, 0);

    int32_t n      = 0;
    bool    shared = false;
    for (llama_seq_id s = 0; s < LLAMA_MAX_SEQ && !shared; ++s) {
        const int32_t g0 = n;
        for (const auto & [pos, c] : cells.seq_pos_get(s)) {
            if (c >= n_kv) {
                continue;
            }
            if (hi[c] != 0) {  // in an earlier group too
                shared = true;
                break;
            }
            hi[c]      = -1;
            order[n++] = (int32_t) c;
        }
        for (int32_t j = g0; j < n && !shared; ++j) {
            lo[order[j]] = g0;
            hi[order[j]] = n;
        }
    }
    if (shared) {
        n = 0;
        for (uint32_t i = 0; i < n_kv; ++i) {
            if (!cells.is_empty(i)) {
                order[n++] = (int32_t) i;
            }
        }
        std::sort(order, order + n, [&](int32_t a, int32_t b) {
            const llama_pos pa = cells.pos_get(a);
            const llama_pos pb = cells.pos_get(b);
            return pa != pb ? pa < pb : a < b;
        });
        for (uint32_t i = 0; i < n_kv; ++i) {
            lo[i] = 0;
            hi[i] = cells.is_empty(i) ? 0 : n;
        }
    }
}

// The part of a ubatch's memory context that a (sliding-window or full-attention) layer
// attends over; nullptr for other memories.
static const llama_kv_cache_context * loopserve_layer_cache_context(const llama_memory_context_i * mctx, bool swa) {
    if (!swa) {
        return loopserve_full_cache_context(mctx);
    }
    auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx);
    return iswa != nullptr ? iswa->get_swa() : nullptr;
}

// I32 [3 * n_kv + 1], llama_kv_cache::loopserve_cell_order's and a number of its own (the CPU
// row keeps what it found in a list until the number changes), set before each ubatch.
class llm_graph_input_loopserve_order : public llm_graph_input_i {
  public:
    llm_graph_input_loopserve_order(const llama_kv_cache_context * kvc, bool swa) : swa(swa), kvc(kvc) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        static std::atomic<int32_t> n_made{ 0 };
        buf.resize(ggml_nelements(order));
        kvc->loopserve_cell_order(buf.data());
        buf.back() = ++n_made;
        ggml_backend_tensor_set(order, buf.data(), 0, ggml_nbytes(order));
    }

    bool can_reuse(const llm_graph_params & params) override {
        kvc = loopserve_layer_cache_context(params.mctx, swa);
        return kvc != nullptr && kvc->loopserve_position_order() && 3 * (int64_t) kvc->get_n_kv() + 1 == order->ne[0];
    }

    const bool    swa;
    ggml_tensor * order = nullptr;

  private:
    const llama_kv_cache_context * kvc;
    std::vector<int32_t>           buf;
};

void llama_loopserve_fa_cell_order(const llm_graph_context & g, ggml_tensor * fa, int il) {
    const bool                     swa = il >= 0 && g.hparams.is_swa(il);
    const llama_kv_cache_context * kvc = loopserve_layer_cache_context(g.mctx, swa);
    const ggml_tensor *            k   = fa->src[1];
    // one stream, K straight from the cache (not a training pass's own rows)
    if (kvc == nullptr || !kvc->loopserve_position_order() || k->ne[3] != 1 || k->ne[1] != (int64_t) kvc->get_n_kv()) {
        return;
    }
    // a cache in device memory is attended there, by kernels that tile by cell: no list to make
    const ggml_tensor * root = k;
    while (root->view_src != nullptr) {
        root = root->view_src;
    }
    if (root->buffer == nullptr || !ggml_backend_buffer_is_host(root->buffer)) {
        return;
    }
    ggml_tensor * order = nullptr;
    for (auto & inp : g.res->inputs) {
        auto * o = dynamic_cast<llm_graph_input_loopserve_order *>(inp.get());
        if (o != nullptr && o->swa == swa) {
            order = o->order;
            break;
        }
    }
    if (order == nullptr) {
        auto inp   = std::make_unique<llm_graph_input_loopserve_order>(kvc, swa);
        inp->order = ggml_new_tensor_1d(g.ctx0, GGML_TYPE_I32, 3 * k->ne[1] + 1);
        ggml_set_input(inp->order);
        ggml_set_name(inp->order, swa ? "loopserve_order_swa" : "loopserve_order");
        order = inp->order;
        g.res->add_input(std::move(inp));
    }
    // read by the CPU's flash attention (ggml_cpu_loopserve_fa_row, the stock loop); others ignore it
    fa->src[GGML_LOOPSERVE_FA_ORDER_SRC] = order;
}
