// loopserve-edge: the fused estimation of the sparse prefill (GGML_LOOPSERVE_OP_VS_ESTIMATE,
// semantics in ggml-loopserve.h, reference in ggml-cpu/loopserve.cpp) for f16 K on sm_80+.
//
// The unfused chain writes the estimation rows' scores over every cell (at 128K and 32
// heads, 64 rows: 1 GiB of f32), reads and writes them again for the softmax and once more
// for the sums. Here the scores never leave the SM: a CTA of 4 warps owns 64 (row, head)
// rows of one KV head and a chunk of keys, computes Q K^T with mma.sync like the attention
// kernel, and
//   pass 1 (STATS): the rows' running maximum and sum of exponentials over the chunk;
//   combine:        the chunks' partials into each row's maximum and 1 / sum;
//   pass 2:         the probabilities, summed per key column (vertical) and per diagonal
//                   offset (slash) in shared memory, then added to the result atomically.
// K tiles of 64 keys are double buffered with cp.async (the keys of a chunk are contiguous).
// Chunks that need no masking (no mask, no softcap, every key at or below every row's cell:
// all but the last one or two at long lengths) run a lean variant of each pass.

#include "loopserve-attn.cuh"

#include <cstdint>

#define LS_EST_WARPS   4
#define LS_EST_THREADS (LS_EST_WARPS*WARP_SIZE)
#define LS_EST_ROWS    (LS_EST_WARPS*16)
#define LS_EST_KEYS    64     // keys of a tile
#define LS_EST_CHUNK   512    // keys of a CTA (more CTAs at short lengths; the partials are small)
#define LS_EST_SPAN    256    // query cell spread the shared slash sums allow (else global atomics)
#define LS_EST_SACC    (LS_EST_CHUNK + LS_EST_SPAN)

struct ls_est_args {
    const float * q; const char * k; const char * mask; const void * cells; float * dst;
    float2 * part;  // [n_head_kv][n_chunk][n_rows_pad]: (max, sum) per chunk, then (max, 1/sum) in chunk 0
    int64_t n_kv, n_rows, n_gqa, n_chunk, n_rows_pad;
    int64_t q_nb1, q_nb2, k_nb1, k_nb2, mask_nb1; // q in floats, others in bytes
    bool cells_i64, mask_f16;
    float scale, softcap;
    int64_t cell_mod;
};

static __host__ __device__ int ls_est_max_queries(int n_gqa) {
    return min(LS_EST_ROWS, LS_EST_ROWS/n_gqa + 1);
}

template <int D>
static size_t ls_est_smem_bytes(int n_gqa, bool stats, bool mask) {
    return 2*LS_EST_KEYS*(D + 8)*sizeof(half) + (mask ? 2*(size_t) ls_est_max_queries(n_gqa)*LS_EST_KEYS*sizeof(uint32_t) : 0) +
           (stats ? 0 : (LS_EST_WARPS*(LS_EST_CHUNK + LS_EST_SACC) + 2*LS_EST_ROWS)*sizeof(float)) + LS_EST_ROWS*sizeof(int);
}

