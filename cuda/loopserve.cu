// loopserve-edge: CUDA kernels of the vertical-slash sparse prefill ops. Semantics are
// those of the CPU reference (ggml/src/ggml-cpu/loopserve.cpp); see ggml-loopserve.h.
//
// - vs_scores: one thread per (output index, KV head), summing over rows and query heads.
// - vs_estimate: the estimation's softmax and these sums fused (loopserve-estimate.cu).
// - select: a radix search on the scores' bits per (KV head, kind) (loopserve-select.cu).
// - sparse attention: f16 or q8_0 K/V (both the same type, V in rows) on sm_80+ go to the
//   tensor-core kernel (loopserve-attn-mma.cu); everything else to the SIMT kernel here, the
//   first version, kept for f32 or mixed K/V types, transposed V and older GPUs. It runs
//   one block per (block of 64 query rows, KV head); a warp owns one row at a time for all
//   query heads of the group (each K/V row is read once per row for the group). The key
//   set is walked without materialising it: offset i of the ascending slash list owns the
//   keys [lo - s_i, min(hi - s_i, lo - s_{i-1} - 1)], which are disjoint across i, so the
//   union of the diagonals' ranges needs no merge; then the vertical columns that no range
//   covers (binary search in the slash list). Online softmax in f32, 32 keys per step (one
//   per lane).

#include "loopserve.cuh"
#include "loopserve-attn.cuh"
#include "ggml-loopserve.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#define LS_MAX_GQA 8
// warps per block: the group's queries of every warp sit in shared memory (<= 32 KiB)
template <int D> static constexpr __host__ __device__ int ls_attn_warps() { return D >= 256 ? 4 : 8; }

//
// vs_scores
//

static __global__ void ls_vs_scores_kernel(
        const float * p, const void * cells, bool cells_i64, float * dst,
        int64_t n_kv, int64_t n_rows, int64_t n_gqa, int64_t p_nb1, int64_t p_nb2, int64_t cell_mod) {
    const int64_t j = (int64_t) blockIdx.x*blockDim.x + threadIdx.x;
    const int64_t g = blockIdx.y;
    if (j >= n_kv) {
        return;
    }
    float vert = 0.0f, slash = 0.0f;
    for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t c = ls_cell(cells, cells_i64, r, cell_mod);
        const int64_t key = c - j; // slash offset j covers key c - j
        for (int64_t h = g*n_gqa; h < (g + 1)*n_gqa; ++h) {
            const float * pr = p + r*p_nb1 + h*p_nb2;
            vert += pr[j];
            if (key >= 0 && key < n_kv) {
                slash += pr[key];
            }
        }
    }
    dst[(2*g + 0)*n_kv + j] = vert;
    dst[(2*g + 1)*n_kv + j] = slash;
}

//
// sparse attention
//

template <ggml_type T>
static __device__ __forceinline__ float ls_load(const char * row, int d) {
    if constexpr (T == GGML_TYPE_F16) {
        return __half2float(((const half *) row)[d]);
    } else if constexpr (T == GGML_TYPE_F32) {
        return ((const float *) row)[d];
    } else {
        const block_q8_0 * b = (const block_q8_0 *) row + d/QK8_0;
        return __half2float(b->d) * (float) b->qs[d % QK8_0];
    }
}

static __device__ __forceinline__ float ls_load_any(ggml_type t, const char * base, int64_t nb0, int d) {
    switch (t) {
        case GGML_TYPE_F16:  return __half2float(*(const half *) (base + d*nb0));
        case GGML_TYPE_F32:  return *(const float *) (base + d*nb0);
        default:             return ls_load<GGML_TYPE_Q8_0>(base, d); // rows contiguous
    }
}



