// loopserve-edge: the fused estimation of the sparse prefill (GGML_LOOPSERVE_OP_VS_ESTIMATE,
// semantics in ggml-loopserve.h, reference in ggml-cpu/loopserve.cpp) for f16 K on sm_80+.
//
// The unfused chain writes the estimation rows' scores over every cell (at 128K and 32
// heads, 64 rows: 1 GiB of f32), reads and writes them again for the softmax and once more
// for the sums. Here the scores never leave the SM: a CTA of W warps (8, or 4 where 128
// rows would leave some empty) owns 16 W (row, head) rows of one KV head and a group of
// 512-key chunks, computes Q K^T with mma.sync like the attention kernel, and
//   pass 1 (STATS): the rows' running maximum and sum of exponentials over its chunks;
//   combine:        the CTAs' partials into each row's maximum and 1 / sum;
//   pass 2:         the probabilities, summed per key column (vertical) and per diagonal
//                   offset (slash) in shared memory, then, chunk by chunk, added to the
//                   result atomically.
// K tiles of 64 keys are double buffered with cp.async (the keys of a chunk are contiguous),
// the next chunk's first tile in flight during the last tile of the current one.
// Tiles that need no masking (no mask, no softcap, every key at or below every row's cell:
// at long lengths all but the one or two holding the rows' own cells) run a lean variant of
// each pass; a chunk can be split between the two (before session 39 a whole chunk went to
// the general path, eight tiles for one: 10-37% of the op at 32K-128K on an H100).
// The row blocks are the grid's fastest index, so the CTAs reading one chunk of K run side
// by side and all but the first find it in L2; a CTA walks as many chunks as make one wave
// of CTAs, its Q fragments loaded once.

#include "loopserve-attn.cuh"

#include <cstdint>

#define LS_EST_KEYS    64     // keys of a tile
#define LS_EST_CHUNK   512    // keys of a chunk: the unit of the shared sums
#define LS_EST_SPAN    256    // query cell spread the shared slash sums allow (else global atomics)
#define LS_EST_SACC    (LS_EST_CHUNK + LS_EST_SPAN)

struct ls_est_args {
    const float * q; const char * k; const char * mask; const void * cells; float * dst;
    float2 * part;  // [n_head_kv][n_part][n_rows_pad]: pass 1's (max, sum) per CTA and kernel, then (max, 1/sum) in slot 0
    int64_t n_kv, n_rows, n_gqa, n_chunk, n_rows_pad;
    int cpc;        // chunks of a CTA (the launch sets it)
    int64_t n_part; // 2 per group of chunks: the lean kernel's and the other's
    int64_t q_nb1, q_nb2, k_nb1, k_nb2, mask_nb1; // q in floats, others in bytes
    bool cells_i64, mask_f16;
    float scale, softcap;
    int64_t cell_mod;
};

// rows of a CTA: 16 a warp
static __host__ __device__ int ls_est_max_queries(int rows, int n_gqa) {
    return min(rows, rows/n_gqa + 1);
}

template <int D, int W>
static size_t ls_est_smem_bytes(int n_gqa, bool stats, bool mask) {
    return 2*LS_EST_KEYS*(D + 8)*sizeof(half) + (mask ? 2*(size_t) ls_est_max_queries(W*16, n_gqa)*LS_EST_KEYS*sizeof(uint32_t) : 0) +
           (stats ? 0 : (W*(LS_EST_CHUNK + LS_EST_SACC) + 2*W*16)*sizeof(float)) + W*16*sizeof(int);
}

