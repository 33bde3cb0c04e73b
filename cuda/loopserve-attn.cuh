#pragma once

// loopserve-edge: what the two sparse attention kernels share (loopserve.cu: SIMT, any
// K/V type; loopserve-attn-mma.cu: tensor cores, f16 K/V).

#include "../common.cuh"

struct ls_attn_args {
    const float * q; const char * k; const char * v; const char * mask;
    const void * cells; const int32_t * sel; float * dst;
    int64_t n_kv, n_tokens, n_head, n_gqa;
    int64_t q_nb1, q_nb2, k_nb1, k_nb2, v_nb0, v_nb1, v_nb2, mask_nb1; // q in floats, others in bytes
    int64_t dst_nb1, dst_nb2; // in floats
    bool cells_i64, mask_f16;
    ggml_type k_type, v_type;
    float scale, softcap;
    int block_q;
    int64_t cell_mod;
};

static __device__ __forceinline__ int64_t ls_cell(const void * cells, bool i64, int64_t i, int64_t mod) {
    const int64_t c = i64 ? ((const int64_t *) cells)[i] : (int64_t) ((const int32_t *) cells)[i];
    return c % mod;
}

// first index i in [0, n) with a[i] >= v (a ascending)
static __device__ __forceinline__ int ls_lower_bound(const int32_t * a, int n, int64_t v) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (a[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// exclusive scan of one value per thread, block-wide
static __device__ int ls_block_exscan(int v, int * sh, int * total) {
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    int x = v;
#pragma unroll
    for (int o = 1; o < WARP_SIZE; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffff, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == WARP_SIZE - 1) {
        sh[warp] = x;
    }
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < (int) blockDim.x / WARP_SIZE; ++w) {
        before += w < warp ? sh[w] : 0;
        all += sh[w];
    }
    *total = all;
    return before + x - v;
}

// Runs the tensor-core kernel if it covers these inputs (f16 K and V with rows of 16-byte
// aligned head dim 64 or 128, sm_80 or newer); false leaves the work to the SIMT kernel.
bool ls_sparse_attn_mma(const ls_attn_args & a, int64_t D, int cc, cudaStream_t st);
