#pragma once

// loopserve-edge: CPU implementation of GGML_OP_LOOPSERVE (ggml-loopserve.h)

#include "ggml-backend.h"
#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

void   ggml_compute_forward_loopserve(const struct ggml_compute_params * params, struct ggml_tensor * dst);
size_t ggml_cpu_loopserve_work_size(const struct ggml_tensor * node, int n_tasks);

// The first i in [i0, n) whose f16 mask value is not -inf (n if none): flash attention's
// per-key loop skips a run of masked cells (other dialogues' in a shared pool) at once
int64_t ggml_cpu_loopserve_next_visible(const ggml_fp16_t * mask, int64_t i0, int64_t n);

// Flash attention's one-chunk path for query row ir = (iq1, iq2, iq3) of dst over cells [ic0, ic1)
// with f16 K and V: M, S and VKQ (DV floats) as that path's loop leaves them. Scores of a
// block of visible cells first, then their exp in SIMD, then V; the per-cell expf and f16
// accumulator of the stock loop took over a quarter of a 16-client server's attention time. The
// blocks follow the visible cells alone, so a row's result does not depend on the other
// rows of the batch or on the masked cells; with the cells' order as a source of dst
// (GGML_LOOPSERVE_FA_ORDER_SRC) they go in position order, so not on where the cells sit
// either. The rows the loop asks for next (up to ir1, a query's heads in a row) are computed
// with it, a block of K and V rows at a time for all of them, and handed out as they are asked
// for; each row's arithmetic is the same as alone. False where it does not apply (the stock loop
// runs, in cell order): other K/V types, head dims that are not whole SIMD steps, no SIMD f16
// loads.
bool ggml_cpu_loopserve_fa_row(const struct ggml_tensor * dst,
                               int64_t                    ir,
                               int64_t                    ir1,
                               int64_t                    iq1,
                               int64_t                    iq2,
                               int64_t                    iq3,
                               const ggml_fp16_t *        mask,
                               float                      slope,
                               int64_t                    ic0,
                               int64_t                    ic1,
                               float *                    M,
                               float *                    S,
                               float *                    VKQ);

// The stock loop's side of the same (K/V types the row above does not take): the visible cells
// of the mask row in [ic0, ic1), in the order of dst's batch-invariant list, n of them; nullptr
// without a list (every cell from ic0 in cell order). Valid until the thread's next call.
const int32_t * ggml_cpu_loopserve_fa_cells(const struct ggml_tensor * dst,
                                            const ggml_fp16_t *        mask,
                                            int64_t                    ic0,
                                            int64_t                    ic1,
                                            int64_t *                  n);

// Q4_1 weights (src0) times two or more Q8_1 rows (wdata, row_size bytes apart: src1 as
// ggml_compute_forward_mul_mat quantized it) in register tiles (loopserve-gemm.cpp), bit for
// bit what its vec_dot loop computes. Called by every thread after that function's barrier;
// false where it does not apply (other types, one row, batched products, no AVX2 and FMA,
// LOOPSERVE_Q4_1_GEMM=0): the vec_dot loop runs. LOOPSERVE_Q4_1_GEMM=256: 256-bit tiles only.
bool ggml_cpu_loopserve_mul_mat_q4_1(const struct ggml_compute_params * params,
                                     struct ggml_tensor *               dst,
                                     const void *                       wdata,
                                     size_t                             row_size);

// How many products ggml_cpu_loopserve_mul_mat_q4_1 has computed in this process (for the
// tests: that the tiles ran)
GGML_BACKEND_API uint64_t ggml_cpu_loopserve_gemm_q4_1_calls(void);

#ifdef __cplusplus
}
#endif