// Pass 2 on a tile that needs no masking (every key below every row's cell, no mask, no
// softcap), with a power-of-two ratio G and the slash sums in shared memory: the general
// path's per-element mask, bounds and 64-bit offsets are most of its instructions, and at
// long contexts all tiles but the last few are such tiles. The sums are the warp's own
// (shared float atomics are compare-and-swap loops): a key column is the warp's once per
// chunk, so it is stored; a query's offsets repeat, so they are added, in 4/G rounds for
// G < 4, whose lanes (query q, column 2m) and (q + 2, 2m + 2) would meet on one offset.
template <int G>
static __device__ __forceinline__ void ls_est_pass2_tile(const float (&S)[8][4], const float (&M2)[2], const int (&sb)[2],
                                                         float * sacc, float * vacc, int lane) {
    constexpr int ROUNDS = G >= 4 ? 1 : 4/G;
    const bool lead = ((lane/4) & (G - 1)) == 0;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int col = t*8 + 2*(lane % 4) + c;
            float p0 = exp2f(S[t][c] - M2[0]);
            float p1 = exp2f(S[t][2 + c] - M2[1]);
            // a query's G heads are the lanes xor 4, .., 2G
#pragma unroll
            for (int o = 4; o < 4*G; o <<= 1) {
                p0 += __shfl_xor_sync(0xffffffff, p0, o);
                p1 += __shfl_xor_sync(0xffffffff, p1, o);
            }
            // the two rows' offsets can meet across lanes too: one store at a time
#pragma unroll
            for (int r = 0; r < ROUNDS; ++r) {
                if (lead && (lane % 4) % ROUNDS == r) {
                    sacc[sb[0] - col] += p0;
                }
                __syncwarp();
                if (lead && (lane % 4) % ROUNDS == r) {
                    sacc[sb[1] - col] += p1;
                }
                __syncwarp();
            }
            float v = p0 + p1;
#pragma unroll
            for (int o = 4*G; o < WARP_SIZE; o <<= 1) {
                v += __shfl_xor_sync(0xffffffff, v, o);
            }
            if (lane < 4) {
                vacc[col] = v;
            }
        }
    }
}