template <int D, ggml_type KT>
static __global__ void __launch_bounds__(ls_attn_warps<D>()*WARP_SIZE)
ls_sparse_attn_kernel(const ls_attn_args a) {
    constexpr int DPL = D / WARP_SIZE; // V dims per lane
    constexpr int NW  = ls_attn_warps<D>();
    __shared__ float sq[NW][LS_MAX_GQA][D];

    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int64_t b = blockIdx.x, g = blockIdx.y;
    const int64_t r0 = b*a.block_q, r1 = min(a.n_tokens, r0 + a.block_q);
    const int n_gqa = (int) a.n_gqa;

    // block cell range (every warp computes it)
    int64_t lo = INT64_MAX, hi = -1;
    for (int64_t r = r0 + lane; r < r1; r += WARP_SIZE) {
        const int64_t c = ls_cell(a.cells, a.cells_i64, r, a.cell_mod);
        lo = min(lo, c);
        hi = max(hi, c);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        lo = min(lo, (int64_t) __shfl_xor_sync(0xffffffff, (long long) lo, o));
        hi = max(hi, (int64_t) __shfl_xor_sync(0xffffffff, (long long) hi, o));
    }

    const int32_t * cols = a.sel + (2*g + 0)*a.sel_ld;
    const int32_t * offs = a.sel + (2*g + 1)*a.sel_ld;
    const int n_col = cols[0], n_off = offs[0];
    const char * kbase = a.k + g*a.k_nb2;
    const char * vbase = a.v + g*a.v_nb2;

    float stat_computed = 0.0f, stat_causal = 0.0f;

    for (int64_t r = r0 + warp; r < r1; r += NW) {
        const int64_t c = ls_cell(a.cells, a.cells_i64, r, a.cell_mod);
        for (int h = 0; h < n_gqa; ++h) {
            const float * qr = a.q + r*a.q_nb1 + (g*n_gqa + h)*a.q_nb2;
            for (int d = lane; d < D; d += WARP_SIZE) {
                sq[warp][h][d] = qr[d];
            }
        }
        __syncwarp();

        float M[LS_MAX_GQA], S[LS_MAX_GQA], acc[LS_MAX_GQA][DPL];
#pragma unroll
        for (int h = 0; h < LS_MAX_GQA; ++h) {
            M[h] = -INFINITY; S[h] = 0.0f;
#pragma unroll
            for (int t = 0; t < DPL; ++t) acc[h][t] = 0.0f;
        }
        int n_causal = 0;

        // one step: lane's key j (or -1) -> scores, online softmax, V accumulation
        auto step = [&](int64_t j) {
            float s[LS_MAX_GQA];
            bool ok = j >= 0;
            float mv = 0.0f;
            if (ok && a.mask) {
                const char * mr = a.mask + r*a.mask_nb1;
                mv = a.mask_f16 ? __half2float(((const half *) mr)[j]) : ((const float *) mr)[j];
                ok = mv != -INFINITY;
            } else if (ok) {
                ok = j <= c; // no mask: causal in cells
            }
            n_causal += j >= 0 && j <= c;
#pragma unroll
            for (int h = 0; h < LS_MAX_GQA; ++h) s[h] = 0.0f;
            if (ok) {
                const char * kr = kbase + j*a.k_nb1;
                for (int d = 0; d < D; ++d) {
                    const float kd = ls_load<KT>(kr, d);
#pragma unroll
                    for (int h = 0; h < LS_MAX_GQA; ++h) {
                        if (h < n_gqa) s[h] += kd*sq[warp][h][d];
                    }
                }
            }
#pragma unroll
            for (int h = 0; h < LS_MAX_GQA; ++h) {
                if (h >= n_gqa) break;
                float sv = s[h]*a.scale;
                if (a.softcap != 0.0f) sv = a.softcap*tanhf(sv);
                sv = ok ? sv + mv : -INFINITY;
                float mt = sv;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffff, mt, o));
                const float Mn = fmaxf(M[h], mt);
                if (Mn == -INFINITY) { s[h] = 0.0f; continue; }
                const float ms = expf(M[h] - Mn);
                M[h] = Mn;
                const float pr = ok ? expf(sv - Mn) : 0.0f;
                s[h] = pr;
                S[h] = S[h]*ms + warp_reduce_sum(pr);
#pragma unroll
                for (int t = 0; t < DPL; ++t) acc[h][t] *= ms;
            }
            // V: the 32 keys of this step one after another, lanes split the dims
            for (int l = 0; l < WARP_SIZE; ++l) {
                const int64_t jl = __shfl_sync(0xffffffff, (long long) j, l);
                const int okl = __shfl_sync(0xffffffff, (int) ok, l);
                if (!okl) continue;
                const char * vr = vbase + jl*a.v_nb1;
                float vd[DPL];
#pragma unroll
                for (int t = 0; t < DPL; ++t) vd[t] = ls_load_any(a.v_type, vr, a.v_nb0, lane + t*WARP_SIZE);
#pragma unroll
                for (int h = 0; h < LS_MAX_GQA; ++h) {
                    if (h >= n_gqa) break;
                    const float ph = __shfl_sync(0xffffffff, s[h], l);
#pragma unroll
                    for (int t = 0; t < DPL; ++t) acc[h][t] += ph*vd[t];
                }
            }
        };

        // 1. diagonal ranges: offset i owns [max(0, lo - s_i), min(hi - s_i, lo - s_{i-1} - 1, n_kv - 1)]
        for (int i0 = 0; i0 < n_off; i0 += WARP_SIZE) {
            const int i = i0 + lane;
            int64_t k0 = 0, len = 0;
            if (i < n_off) {
                const int64_t s = offs[1 + i];
                int64_t e = min(hi - s, a.n_kv - 1);
                if (i > 0) e = min(e, lo - (int64_t) offs[i] - 1);
                k0 = max(lo - s, (int64_t) 0);
                len = max(e - k0 + 1, (int64_t) 0);
            }
            // inclusive scan of len over the lanes
            int64_t incl = len;
#pragma unroll
            for (int o = 1; o < WARP_SIZE; o <<= 1) {
                const int64_t y = __shfl_up_sync(0xffffffff, (long long) incl, o);
                if (lane >= o) incl += y;
            }
            const int64_t tot = __shfl_sync(0xffffffff, (long long) incl, WARP_SIZE - 1);
            for (int64_t base = 0; base < tot; base += WARP_SIZE) {
                const int64_t ord = base + lane;
                // the entry e with incl[e-1] <= ord < incl[e]: bisection over the lanes
                int lo_l = 0, hi_l = WARP_SIZE - 1;
                while (lo_l < hi_l) {
                    const int mid = (lo_l + hi_l) / 2;
                    const int64_t im = __shfl_sync(0xffffffff, (long long) incl, mid);
                    if (im <= ord) lo_l = mid + 1; else hi_l = mid;
                }
                const int64_t ie = __shfl_sync(0xffffffff, (long long) incl, lo_l);
                const int64_t le = __shfl_sync(0xffffffff, (long long) len, lo_l);
                const int64_t ke = __shfl_sync(0xffffffff, (long long) k0, lo_l);
                step(ord < tot ? ke + (ord - (ie - le)) : -1);
            }
        }
        // 2. vertical columns no range covers
        for (int i0 = 0; i0 < n_col; i0 += WARP_SIZE) {
            int64_t j = -1;
            if (i0 + lane < n_col) {
                j = cols[1 + i0 + lane];
                const int e = ls_lower_bound(offs + 1, n_off, lo - j);
                if (e < n_off && offs[1 + e] <= hi - j) {
                    j = -1; // covered by a diagonal range
                }
            }
            step(j);
        }

        n_causal = warp_reduce_sum(n_causal);
        stat_computed += (float) n_causal;
        stat_causal += (float) (c + 1);

