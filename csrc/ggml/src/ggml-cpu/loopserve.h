#pragma once

// loopserve-edge: CPU implementation of GGML_OP_LOOPSERVE (ggml-loopserve.h)

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

#ifdef __cplusplus
}
#endif