// FAST: the CTAs whose tiles all take the fast path (ls_est_pass2_tile; the others return),
// else the others: a kernel of its own, so that the general path's registers do not limit
// its occupancy
template <int D, bool STATS, bool FAST>
static __global__ void __launch_bounds__(LS_EST_THREADS)
ls_vs_estimate_kernel(const ls_est_args a) {
#ifndef AMPERE_MMA_AVAILABLE
    NO_DEVICE_CODE;
#else
    constexpr int RH = D + 8;
    constexpr int KT = LS_EST_KEYS;
    constexpr int NT = KT/8;
    constexpr int KS = D/16;
    constexpr float LOG2E = 1.4426950408889634f;

    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int n_gqa = (int) a.n_gqa;
    const int max_q = ls_est_max_queries(n_gqa);
    const int64_t chunk = blockIdx.x, g = blockIdx.z;
    const int row_cta = blockIdx.y*LS_EST_ROWS;
    const int n_rows = (int) (a.n_rows*n_gqa);
    const int q_first = row_cta / n_gqa;
    const int n_q = min(max_q, (int) a.n_rows - q_first);
    const int64_t j0 = chunk*LS_EST_CHUNK, j1 = min(a.n_kv, j0 + LS_EST_CHUNK);

    extern __shared__ __align__(16) char ls_smem[];
    half  * Ks = (half *) ls_smem;                          // 2 buffers
    uint32_t * Ms = (uint32_t *) (Ks + 2*KT*RH);            // with a mask: 2 buffers of [n_q][KT] mask words
    int   * q_cell = (int *) (Ms + (a.mask ? 2*max_q*KT : 0));
    float * vacc = (float *) (q_cell + LS_EST_ROWS);        // pass 2, per warp: per key of the chunk
    float * sacc = vacc + LS_EST_WARPS*LS_EST_CHUNK;        // per warp: per offset in [s_base, s_base + LS_EST_SACC)
    float * row_M = sacc + LS_EST_WARPS*LS_EST_SACC;
    float * row_I = row_M + LS_EST_ROWS;
    float * vacc_w = vacc + warp*LS_EST_CHUNK;
    float * sacc_w = sacc + warp*LS_EST_SACC;

    __shared__ int sh_lo, sh_hi;
    if (tid == 0) {
        sh_lo = INT32_MAX; sh_hi = -1;
    }
    __syncthreads();
    if (tid < n_q) {
        const int c = (int) ls_cell(a.cells, a.cells_i64, q_first + tid, a.cell_mod);
        q_cell[tid] = c;
        atomicMin(&sh_lo, c);
        atomicMax(&sh_hi, c);
    }

    int row_ql[2], row_m[2], row_x[2];
    bool row_ok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int rho = row_cta + warp*16 + lane/4 + 8*i;
        row_ok[i] = rho < n_rows;
        row_ql[i] = row_ok[i] ? rho/n_gqa - q_first : 0;
        row_m[i]  = row_ql[i]*KT;
        // f16 mask: the parity of the row's first half in its words (jt is even, so the
        // key's is col's); no mask: the row's cell (causal in cells), set below
    }
    // scores in log2 units from the start (the exponentials are exp2), except under a softcap
    uint32_t qa[KS][4];
    ls_mma_load_q<D>(qa, row_ok, [&](int i) {
        const int rho = row_cta + warp*16 + lane/4 + 8*i;
        return a.q + (rho/n_gqa)*a.q_nb1 + (g*n_gqa + rho % n_gqa)*a.q_nb2;
    }, a.softcap != 0.0f ? a.scale : a.scale*LOG2E, lane);

    const bool gqa_pow2 = n_gqa <= 8 && (n_gqa & (n_gqa - 1)) == 0;

    // pass 2: the rows' final maximum and 1 / sum; shared sums zeroed
    int64_t s_base = 0;
    bool s_shared = false;
    float Mr[2] = {-INFINITY, -INFINITY}, Ir[2] = {0.0f, 0.0f};
    float M2[2] = {INFINITY, INFINITY}; // exp2(s - M2) = exp2(s - M)/sum; +inf: the row adds nothing
    int sb[2] = {0, 0};                  // the row's cell - s_base
    if constexpr (!STATS) {
        if (tid < LS_EST_ROWS) {
            const float2 mi = a.part[(g*a.n_chunk)*a.n_rows_pad + row_cta + tid];
            row_M[tid] = mi.x;
            row_I[tid] = mi.y;
        }
        for (int i = tid; i < LS_EST_WARPS*(LS_EST_CHUNK + LS_EST_SACC); i += LS_EST_THREADS) {
            vacc[i] = 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = warp*16 + lane/4 + 8*i;
            Mr[i] = row_ok[i] ? row_M[r] : -INFINITY;
            Ir[i] = row_ok[i] ? row_I[r] : 0.0f;
            M2[i] = Ir[i] > 0.0f ? Mr[i] - log2f(Ir[i]) : INFINITY;
        }
        // offsets c - j of this chunk lie in [lo - j1 + 1, hi - j0]
        s_base = (int64_t) sh_lo - j1 + 1;
        s_shared = (int64_t) sh_hi - j0 - s_base + 1 <= LS_EST_SACC;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        row_x[i] = a.mask ? (int) (((uintptr_t) (a.mask + (q_first + row_ql[i])*a.mask_nb1) >> 1) & 1)
                          : q_cell[row_ql[i]];
        sb[i] = (int) (q_cell[row_ql[i]] - s_base);
    }
    // tiles with keys at or below every row's cell need no masking (see ls_est_pass2_tile)
    const bool fast = !a.mask && a.softcap == 0.0f && (STATS || (s_shared && gqa_pow2)) && j1 <= (int64_t) sh_lo + 1;
    if (fast != FAST) {
        return;
    }

    const char * kbase = a.k + g*a.k_nb2;
    const uint32_t Ks_s = (uint32_t) __cvta_generic_to_shared(Ks);
    const uint32_t Ms_s = (uint32_t) __cvta_generic_to_shared(Ms);
    auto load = [&](int64_t jt, int buf) {
        constexpr int CPR = D/8;
        for (int i = tid; i < KT*CPR; i += LS_EST_THREADS) {
            const int64_t j = jt + i/CPR;
            const int piece = i % CPR;
            ls_cp_async<16>(Ks_s + ((buf*KT + i/CPR)*RH + piece*8)*sizeof(half),
                            kbase + (j < j1 ? j : j0)*a.k_nb1 + piece*16, j < j1);
        }
        // the tile's mask values, also in flight: 4-byte words (for an f16 mask the aligned
        // pair holding the key's half, picked by the row's and the key's parities)
        const uint32_t Mb_s = Ms_s + buf*max_q*KT*sizeof(uint32_t);
        for (int i = tid; a.mask && i < n_q*KT; i += LS_EST_THREADS) {
            const int64_t j = jt + i % KT;
            const bool ok = j < j1;
            const char * mr = ok ? a.mask + (q_first + i/KT)*a.mask_nb1 : (const char *) a.q;
            const char * src = !ok ? mr : !a.mask_f16 ? mr + j*sizeof(float) :
                (const char *) ((uintptr_t) (mr + j*sizeof(half)) & ~(uintptr_t) 3);
            ls_cp_async<4>(Mb_s + i*sizeof(uint32_t), src, ok);
        }
        asm volatile("cp.async.commit_group;");
    };

    float M[2] = {-INFINITY, -INFINITY}, L[2] = {0.0f, 0.0f};
    float * dst_v = a.dst + (2*g + 0)*a.n_kv;
    float * dst_s = a.dst + (2*g + 1)*a.n_kv;

    load(j0, 0);
    int buf = 0;
    for (int64_t jt = j0; jt < j1; jt += KT, buf ^= 1) {
        if (jt + KT < j1) {
            load(jt + KT, buf ^ 1); // the buffer the previous tile used: freed by its closing barrier
            asm volatile("cp.async.wait_group 1;"); // the current tile's K and mask, not the next
        } else {
            asm volatile("cp.async.wait_group 0;");
        }
        __syncthreads();

        float S[NT][4];
        ls_mma_qk<D, RH>(S, qa, Ks_s + buf*KT*RH*sizeof(half), lane);
        if constexpr (FAST) {
            if constexpr (STATS) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    float mx = M[i];
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        mx = fmaxf(mx, fmaxf(S[t][2*i], S[t][2*i + 1]));
                    }
                    float sum = 0.0f;
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        sum += exp2f(S[t][2*i] - mx) + exp2f(S[t][2*i + 1] - mx);
                    }
                    L[i] = L[i]*exp2f(M[i] - mx) + sum; // M = -inf on the first tile: exp2 gives 0
                    M[i] = mx;
                }
            } else {
                const int sbt[2] = {sb[0] - (int) jt, sb[1] - (int) jt};
                float * vt = vacc_w + (jt - j0);
                switch (n_gqa) {
                    case 1: ls_est_pass2_tile<1>(S, M2, sbt, sacc_w, vt, lane); break;
                    case 2: ls_est_pass2_tile<2>(S, M2, sbt, sacc_w, vt, lane); break;
                    case 4: ls_est_pass2_tile<4>(S, M2, sbt, sacc_w, vt, lane); break;
                    default: ls_est_pass2_tile<8>(S, M2, sbt, sacc_w, vt, lane); break;
                }
            }
            __syncthreads(); // this buffer is reloaded two tiles on
            continue;
        }
        const uint32_t * Mb = Ms + buf*max_q*KT;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1, col = t*8 + 2*(lane % 4) + (e & 1);
                const float s = a.softcap != 0.0f ? a.softcap*tanhf(S[t][e])*LOG2E : S[t][e];
                const float m = jt + col >= j1 ? -INFINITY : !a.mask ? (jt + col <= row_x[i] ? 0.0f : -INFINITY) :
                    ls_mask_word(Mb[row_m[i] + col], a.mask_f16, (row_x[i] + col) & 1);
                S[t][e] = row_ok[i] && m != -INFINITY ? s + m*LOG2E : -INFINITY;
            }
        }

        if constexpr (STATS) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                float mx = -INFINITY;
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    mx = fmaxf(mx, fmaxf(S[t][2*i], S[t][2*i + 1]));
                }
                const float Mn = fmaxf(M[i], mx);
                if (Mn == -INFINITY) {
                    continue;
                }
                float sum = 0.0f;
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    sum += exp2f(S[t][2*i] - Mn) + exp2f(S[t][2*i + 1] - Mn);
                }
                L[i] = L[i]*exp2f(M[i] - Mn) + sum;
                M[i] = Mn;
            }
        } else {
#pragma unroll
            for (int t = 0; t < NT; ++t) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int col = t*8 + 2*(lane % 4) + c;
                    const int64_t j = jt + col;
                    float p[2];
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        p[i] = S[t][2*i + c] == -INFINITY ? 0.0f : exp2f(S[t][2*i + c] - Mr[i])*Ir[i];
                    }
                    // A query's heads are n_gqa consecutive fragment rows (rows lane/4 and
                    // lane/4 + 8): for a power-of-two ratio they are the lanes xor 4, 8, ..,
                    // summed first, so one atomic per query and column adds to its offset.
                    int o = 4;
                    if (gqa_pow2) {
                        for (; o < 4*n_gqa; o <<= 1) {
                            p[0] += __shfl_xor_sync(0xffffffff, p[0], o);
                            p[1] += __shfl_xor_sync(0xffffffff, p[1], o);
                        }
                    }
                    if (!gqa_pow2 || (lane/4) % n_gqa == 0) {
#pragma unroll
                        for (int i = 0; i < 2; ++i) {
                            if (p[i] != 0.0f) {
                                const int64_t off = (int64_t) q_cell[row_ql[i]] - j;
                                if (s_shared) {
                                    atomicAdd(&sacc_w[off - s_base], p[i]);
                                } else if (off >= 0 && off < a.n_kv) {
                                    atomicAdd(&dst_s[off], p[i]);
                                }
                            }
                        }
                    }
                    // the column over the warp's 16 rows: the remaining lanes with the same lane % 4
                    float v = p[0] + p[1];
                    for (; o < WARP_SIZE; o <<= 1) {
                        v += __shfl_xor_sync(0xffffffff, v, o);
                    }
                    if (lane < 4 && v != 0.0f) {
                        vacc_w[j - j0] = v;
                    }
                }
            }
        }
        __syncthreads(); // this buffer is reloaded two tiles on
    }

    if constexpr (STATS) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // the 4 lanes of a row saw other columns: combine their (max, sum)
            float m = M[i], l = L[i];