#pragma unroll
        for (int h = 0; h < LS_MAX_GQA; ++h) {
            if (h >= n_gqa) break;
            const float inv = S[h] == 0.0f ? 0.0f : 1.0f/S[h];
            float * out = a.dst + (g*n_gqa + h)*a.dst_nb1 + r*a.dst_nb2;
#pragma unroll
            for (int t = 0; t < DPL; ++t) out[lane + t*WARP_SIZE] = acc[h][t]*inv;
        }
        __syncwarp();
    }

    if (lane == 0) {
        for (int h = 0; h < n_gqa; ++h) {
            float * st = a.dst + (g*n_gqa + h)*a.dst_nb1 + a.n_tokens*a.dst_nb2;
            atomicAdd(st + 0, stat_computed);
            atomicAdd(st + 1, stat_causal);
        }
    }
}

template <int D>
static void ls_launch_attn_d(const ls_attn_args & a, ggml_type kt, dim3 grid, cudaStream_t st) {
    const dim3 block(ls_attn_warps<D>()*WARP_SIZE);
    switch (kt) {
        case GGML_TYPE_F16:  ls_sparse_attn_kernel<D, GGML_TYPE_F16> <<<grid, block, 0, st>>>(a); break;
        case GGML_TYPE_F32:  ls_sparse_attn_kernel<D, GGML_TYPE_F32> <<<grid, block, 0, st>>>(a); break;
        case GGML_TYPE_Q8_0: ls_sparse_attn_kernel<D, GGML_TYPE_Q8_0><<<grid, block, 0, st>>>(a); break;
        default: GGML_ABORT("loopserve: unsupported K type");
    }
}

