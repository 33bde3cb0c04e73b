#pragma once

// loopserve-edge: CPU implementation of GGML_OP_LOOPSERVE (ggml-loopserve.h)

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

void   ggml_compute_forward_loopserve(const struct ggml_compute_params * params, struct ggml_tensor * dst);
size_t ggml_cpu_loopserve_work_size(const struct ggml_tensor * node, int n_tasks);

#ifdef __cplusplus
}
#endif
