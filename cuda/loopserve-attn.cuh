#pragma once

// loopserve-edge: what the sparse prefill kernels share (loopserve.cu: SIMT attention for any
// K/V type and the other ops; loopserve-attn-mma.cu: tensor-core attention, f16 or q8_0 K/V;
// loopserve-estimate.cu: the fused estimation).

#include "../common.cuh"

struct ls_attn_args {
    const float * q; const char * k; const char * v; const char * mask;
    const void * cells; const int32_t * sel; float * dst;
    int64_t n_kv, n_tokens, n_head, n_gqa;
    int64_t sel_ld; // sel's row length: n_sel + 1 <= n_kv + 1 (a reused selection is shorter)
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

// tensor-core and async-copy instructions of the mma kernels (sm_80; older archs compile the
// kernels to stubs the host never launches)
static __device__ __forceinline__ void ls_mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef AMPERE_MMA_AVAILABLE
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    NO_DEVICE_CODE;
#endif
}

static __device__ __forceinline__ void ls_ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef AMPERE_MMA_AVAILABLE
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#else
    NO_DEVICE_CODE;
#endif
}

static __device__ __forceinline__ void ls_ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef AMPERE_MMA_AVAILABLE
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#else
    NO_DEVICE_CODE;
#endif
}

// N (4, 8 or 16) bytes global -> shared; zero-filled when !ok (16: past L1, .cg, as only
// whole 16-byte copies may)
template <int N>
static __device__ __forceinline__ void ls_cp_async(uint32_t dst, const void * src, bool ok) {
    static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef AMPERE_MMA_AVAILABLE
    if constexpr (N == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" :: "r"(dst), "l"(src), "n"(N), "r"(ok ? N : 0));
    }
#else
    NO_DEVICE_CODE;
#endif
}

static __device__ __forceinline__ uint32_t ls_pack_half2(float x, float y) {
    const half2 h = __floats2half2_rn(x, y);
    return *(const uint32_t *) &h;
}

// A warp's 16 rows of Q as the A fragments of m16n8k16, prescaled and rounded to f16 like
// ggml's flash attention: row(i) is the lane's fragment row lane/4 + 8*i, zero where !ok[i]
// (a function, not two pointers kept live: registers are tight at head dim 128)
template <int D, typename R>
static __device__ __forceinline__ void ls_mma_load_q(uint32_t (&qa)[D/16][4], const bool (&ok)[2], R row,
                                                     float scale, int lane) {
#pragma unroll
    for (int ks = 0; ks < D/16; ++ks) {
#pragma unroll
        for (int part = 0; part < 4; ++part) {
            const int i = part & 1;
            const int d = ks*16 + (part >> 1)*8 + 2*(lane % 4);
            float x = 0.0f, y = 0.0f;
            if (ok[i]) {
                const float * qr = row(i);
                x = qr[d]*scale;
                y = qr[d + 1]*scale;
            }
            qa[ks][part] = ls_pack_half2(x, y);
        }
    }
}

// S = Q K^T for a tile of 64 keys in shared memory (rows of RH halves from address ks_s):
// B fragments of two k-steps per ldmatrix.x4
template <int D, int RH>
static __device__ __forceinline__ void ls_mma_qk(float (&S)[8][4], const uint32_t (&qa)[D/16][4], uint32_t ks_s,
                                                 int lane) {
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        S[t][0] = S[t][1] = S[t][2] = S[t][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < D/16; ks += 2) {
            uint32_t kb[4];
            const int key = t*8 + lane % 8, d = ks*16 + (lane / 8)*8;
            ls_ldmatrix_x4(kb, ks_s + (key*RH + d)*sizeof(half));
            ls_mma_16816(S[t], qa[ks], kb[0], kb[1]);
            ls_mma_16816(S[t], qa[ks + 1], kb[2], kb[3]);
        }
    }
}

// a mask value from a 4-byte word that cp.async brought (f32, or the f16 pair holding it:
// half 0 or 1 picks the value)
static __device__ __forceinline__ float ls_mask_word(uint32_t w, bool f16, int half) {
    return !f16 ? __uint_as_float(w) : __half2float(__ushort_as_half((unsigned short) (w >> 16*half)));
}

// Runs the tensor-core kernel if it covers these inputs (f16 K and V with 16-byte aligned
// rows of head dim 64, 128 or 256, sm_80 or newer, its shared memory within the device's
// limit); false leaves the work to the SIMT kernel.
bool ls_sparse_attn_mma(const ls_attn_args & a, int64_t D, int device, cudaStream_t st);

// The fused estimation (loopserve-estimate.cu): f16 K of head dim 64/128/256, sm_80+, where
// its CTA's shared memory (which grows with the head dim, the rows and a mask) fits the device.
bool ls_vs_estimate_supported(const ggml_tensor * op, int device);
void ls_vs_estimate(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// The shared memory a block of these kernels may take on the device: what it offers with
// opt-in (99 KiB on consumer GPUs of sm_86 and sm_89, 227 KiB on an H100), or less where the
// environment's LOOPSERVE_CUDA_SMEM_MAX says (bytes; read at each call). With 101376 a large GPU
// launches what a consumer one would, so its tests cover those configurations.
size_t ls_smem_max(int device);

// The select op (loopserve-select.cu), and the shared memory a block of it needs at the least:
// 64 KiB, more than GPUs before sm_70 give a block (48 KiB); there the CPU selects.
void ls_select(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
size_t ls_select_smem_min();