size_t ls_smem_max(int device) {
    const size_t dev = ggml_cuda_info().devices[device].smpbo;
    const char * env = getenv("LOOPSERVE_CUDA_SMEM_MAX");
    if (env == nullptr || *env == '\0') {
        return dev;
    }
    char * end = nullptr;
    const unsigned long long v = strtoull(env, &end, 10);
    return *end == '\0' && v > 0 ? std::min<size_t>(dev, (size_t) v) : dev;
}

static bool ls_type_ok(ggml_type t) {
    return t == GGML_TYPE_F16 || t == GGML_TYPE_F32 || t == GGML_TYPE_Q8_0;
}

bool ggml_cuda_loopserve_supported(int device, const ggml_tensor * op) {
    switch ((ggml_loopserve_op) op->op_params[0]) {
        case GGML_LOOPSERVE_OP_VS_SCORES:
            return op->src[0]->type == GGML_TYPE_F32 && op->src[0]->nb[0] == sizeof(float) &&
                   op->src[0]->nb[1] % sizeof(float) == 0 && op->src[0]->nb[2] % sizeof(float) == 0;
        case GGML_LOOPSERVE_OP_SELECT:
            return ggml_is_contiguous(op->src[0]) && ls_select_smem_min() <= ls_smem_max(device);
        case GGML_LOOPSERVE_OP_VS_ESTIMATE:
            return ls_vs_estimate_supported(op, device) &&
                   op->src[0]->nb[1] % sizeof(float) == 0 && op->src[0]->nb[2] % sizeof(float) == 0 &&
                   op->src[1]->nb[1] % 16 == 0 && op->src[1]->nb[2] % 16 == 0;
        case GGML_LOOPSERVE_OP_SPARSE_ATTN: {
            const ggml_tensor * q = op->src[0];
            const ggml_tensor * k = op->src[1];
            const ggml_tensor * v = op->src[2];
            const int64_t D = k->ne[0];
            const bool v_rows = v->nb[0] == ggml_type_size(v->type);
            return (D == 64 || D == 128 || D == 256) && v->ne[0] == D &&
                   q->ne[2] / k->ne[2] <= LS_MAX_GQA && ls_type_ok(k->type) && ls_type_ok(v->type) &&
                   (v_rows || v->type != GGML_TYPE_Q8_0) && q->nb[1] % sizeof(float) == 0 &&
                   q->nb[2] % sizeof(float) == 0 && ggml_is_contiguous(op);
        }
    }
    return false;
}

