#pragma once

// loopserve-edge: CUDA implementation of GGML_OP_LOOPSERVE (ggml/include/ggml-loopserve.h),
// compiled into ggml-cuda from ggml/src/ggml-cuda/loopserve/ (patch 0004).

#include "../common.cuh"

void ggml_cuda_op_loopserve(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// what the kernels cover on that device (by its compute capability and shared memory);
// anything else runs on the CPU backend (the scheduler falls back)
bool ggml_cuda_loopserve_supported(int device, const ggml_tensor * op);