#pragma unroll
            for (int o = 1; o <= 2; o <<= 1) {
                const float mo = __shfl_xor_sync(0xffffffff, m, o), lo = __shfl_xor_sync(0xffffffff, l, o);
                const float mn = fmaxf(m, mo);
                l = (mn == -INFINITY) ? 0.0f : l*exp2f(m - mn) + lo*exp2f(mo - mn);
                m = mn;
            }
            if (lane % 4 == 0) {
                const int rho = row_cta + warp*16 + lane/4 + 8*i;
                a.part[(g*a.n_chunk + chunk)*a.n_rows_pad + rho] = make_float2(m, l);
            }
        }
    } else {
        // add the chunk's sums to the result
        for (int i = tid; i < j1 - j0; i += LS_EST_THREADS) {
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < LS_EST_WARPS; ++w) {
                v += vacc[w*LS_EST_CHUNK + i];
            }
            if (v != 0.0f) {
                atomicAdd(&dst_v[j0 + i], v);
            }
        }
        if (s_shared) {
            for (int i = tid; i < LS_EST_SACC; i += LS_EST_THREADS) {
                const int64_t off = s_base + i;
                float s = 0.0f;
#pragma unroll
                for (int w = 0; w < LS_EST_WARPS; ++w) {
                    s += sacc[w*LS_EST_SACC + i];
                }
                if (s != 0.0f && off >= 0 && off < a.n_kv) {
                    atomicAdd(&dst_s[off], s);
                }
            }
        }
    }