// Where chunk [j0, j1) passes from the lean path (see ls_est_pass2_tile) to the general one:
// the lean path takes its whole tiles whose keys are all at or below every row's cell [lo,
// hi] when there is no mask or softcap and, for pass 2, the slash sums fit in shared memory,
// the ratio is a power of two and the CTA's queries sit in consecutive cells (what keeps its
// lanes' unsynchronized sums off each other's offsets); the general path the rest (at long
// lengths one tile of one chunk, the rows' own)
static __device__ __forceinline__ int ls_est_split(const ls_est_args & a, bool stats, int j0, int j1,
                                                   int lo, int hi, bool pass2_ok) {
    const bool s_shared = hi - lo + (j1 - j0) <= LS_EST_SACC;
    if (a.mask || a.softcap != 0.0f || !(stats || (s_shared && pass2_ok))) {
        return j0;
    }
    const int whole = min(j1, lo + 1) - j0;
    return j0 + max(0, whole)/LS_EST_KEYS*LS_EST_KEYS;
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

// FAST: the tiles that take the lean path (ls_est_split), else the others: a kernel of its
// own, so that the general path's registers do not limit its occupancy. A CTA none of whose
// chunks has tiles of its kind returns before loading anything. The lean kernels fit in 128 registers a
// thread (16 warps an SM) up to head dim 128; the lean pass 2 is compiled for its GQA ratio G
// (one ratio's sums a kernel: with all four in the tile loop it spilled).
template <int D, int W, bool STATS, bool FAST, int G = 0>
static __global__ void __launch_bounds__(W*WARP_SIZE, FAST && D <= 128 ? 16/W : 1)
ls_vs_estimate_kernel(const ls_est_args a) {
#ifndef AMPERE_MMA_AVAILABLE
    NO_DEVICE_CODE;
#else
    constexpr int NTH = W*WARP_SIZE;
    constexpr int ROWS = W*16;
    constexpr int RH = D + 8;
    constexpr int KT = LS_EST_KEYS;
    constexpr int NT = KT/8;
    constexpr int KS = D/16;
    constexpr float LOG2E = 1.4426950408889634f;

    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int n_gqa = (int) a.n_gqa;
    const int max_q = ls_est_max_queries(ROWS, n_gqa);
    // grid: (row block, group of chunks, KV head)
    const int64_t group = blockIdx.y, g = blockIdx.z;
    const int row_cta = blockIdx.x*ROWS;
    const int n_rows = (int) (a.n_rows*n_gqa);
    const int q_first = row_cta / n_gqa;
    const int n_q = min(max_q, (int) a.n_rows - q_first);
    const int c_first = (int) group*a.cpc, c_end = (int) min(a.n_chunk, (int64_t) c_first + a.cpc);
    const bool gqa_pow2 = n_gqa <= 8 && (n_gqa & (n_gqa - 1)) == 0;

    extern __shared__ __align__(16) char ls_smem[];
    half  * Ks = (half *) ls_smem;                          // 2 buffers
    uint32_t * Ms = (uint32_t *) (Ks + 2*KT*RH);            // with a mask: 2 buffers of [n_q][KT] mask words
    int   * q_cell = (int *) (Ms + (a.mask ? 2*max_q*KT : 0));
    float * vacc = (float *) (q_cell + ROWS);               // pass 2, per warp: per key of the chunk
    float * sacc = vacc + W*LS_EST_CHUNK;                   // per warp: per offset in [s_base, s_base + LS_EST_SACC)
    float * row_M = sacc + W*LS_EST_SACC;
    float * row_I = row_M + ROWS;
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
    __syncthreads();
    const int lo = sh_lo, hi = sh_hi;
    const bool pass2_ok = __syncthreads_and(tid >= n_q || q_cell[tid] == lo + tid) && gqa_pow2;
    // this kernel's part of chunk c: [r0, r1), empty when r1 <= r0
    auto part_of = [&](int c, int & r0, int & r1) {
        const int j0 = c*LS_EST_CHUNK, j1 = min((int) a.n_kv, j0 + LS_EST_CHUNK);
        const int t = ls_est_split(a, STATS, j0, j1, lo, hi, pass2_ok);
        r0 = FAST ? j0 : t;
        r1 = FAST ? t : j1;
    };
    // this kernel's next chunk from c on: c_end when there is none
    auto next_chunk = [&](int c) {
        for (; c < c_end; ++c) {
            int r0, r1;
            part_of(c, r0, r1);
            if (r0 < r1) {
                break;
            }
        }
        return c;
    };
    int c = next_chunk(c_first);
    if (c == c_end) {
        if (STATS && tid < ROWS) {
            a.part[(g*a.n_part + 2*group + !FAST)*a.n_rows_pad + row_cta + tid] = make_float2(-INFINITY, 0.0f);
        }
        return;
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
        // key's is col's); no mask: the row's cell (causal in cells)
        row_x[i] = a.mask ? (int) (((uintptr_t) (a.mask + (q_first + row_ql[i])*a.mask_nb1) >> 1) & 1)
                          : q_cell[row_ql[i]];
    }
    // scores in log2 units from the start (the exponentials are exp2), except under a softcap
    uint32_t qa[KS][4];
    ls_mma_load_q<D>(qa, row_ok, [&](int i) {
        const int rho = row_cta + warp*16 + lane/4 + 8*i;
        return a.q + (rho/n_gqa)*a.q_nb1 + (g*n_gqa + rho % n_gqa)*a.q_nb2;
    }, a.softcap != 0.0f ? a.scale : a.scale*LOG2E, lane);

    // pass 2: the rows' final maximum and 1 / sum; shared sums zeroed (each chunk's flush
    // zeroes them again)
    float Mr[2] = {-INFINITY, -INFINITY}, Ir[2] = {0.0f, 0.0f};
    float M2[2] = {INFINITY, INFINITY}; // exp2(s - M2) = exp2(s - M)/sum; +inf: the row adds nothing
    if constexpr (!STATS) {
        if (tid < ROWS) {
            const float2 mi = a.part[(g*a.n_part)*a.n_rows_pad + row_cta + tid];
            row_M[tid] = mi.x;
            row_I[tid] = mi.y;
        }
        for (int i = tid; i < W*(LS_EST_CHUNK + LS_EST_SACC); i += NTH) {
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
    }

    const uint32_t Ks_s = (uint32_t) __cvta_generic_to_shared(Ks);
    const uint32_t Ms_s = (uint32_t) __cvta_generic_to_shared(Ms);
    // the tile of keys [jt, jt + KT) of the chunk ending at j1 (past it: zeros, never read)
    // (the addresses from the kernel's arguments each time: registers are tight)
    auto load = [&](int jt, int j1, int buf) {
        constexpr int CPR = D/8;
        const char * kbase = a.k + blockIdx.z*a.k_nb2;
        for (int i = tid; i < KT*CPR; i += NTH) {
            const int j = jt + i/CPR;
            const int piece = i % CPR;
            ls_cp_async<16>(Ks_s + ((buf*KT + i/CPR)*RH + piece*8)*sizeof(half),
                            kbase + (int64_t) (j < j1 ? j : jt)*a.k_nb1 + piece*16, j < j1);
        }
        // the tile's mask values, also in flight: 4-byte words (for an f16 mask the aligned
        // pair holding the key's half, picked by the row's and the key's parities)
        const uint32_t Mb_s = Ms_s + buf*max_q*KT*sizeof(uint32_t);
        for (int i = tid; a.mask && i < n_q*KT; i += NTH) {
            const int j = jt + i % KT;
            const bool ok = j < j1;
            const char * mr = ok ? a.mask + (q_first + i/KT)*a.mask_nb1 : (const char *) a.q;
            const char * src = !ok ? mr : !a.mask_f16 ? mr + (int64_t) j*sizeof(float) :
                (const char *) ((uintptr_t) (mr + (int64_t) j*sizeof(half)) & ~(uintptr_t) 3);
            ls_cp_async<4>(Mb_s + i*sizeof(uint32_t), src, ok);
        }
        asm volatile("cp.async.commit_group;");
    };

    // key indices as int: a KV cache of 2^31 cells is far off
    const int n_kv = (int) a.n_kv;
    int buf = 0;
    float M[2] = {-INFINITY, -INFINITY}, L[2] = {0.0f, 0.0f}; // pass 1: over the CTA's chunks
    int r0, r1; // this kernel's keys of the current chunk
    part_of(c, r0, r1);
    load(r0, r1, buf);
#pragma unroll 1
    for (; c < c_end; ) {
        const int j0 = c*LS_EST_CHUNK, j1 = min(n_kv, j0 + LS_EST_CHUNK);
        const int c_next = next_chunk(c + 1);
        int n0 = 0, n1 = 0; // the next chunk's part
        if (c_next < c_end) {
            part_of(c_next, n0, n1);
        }
        // offsets c - j of this chunk lie in [lo - j1 + 1, hi - j0]
        const int s_base = lo - j1 + 1;
        const bool s_shared = hi - j0 - s_base + 1 <= LS_EST_SACC;
        int sb[2]; // the row's cell - s_base
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            sb[i] = q_cell[row_ql[i]] - s_base;
        }

#pragma unroll 1
        for (int jt = r0; jt < r1; jt += KT, buf ^= 1) {
            // the next tile, of this chunk or the next one, in the buffer the previous tile
            // used: freed by its closing barrier
            if (jt + KT < r1) {
                load(jt + KT, r1, buf ^ 1);
                asm volatile("cp.async.wait_group 1;"); // the current tile's K and mask, not the next
            } else if (c_next < c_end) {
                load(n0, n1, buf ^ 1);
                asm volatile("cp.async.wait_group 1;");
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
                    const int sbt[2] = {sb[0] - jt, sb[1] - jt};
                    float * vt = vacc_w + (jt - j0);
                    static_assert(G == 1 || G == 2 || G == 4 || G == 8, "the lean pass 2 needs a power-of-two ratio");
                    ls_est_pass2_tile<G>(S, M2, sbt, sacc_w, vt, lane);
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
                    for (int cc = 0; cc < 2; ++cc) {
                        const int col = t*8 + 2*(lane % 4) + cc;
                        const int j = jt + col;
                        float p[2];
#pragma unroll
                        for (int i = 0; i < 2; ++i) {
                            p[i] = S[t][2*i + cc] == -INFINITY ? 0.0f : exp2f(S[t][2*i + cc] - Mr[i])*Ir[i];
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
                                    const int off = q_cell[row_ql[i]] - j;
                                    if (s_shared) {
                                        atomicAdd(&sacc_w[off - s_base], p[i]);
                                    } else if (off >= 0 && off < n_kv) {
                                        atomicAdd(&a.dst[(2*g + 1)*a.n_kv + off], p[i]);
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

        if constexpr (!STATS) {
            // add the chunk's sums to the result, zeroing them for the next chunk (the tiles'
            // closing barrier has passed)
            for (int i = tid; i < LS_EST_CHUNK; i += NTH) {
                float v = 0.0f;
#pragma unroll
                for (int w = 0; w < W; ++w) {
                    v += vacc[w*LS_EST_CHUNK + i];
                    vacc[w*LS_EST_CHUNK + i] = 0.0f;
                }
                if (v != 0.0f && i < j1 - j0) {
                    atomicAdd(&a.dst[(2*g + 0)*a.n_kv + j0 + i], v);
                }
            }
            if (s_shared) {
                for (int i = tid; i < LS_EST_SACC; i += NTH) {
                    const int off = s_base + i;
                    float s = 0.0f;
#pragma unroll
                    for (int w = 0; w < W; ++w) {
                        s += sacc[w*LS_EST_SACC + i];
                        sacc[w*LS_EST_SACC + i] = 0.0f;
                    }
                    if (s != 0.0f && off >= 0 && off < n_kv) {
                        atomicAdd(&a.dst[(2*g + 1)*a.n_kv + off], s);
                    }
                }
            }
            __syncthreads(); // the sums are zero before the next chunk adds to them
        }
        c = c_next;
        r0 = n0; r1 = n1;
    }

    if constexpr (STATS) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // the 4 lanes of a row saw other columns: combine their (max, sum)
            float m = M[i], l = L[i];
#pragma unroll
            for (int o = 1; o <= 2; o <<= 1) {
                const float mo = __shfl_xor_sync(0xffffffff, m, o), lo2 = __shfl_xor_sync(0xffffffff, l, o);
                const float mn = fmaxf(m, mo);
                l = (mn == -INFINITY) ? 0.0f : l*exp2f(m - mn) + lo2*exp2f(mo - mn);
                m = mn;
            }
            if (lane % 4 == 0) {
                const int rho = row_cta + warp*16 + lane/4 + 8*i;
                a.part[(g*a.n_part + 2*group + !FAST)*a.n_rows_pad + rho] = make_float2(m, l);
            }
        }
    }
#endif // AMPERE_MMA_AVAILABLE
}

// the partials' (max, sum) per row -> (max, 1/sum) in slot 0: a warp per row, its lanes over
// the partials (a thread per row walking 256 of them took ~36 us at 128K)
static __global__ void ls_vs_estimate_combine(const ls_est_args a) {
    const int64_t g = blockIdx.y;
    const int64_t r = (int64_t) blockIdx.x*(blockDim.x/WARP_SIZE) + threadIdx.x/WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (r >= a.n_rows_pad) {
        return;
    }
    float2 * p = a.part + g*a.n_part*a.n_rows_pad + r;
    float m = -INFINITY, l = 0.0f;
    for (int64_t c = lane; c < a.n_part; c += WARP_SIZE) {
        const float2 x = p[c*a.n_rows_pad];
        const float mn = fmaxf(m, x.x);
        if (mn != -INFINITY) {
            l = l*exp2f(m - mn) + x.y*exp2f(x.x - mn);
            m = mn;
        }
    }
#pragma unroll
    for (int o = WARP_SIZE/2; o > 0; o >>= 1) {
        const float mo = __shfl_xor_sync(0xffffffff, m, o), lo = __shfl_xor_sync(0xffffffff, l, o);
        const float mn = fmaxf(m, mo);
        l = mn == -INFINITY ? 0.0f : l*exp2f(m - mn) + lo*exp2f(mo - mn);
        m = mn;
    }
    if (lane == 0) {
        p[0] = make_float2(m, l > 0.0f ? 1.0f/l : 0.0f);
    }
}

template <int D, int W, int G>
static void ls_launch_estimate(ls_est_args a, int64_t n_head_kv, int nsm, cudaStream_t st) {
    const size_t smem1 = ls_est_smem_bytes<D, W>((int) a.n_gqa, true, a.mask != nullptr);
    const size_t smem2 = ls_est_smem_bytes<D, W>((int) a.n_gqa, false, a.mask != nullptr);
    CUDA_CHECK(cudaFuncSetAttribute(ls_vs_estimate_kernel<D, W, true, true>,   cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem1));
    CUDA_CHECK(cudaFuncSetAttribute(ls_vs_estimate_kernel<D, W, true, false>,  cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem1));
    CUDA_CHECK(cudaFuncSetAttribute(ls_vs_estimate_kernel<D, W, false, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem2));
    if constexpr (G != 0) {
        CUDA_CHECK(cudaFuncSetAttribute(ls_vs_estimate_kernel<D, W, false, true, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem2));
    }
    // CTAs resident on an SM: those of the heaviest kernel, the lean pass 2 where there is one
    // (read once per instantiation; the shared memory of its first call)
    static const int occ = [&] {
        int n = 1;
        if constexpr (G != 0) {
            CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, ls_vs_estimate_kernel<D, W, false, true, G>, W*WARP_SIZE, smem2));
        } else {
            CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, ls_vs_estimate_kernel<D, W, false, false>, W*WARP_SIZE, smem2));
        }
        return std::max(n, 1);
    }();
    // Chunks a CTA: as many as make one wave of CTAs (each with its Q fragments loaded once;
    // measured on an H100 at 32K-128K, one wave beat two to four by 2-19% and half a wave
    // was 18% slower)
    const int64_t n_rb = a.n_rows_pad/(W*16);
    const int64_t slots = (int64_t) occ*nsm;
    a.cpc = (int) std::max<int64_t>(1, (a.n_chunk*n_rb*n_head_kv + slots - 1)/slots);
    const int64_t n_group = (a.n_chunk + a.cpc - 1)/a.cpc;
    a.n_part = 2*n_group;
    const dim3 grid((unsigned) n_rb, (unsigned) n_group, (unsigned) n_head_kv);
    ls_vs_estimate_kernel<D, W, true, true> <<<grid, W*WARP_SIZE, smem1, st>>>(a);
    ls_vs_estimate_kernel<D, W, true, false><<<grid, W*WARP_SIZE, smem1, st>>>(a);
    const int rows_cta = 8; // combine: warps a CTA
    ls_vs_estimate_combine<<<dim3((unsigned) ((a.n_rows_pad + rows_cta - 1)/rows_cta), (unsigned) n_head_kv),
                             rows_cta*WARP_SIZE, 0, st>>>(a);
    if constexpr (G != 0) {
        ls_vs_estimate_kernel<D, W, false, true, G><<<grid, W*WARP_SIZE, smem2, st>>>(a);
    }
    ls_vs_estimate_kernel<D, W, false, false><<<grid, W*WARP_SIZE, smem2, st>>>(a);
}