void ggml_cuda_op_loopserve(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    cudaStream_t st = ctx.stream();
    switch ((ggml_loopserve_op) dst->op_params[0]) {
        case GGML_LOOPSERVE_OP_VS_SCORES: {
            const ggml_tensor * p = dst->src[0];
            const ggml_tensor * cells = dst->src[1];
            const int64_t n_kv = p->ne[0], n_head_kv = dst->ne[2];
            const dim3 grid((n_kv + 255)/256, n_head_kv);
            ls_vs_scores_kernel<<<grid, 256, 0, st>>>((const float *) p->data, cells->data,
                    cells->type == GGML_TYPE_I64, (float *) dst->data, n_kv, p->ne[1], p->ne[2]/n_head_kv,
                    p->nb[1]/sizeof(float), p->nb[2]/sizeof(float), dst->op_params[2]);
        } break;
        case GGML_LOOPSERVE_OP_SELECT:
            ls_select(ctx, dst);
            break;
        case GGML_LOOPSERVE_OP_VS_ESTIMATE:
            ls_vs_estimate(ctx, dst);
            break;
        case GGML_LOOPSERVE_OP_SPARSE_ATTN: {
            const ggml_tensor * q = dst->src[0];
            const ggml_tensor * k = dst->src[1];
            const ggml_tensor * v = dst->src[2];
            const ggml_tensor * mask = dst->src[3];
            const ggml_tensor * cells = dst->src[4];
            const ggml_tensor * sel = dst->src[5];
            ls_attn_args a;
            a.q = (const float *) q->data; a.k = (const char *) k->data; a.v = (const char *) v->data;
            a.mask = mask ? (const char *) mask->data : nullptr;
            a.cells = cells->data; a.sel = (const int32_t *) sel->data; a.dst = (float *) dst->data;
            a.n_kv = k->ne[1]; a.n_tokens = q->ne[1]; a.n_head = q->ne[2]; a.n_gqa = q->ne[2]/k->ne[2];
            a.sel_ld = sel->ne[0];
            a.q_nb1 = q->nb[1]/sizeof(float); a.q_nb2 = q->nb[2]/sizeof(float);
            a.k_nb1 = k->nb[1]; a.k_nb2 = k->nb[2];
            a.v_nb0 = v->nb[0]; a.v_nb1 = v->nb[1]; a.v_nb2 = v->nb[2];
            a.mask_nb1 = mask ? mask->nb[1] : 0;
            a.dst_nb1 = dst->nb[1]/sizeof(float); a.dst_nb2 = dst->nb[2]/sizeof(float);
            a.cells_i64 = cells->type == GGML_TYPE_I64; a.mask_f16 = mask && mask->type == GGML_TYPE_F16;
            a.k_type = k->type; a.v_type = v->type;
            memcpy(&a.scale, &dst->op_params[1], sizeof(float));
            memcpy(&a.softcap, &dst->op_params[2], sizeof(float));
            if (a.softcap != 0.0f) {
                a.scale /= a.softcap;
            }
            a.block_q = dst->op_params[3];
            a.cell_mod = dst->op_params[4];
            // statistics row: zeroed, then accumulated atomically
            CUDA_CHECK(cudaMemsetAsync(a.dst + a.n_tokens*a.dst_nb2, 0, dst->nb[2], st));
            if (ls_sparse_attn_mma(a, k->ne[0], ctx.device, st)) {
                break;
            }
            const dim3 grid((a.n_tokens + a.block_q - 1)/a.block_q, k->ne[2]);
            switch (k->ne[0]) {
                case 64:  ls_launch_attn_d<64> (a, k->type, grid, st); break;
                case 128: ls_launch_attn_d<128>(a, k->type, grid, st); break;
                case 256: ls_launch_attn_d<256>(a, k->type, grid, st); break;
                default: GGML_ABORT("loopserve: unsupported head size");
            }
        } break;
    }
    CUDA_CHECK(cudaGetLastError());
}