#endif // AMPERE_MMA_AVAILABLE
}

// the chunks' (max, sum) per row -> (max, 1/sum) in chunk 0's slot
static __global__ void ls_vs_estimate_combine(const ls_est_args a) {
    const int64_t g = blockIdx.y;
    const int64_t r = (int64_t) blockIdx.x*blockDim.x + threadIdx.x;
    if (r >= a.n_rows_pad) {
        return;
    }
    float2 * p = a.part + g*a.n_chunk*a.n_rows_pad + r;
    float m = -INFINITY, l = 0.0f;
    for (int64_t c = 0; c < a.n_chunk; ++c) {
        const float2 x = p[c*a.n_rows_pad];
        const float mn = fmaxf(m, x.x);
        if (mn != -INFINITY) {
            l = l*exp2f(m - mn) + x.y*exp2f(x.x - mn);
            m = mn;
        }
    }
    p[0] = make_float2(m, l > 0.0f ? 1.0f/l : 0.0f);
}

template <int D>
static void ls_launch_estimate(const ls_est_args & a, int64_t n_head_kv, cudaStream_t st) {
    const dim3 grid((unsigned) a.n_chunk, (unsigned) (a.n_rows_pad/LS_EST_ROWS), (unsigned) n_head_kv);
    const size_t smem1 = ls_est_smem_bytes<D>((int) a.n_gqa, true, a.mask != nullptr);
    const size_t smem2 = ls_est_smem_bytes<D>((int) a.n_gqa, false, a.mask != nullptr);
    CUDA_CHECK(cudaFuncSetAttribute(ls_vs_estimate_kernel<D, true, true>,   cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem1));
    CUDA_CHECK(cudaFuncSetAttribute(ls_vs_estimate_kernel<D, true, false>,  cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem1));
    CUDA_CHECK(cudaFuncSetAttribute(ls_vs_estimate_kernel<D, false, true>,  cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem2));
    CUDA_CHECK(cudaFuncSetAttribute(ls_vs_estimate_kernel<D, false, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem2));
    ls_vs_estimate_kernel<D, true, true> <<<grid, LS_EST_THREADS, smem1, st>>>(a);
    ls_vs_estimate_kernel<D, true, false><<<grid, LS_EST_THREADS, smem1, st>>>(a);
    ls_vs_estimate_combine<<<dim3((unsigned) ((a.n_rows_pad + 127)/128), (unsigned) n_head_kv), 128, 0, st>>>(a);
    ls_vs_estimate_kernel<D, false, true> <<<grid, LS_EST_THREADS, smem2, st>>>(a);
    ls_vs_estimate_kernel<D, false, false><<<grid, LS_EST_THREADS, smem2, st>>>(a);
}