template <int D, int W>
static void ls_launch_estimate(const ls_est_args & a, int64_t n_head_kv, int nsm, cudaStream_t st) {
    // a ratio that is not a power of two has no lean pass 2 (ls_est_split)
    switch (a.n_gqa) {
        case 1:  ls_launch_estimate<D, W, 1>(a, n_head_kv, nsm, st); break;
        case 2:  ls_launch_estimate<D, W, 2>(a, n_head_kv, nsm, st); break;
        case 4:  ls_launch_estimate<D, W, 4>(a, n_head_kv, nsm, st); break;
        case 8:  ls_launch_estimate<D, W, 8>(a, n_head_kv, nsm, st); break;
        default: ls_launch_estimate<D, W, 0>(a, n_head_kv, nsm, st); break;
    }
}

// Warps a CTA: 8 (128 rows: K read from L2 by half as many CTAs) where they are all rows and
// its shared memory fits, else 4 (64 rows x 3 heads at SmolLM2's ratio: 192 rows, no padded
// warps); 0 where neither fits. Pass 2's CTA takes the most (its sums beside the K tiles), and
// a mask adds its tile. At head dim 256, 8 warps need 108 KiB without a mask and 116-172 KiB
// with one, more than the 99 KiB a consumer GPU gives a block. 4 warps need 87 KiB, or 91-119
// KiB with a mask, which fits at GQA ratios of 3 and more.
template <int D>
static int ls_est_warps_d(int64_t n_rows, int n_gqa, bool mask, size_t smem_max) {
    if (n_rows*n_gqa % 128 == 0 && ls_est_smem_bytes<D, 8>(n_gqa, false, mask) <= smem_max) {
        return 8;
    }
    return ls_est_smem_bytes<D, 4>(n_gqa, false, mask) <= smem_max ? 4 : 0;
}