bool ls_vs_estimate_supported(int64_t D, ggml_type k_type) {
    return k_type == GGML_TYPE_F16 && (D == 64 || D == 128 || D == 256);
}

void ls_vs_estimate(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q     = dst->src[0];
    const ggml_tensor * k     = dst->src[1];
    const ggml_tensor * mask  = dst->src[2];
    const ggml_tensor * cells = dst->src[3];
    cudaStream_t st = ctx.stream();
    GGML_ASSERT(ampere_mma_available(ggml_cuda_info().devices[ctx.device].cc));

    const int64_t n_head_kv = k->ne[2];
    ls_est_args a;
    a.q = (const float *) q->data; a.k = (const char *) k->data;
    a.mask = mask ? (const char *) mask->data : nullptr;
    a.cells = cells->data; a.dst = (float *) dst->data;
    a.n_kv = k->ne[1]; a.n_rows = q->ne[1]; a.n_gqa = q->ne[2]/n_head_kv;
    a.n_chunk = (a.n_kv + LS_EST_CHUNK - 1)/LS_EST_CHUNK;
    a.n_rows_pad = (a.n_rows*a.n_gqa + LS_EST_ROWS - 1)/LS_EST_ROWS*LS_EST_ROWS;
    a.q_nb1 = q->nb[1]/sizeof(float); a.q_nb2 = q->nb[2]/sizeof(float);
    a.k_nb1 = k->nb[1]; a.k_nb2 = k->nb[2];
    a.mask_nb1 = mask ? mask->nb[1] : 0;
    a.cells_i64 = cells->type == GGML_TYPE_I64; a.mask_f16 = mask && mask->type == GGML_TYPE_F16;
    memcpy(&a.scale, &dst->op_params[1], sizeof(float));
    memcpy(&a.softcap, &dst->op_params[2], sizeof(float));
    if (a.softcap != 0.0f) {
        a.scale /= a.softcap;
    }
    a.cell_mod = dst->op_params[3];

    ggml_cuda_pool_alloc<float2> part(ctx.pool(), n_head_kv*a.n_chunk*a.n_rows_pad);
    a.part = part.get();
    CUDA_CHECK(cudaMemsetAsync(a.dst, 0, ggml_nbytes(dst), st));
    switch (k->ne[0]) {
        case 64:  ls_launch_estimate<64> (a, n_head_kv, st); break;
        case 128: ls_launch_estimate<128>(a, n_head_kv, st); break;
        case 256: ls_launch_estimate<256>(a, n_head_kv, st); break;
        default: GGML_ABORT("loopserve: unsupported head size");
    }
}