static int ls_est_warps(int64_t D, int64_t n_rows, int64_t n_gqa, bool mask, size_t smem_max) {
    switch (D) {
        case 64:  return ls_est_warps_d<64>(n_rows, (int) n_gqa, mask, smem_max);
        case 128: return ls_est_warps_d<128>(n_rows, (int) n_gqa, mask, smem_max);
        case 256: return ls_est_warps_d<256>(n_rows, (int) n_gqa, mask, smem_max);
        default:  return 0;
    }
}

bool ls_vs_estimate_supported(const ggml_tensor * op, int device) {
    const ggml_tensor * q = op->src[0];
    const ggml_tensor * k = op->src[1];
    return k->type == GGML_TYPE_F16 && ampere_mma_available(ggml_cuda_info().devices[device].cc) &&
           ls_est_warps(k->ne[0], q->ne[1], q->ne[2]/k->ne[2], op->src[2] != nullptr, ls_smem_max(device)) != 0;
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
    const int w = ls_est_warps(k->ne[0], a.n_rows, a.n_gqa, mask != nullptr, ls_smem_max(ctx.device));
    GGML_ASSERT(w != 0 && "loopserve: the estimation's shared memory exceeds the device's (supports_op says so)");
    const int rows = w*16;
    a.n_chunk = (a.n_kv + LS_EST_CHUNK - 1)/LS_EST_CHUNK;
    a.n_rows_pad = (a.n_rows*a.n_gqa + rows - 1)/rows*rows;
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

    // partials: at most two a chunk (the launch sets n_part)
    ggml_cuda_pool_alloc<float2> part(ctx.pool(), n_head_kv*2*a.n_chunk*a.n_rows_pad);
    a.part = part.get();
    CUDA_CHECK(cudaMemsetAsync(a.dst, 0, ggml_nbytes(dst), st));
    const int nsm = ggml_cuda_info().devices[ctx.device].nsm;
    switch (k->ne[0]) {
        case 64:  w == 8 ? ls_launch_estimate<64, 8> (a, n_head_kv, nsm, st) : ls_launch_estimate<64, 4> (a, n_head_kv, nsm, st); break;
        case 128: w == 8 ? ls_launch_estimate<128, 8>(a, n_head_kv, nsm, st) : ls_launch_estimate<128, 4>(a, n_head_kv, nsm, st); break;
        case 256: w == 8 ? ls_launch_estimate<256, 8>(a, n_head_kv, nsm, st) : ls_launch_estimate<256, 4>(a, n_head_kv, nsm, st); break;
        default: GGML_ABORT("loopserve: unsupported head size");
    }
}
