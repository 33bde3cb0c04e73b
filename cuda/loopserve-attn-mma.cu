// loopserve-edge: the tensor-core kernel of the sparse attention op (semantics in
// ggml-loopserve.h, reference in ggml-cpu/loopserve.cpp), for f16 or q8_0 K/V of head dim
// 64/128/256 (q8_0: what consumer GPUs' users turn on to fit a long dialogue; without this it
// ran the SIMT kernel, several times slower).
//
// A CTA of 4 warps owns 64 (query, head) rows of one query block b and KV head g: the
// block's rows times the group's heads, flattened, so every row of a CTA shares one key
// set K(b, g) and each K/V tile is used by all of the group's heads. The key set is
// walked in tiles of 64 keys (32 at head dim 256), built in shared memory as they go, never stored:
//   1. diagonal ranges, 128 offsets at a time: offset i (ascending list) owns keys
//      [lo - s_i, min(hi - s_i, lo - s_{i-1} - 1)], disjoint across i, so their union
//      needs no merge; a scan of the lengths and a bisection per slot give the keys;
//   2. vertical columns no range covers, compacted and queued until a tile is full.
// Tiles are gathered row by row with cp.async (zero-filled past the set), V while QK^T
// runs; q8_0 rows (an even number of 34-byte blocks: 4-byte aligned, 8 at head dim >= 128) are
// copied as stored with cp.async 8 or 4 bytes at a time into a staging area and dequantised
// there to f16 into the same tiles, so the math below does not change and V's copy still
// overlaps QK^T (stock flash attention also converts q8_0 K/V to f16 for its tensor cores).
// QK^T and PV are mma.sync m16n8k16 (f16 in, f32 accumulation), online softmax in
// f32 on the accumulator fragments, which are reused as the A operand of PV.
// At head dim 256 the O accumulators alone take 128 registers a thread, so Q stays in shared
// memory (A fragments by ldmatrix) and tiles are halved to fit consumer GPUs' 99 KiB a block.

#include "loopserve-attn.cuh"

#include <cstdint>

#define LS_MMA_WARPS   4
#define LS_MMA_THREADS (LS_MMA_WARPS*WARP_SIZE)
#define LS_MMA_ROWS    (LS_MMA_WARPS*16)  // (query, head) rows of a CTA
#define LS_MMA_CHUNK   LS_MMA_THREADS     // diagonal offsets / columns examined per step

// keys of a tile; Q in shared memory rather than registers
template <int D> static __host__ __device__ constexpr int  ls_mma_keys()     { return D >= 256 ? 32 : 64; }
template <int D> static __host__ __device__ constexpr bool ls_mma_q_shared() { return D >= 256; }

// distinct queries among a CTA's rows: at most 64/n_gqa + 1, or 64
static __host__ __device__ int ls_mma_max_queries(int n_gqa) {
    return min(LS_MMA_ROWS, LS_MMA_ROWS/n_gqa + 1);
}

template <int D>
static __host__ __device__ constexpr int ls_mma_row_halves() {
    return D + 8; // padding: ldmatrix rows land on distinct banks
}

// bytes of one q8_0 row of a head as stored
template <int D>
static __host__ __device__ constexpr int ls_mma_q8_row_bytes() {
    return D/QK8_0*(int) sizeof(block_q8_0);
}

template <int D, bool Q8>
static size_t ls_mma_smem_bytes(int n_gqa) {
    constexpr int KT = ls_mma_keys<D>();
    return (2*KT + (ls_mma_q_shared<D>() ? LS_MMA_ROWS : 0))*ls_mma_row_halves<D>()*sizeof(half) // K, V tiles, Q
         + (Q8 ? 2*KT*ls_mma_q8_row_bytes<D>() : 0)                                          // K, V rows as stored
         + (size_t) ls_mma_max_queries(n_gqa)*KT*sizeof(uint32_t)                            // mask tile
         + (2*KT + (KT + LS_MMA_CHUNK) + 2*LS_MMA_CHUNK + 32 + 2*LS_MMA_ROWS)*sizeof(int); // tile, queue, scan, per query
}

// S = Q K^T for a tile in shared memory, with the warp's 16 rows of Q there too (qs_s): each
// A fragment is loaded once and used for every n-tile
template <int D, int RH, int NT>
static __device__ __forceinline__ void ls_mma_qk_shared(float (&S)[NT][4], uint32_t qs_s, uint32_t ks_s, int lane) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        S[t][0] = S[t][1] = S[t][2] = S[t][3] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < D/16; ks += 2) {
        uint32_t qa[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = lane % 8 + ((lane / 8) & 1)*8, d = (ks + h)*16 + (lane / 16)*8;
            ls_ldmatrix_x4(qa[h], qs_s + (row*RH + d)*sizeof(half));
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            uint32_t kb[4];
            const int key = t*8 + lane % 8, d = ks*16 + (lane / 8)*8;
            ls_ldmatrix_x4(kb, ks_s + (key*RH + d)*sizeof(half));
            ls_mma_16816(S[t], qa[0], kb[0], kb[1]);
            ls_mma_16816(S[t], qa[1], kb[2], kb[3]);
        }
    }
}

// a tile's q8_0 rows as stored (KT rows of RB bytes in shared memory at dst), zero-filled for
// an empty slot, W bytes a copy
template <int RB, int KT, int W>
static __device__ __forceinline__ void ls_mma_q8_stage_w(uint32_t dst, const char * base, int64_t nb1, const int * tk,
                                                         int tid) {
    for (int i = tid; i < KT*(RB/W); i += LS_MMA_THREADS) {
        const int key = tk[i / (RB/W)], w = i % (RB/W);
        const int64_t j = key < 0 ? 0 : key;
        ls_cp_async<W>(dst + (i / (RB/W))*RB + w*W, base + j*nb1 + w*W, key >= 0);
    }
}

// 8 bytes a copy where the rows (RB) and the views (w8) are 8-byte aligned, else 4
template <int RB, int KT>
static __device__ __forceinline__ void ls_mma_q8_stage(uint32_t dst, const char * base, int64_t nb1, const int * tk,
                                                       bool w8, int tid) {
    if constexpr (RB % 8 == 0) {
        if (w8) {
            ls_mma_q8_stage_w<RB, KT, 8>(dst, base, nb1, tk, tid);
            return;
        }
    }
    ls_mma_q8_stage_w<RB, KT, 4>(dst, base, nb1, tk, tid);
}

// the staged rows as f16 into the tile (rows of RH halves): each thread 8 values at a time,
// each value d*q rounded once to f16 (a zero-filled slot gives zeros)
template <int D, int RH, int KT>
static __device__ __forceinline__ void ls_mma_q8_dequant(half * dst, const char * raw, int tid) {
    constexpr int RB = ls_mma_q8_row_bytes<D>(), CPR = D/8;
#pragma unroll 2
    for (int i = tid; i < KT*CPR; i += LS_MMA_THREADS) {
        const int r = i / CPR, piece = i % CPR;
        const char * blk = raw + r*RB + (piece / (QK8_0/8))*(int) sizeof(block_q8_0);
        const float d = __half2float(*(const half *) blk);
        const char2 * qs = (const char2 *) (blk + sizeof(half) + (piece % (QK8_0/8))*8); // 2-byte aligned
        half2 h[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const char2 c = qs[e];
            h[e] = __floats2half2_rn(d*(float) c.x, d*(float) c.y);
        }
        *(uint4 *) (dst + r*RH + piece*8) = *(const uint4 *) h;
    }
}

// CTAs an SM: the kernel waits on its gathers more than on its math (ncu at the 1B shape's 128K:
// no warp eligible half the cycles), so on Hopper one CTA more than the registers would
// otherwise allow (128 a thread at head dim 64, 168 at 128: a few spilled; the op 14% / 7%
// faster on the H100 at 128K; f16 K/V, what was measured). Consumer GPUs' 100 KB of shared
// memory an SM would not hold the extra CTA, and only the spills would remain.
template <int D, bool Q8> static __host__ __device__ constexpr int ls_mma_min_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return Q8 ? (D == 64 ? 3 : 2) : D == 64 ? 4 : D == 128 ? 3 : 2;
#else
    return D == 64 ? 3 : 2;
#endif
}

template <int D, bool Q8>
static __global__ void __launch_bounds__(LS_MMA_THREADS, ls_mma_min_blocks<D, Q8>())
ls_sparse_attn_mma_kernel(const ls_attn_args a) {
#ifndef AMPERE_MMA_AVAILABLE
    NO_DEVICE_CODE;
#else
    constexpr int RH = ls_mma_row_halves<D>();
    constexpr int KT = ls_mma_keys<D>();
    constexpr bool QS = ls_mma_q_shared<D>();
    constexpr int NT = KT/8;   // n-tiles of S
    constexpr int NO = D/8;    // n-tiles of O
    constexpr int KS = D/16;   // k-steps of QK^T
    constexpr float LOG2E = 1.4426950408889634f;

    extern __shared__ __align__(16) char ls_smem[];
    half  * Ks    = (half *) ls_smem;
    half  * Vs    = Ks + KT*RH;
    half  * Qs    = Vs + KT*RH;                // QS: the CTA's rows of Q
    const int n_gqa = (int) a.n_gqa;
    const int max_q = ls_mma_max_queries(n_gqa);
    constexpr int RB = ls_mma_q8_row_bytes<D>();
    char  * Kr    = (char *) (Qs + (QS ? LS_MMA_ROWS*RH : 0)); // Q8: the tile's K and V rows as stored
    char  * Vr    = Kr + KT*RB;
    uint32_t * Ms = (uint32_t *) (Kr + (Q8 ? 2*KT*RB : 0)); // mask words of the tile, per query
    int   * ksel  = (int *) (Ms + max_q*KT);   // per slot: -1 empty; else the key's parity (mask) or the key
    int   * tile  = ksel + KT;                 // keys of the tile being built (diagonal phase)
    int   * queue = tile + KT;               // uncovered columns waiting for a full tile
    int   * scan  = queue + KT + LS_MMA_CHUNK; // per offset: first slot, key of slot 0
    int   * shi   = scan + 2*LS_MMA_CHUNK;
    int   * q_cell = shi + 32;             // per distinct query of the CTA: its cell,
    int   * q_seen = q_cell + LS_MMA_ROWS; // and the keys computed with cell <= it

    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const int64_t g = blockIdx.y;
    const int n_chunk = (a.block_q*n_gqa + LS_MMA_ROWS - 1) / LS_MMA_ROWS;
    const int64_t b = blockIdx.x / n_chunk;
    const int chunk = blockIdx.x % n_chunk;
    const int64_t r0 = b*a.block_q, r1 = min(a.n_tokens, r0 + a.block_q);
    const int n_rows = (int) (r1 - r0)*n_gqa;
    const int row_cta = chunk*LS_MMA_ROWS;
    if (row_cta >= n_rows) {
        return;
    }
    const int q_first = row_cta / n_gqa;
    const int n_q = min(max_q, (int) (r1 - r0) - q_first);

    // cell range of the block (cells < n_kv < 2^31)
    __shared__ int sh_lo, sh_hi;
    if (tid == 0) {
        sh_lo = INT32_MAX; sh_hi = -1;
    }
    if (tid < n_q) {
        q_seen[tid] = 0;
        q_cell[tid] = (int) ls_cell(a.cells, a.cells_i64, r0 + q_first + tid, a.cell_mod);
    }
    __syncthreads();
    for (int64_t r = r0 + tid; r < r1; r += LS_MMA_THREADS) {
        const int c = (int) ls_cell(a.cells, a.cells_i64, r, a.cell_mod);
        atomicMin(&sh_lo, c);
        atomicMax(&sh_hi, c);
    }
    __syncthreads();
    const int lo = sh_lo, hi = sh_hi;

    // this lane's two rows: fragment rows lane/4 and lane/4 + 8 of the warp's 16
    // (rows past the block read query q_first's mask and are not written)
    int  row_ql[2], row_h[2], row_m[2], row_x[2];
    bool row_ok[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int rho = row_cta + warp*16 + lane/4 + 8*i;
        row_ok[i] = rho < n_rows;
        row_ql[i] = row_ok[i] ? rho / n_gqa : q_first;
        row_h[i]  = (int) g*n_gqa + rho % n_gqa;
        row_m[i]  = (row_ql[i] - q_first)*KT;
        // f16 mask: the parity of the row's first half in its words (n_kv odd shifts the
        // keys); no mask: the row's cell (causal in cells)
        row_x[i] = a.mask ? (int) (((uintptr_t) (a.mask + (r0 + row_ql[i])*a.mask_nb1) >> 1) & 1)
                          : q_cell[row_ql[i] - q_first];
    }

    // Q prescaled and rounded to f16 (the order of ggml's flash attention): as A fragments, or
    // in shared memory, a warp writing its own 16 rows (read after process's first barrier)
    uint32_t qa[QS ? 1 : KS][4];
    if constexpr (QS) {
        for (int i = lane; i < 16*(D/2); i += WARP_SIZE) {
            const int rr = i / (D/2), d = 2*(i % (D/2));
            const int rho = row_cta + warp*16 + rr;
            float2 x = make_float2(0.0f, 0.0f);
            if (rho < n_rows) {
                const float * qr = a.q + (r0 + rho / n_gqa)*a.q_nb1 + (g*n_gqa + rho % n_gqa)*a.q_nb2;
                x = make_float2(qr[d]*a.scale, qr[d + 1]*a.scale);
            }
            *(half2 *) (Qs + (warp*16 + rr)*RH + d) = __floats2half2_rn(x.x, x.y);
        }
    } else {
        ls_mma_load_q<D>(qa, row_ok, [&](int i) { return a.q + (r0 + row_ql[i])*a.q_nb1 + row_h[i]*a.q_nb2; },
                         a.scale, lane);
    }

    float O[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        O[n][0] = O[n][1] = O[n][2] = O[n][3] = 0.0f;
    }
    float M[2] = {-INFINITY, -INFINITY}, L[2] = {0.0f, 0.0f};

    const char * kbase = a.k + g*a.k_nb2;
    const char * vbase = a.v + g*a.v_nb2;
    const uint32_t Ks_s = (uint32_t) __cvta_generic_to_shared(Ks);
    const uint32_t Vs_s = (uint32_t) __cvta_generic_to_shared(Vs);
    const uint32_t Ms_s = (uint32_t) __cvta_generic_to_shared(Ms);
    const uint32_t Qs_s = (uint32_t) __cvta_generic_to_shared(Qs + warp*16*RH);
    const uint32_t Kr_s = Ks_s + (uint32_t) (2*KT + (QS ? LS_MMA_ROWS : 0))*RH*sizeof(half);
    const uint32_t Vr_s = Kr_s + KT*RB;
    // Q8: the views allow 8-byte copies (the rows too at head dim >= 128: ls_mma_q8_stage)
    const bool w8 = ((uintptr_t) kbase | (uintptr_t) vbase | (uintptr_t) a.k_nb1 | (uintptr_t) a.v_nb1) % 8 == 0;

    // one tile of KT keys (tk[i] < 0: empty slot); every thread calls it
    auto process = [&](const int * tk) {
        __syncthreads(); // tk written; the previous tile's K/V/mask no longer read
        // K or V rows of the tile: f16 ones into the tile 16 bytes at a time; q8_0 ones as stored
        // into the staging area (dequantised once they have arrived)
        auto stage = [&](uint32_t tile_s, uint32_t raw_s, const char * base, int64_t nb1) {
            constexpr int CPR = D/8; // 16-byte pieces per row (of f16 values)
            if constexpr (Q8) {
                ls_mma_q8_stage<RB, KT>(raw_s, base, nb1, tk, w8, tid);
            } else {
                for (int i = tid; i < KT*CPR; i += LS_MMA_THREADS) {
                    const int key = tk[i / CPR], piece = i % CPR;
                    const int64_t j = key < 0 ? 0 : key;
                    ls_cp_async<16>(tile_s + ((i / CPR)*RH + piece*8)*sizeof(half), base + j*nb1 + piece*16, key >= 0);
                }
            }
        };
        stage(Ks_s, Kr_s, kbase, a.k_nb1);
        asm volatile("cp.async.commit_group;");
        // mask values in flight with K, as 4-byte words: for an f16 mask the aligned pair
        // holding the key's half, which the key's and the row's parities pick (no mask:
        // nothing to load, the key against the row's cell)
        if (tid < KT) {
            const int key = tk[tid];
            ksel[tid] = key < 0 ? -1 : a.mask ? key & 1 : key;
        }
        for (int i = tid; a.mask && i < n_q*KT; i += LS_MMA_THREADS) {
            const int ql = i / KT, key = tk[i % KT];
            const char * mr = a.mask ? a.mask + (r0 + q_first + ql)*a.mask_nb1 : nullptr;
            const char * src = mr == nullptr || key < 0 ? (const char *) a.q : !a.mask_f16 ? mr + key*sizeof(float) :
                (const char *) ((uintptr_t) (mr + key*sizeof(half)) & ~(uintptr_t) 3);
            ls_cp_async<4>(Ms_s + i*sizeof(uint32_t), src, mr != nullptr && key >= 0);
        }
        asm volatile("cp.async.commit_group;");
        stage(Vs_s, Vr_s, vbase, a.v_nb1);
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 1;");
        // the tile seen whole by every row (no mask, no empty slot, each key at or before the
        // block's first cell): most tiles, as only the band at the block's own cells is causal
        // within it; such a tile skips the masking and the per-query counting below
        const bool whole = __syncthreads_and(tid >= KT || (tk[tid] >= 0 && tk[tid] <= lo)) && !a.mask;
        if (whole) {
            if (tid < n_q) {
                q_seen[tid] += KT;
            }
        } else {
            // a warp's 32 slots belong to one query: count its keys <= the query's cell
            for (int i = tid; i < n_q*KT; i += LS_MMA_THREADS) {
                const int ql = i / KT, key = tk[i % KT];
                const int n_le = __popc(__ballot_sync(0xffffffff, key >= 0 && key <= q_cell[ql]));
                if (lane == 0) {
                    atomicAdd(&q_seen[ql], n_le);
                }
            }
        }
        if constexpr (Q8) {
            ls_mma_q8_dequant<D, RH, KT>(Ks, Kr, tid);
            __syncthreads();
        }

        float S[NT][4];
        if constexpr (QS) {
            ls_mma_qk_shared<D, RH, NT>(S, Qs_s, Ks_s, lane);
        } else {
            ls_mma_qk<D, RH>(S, qa, Ks_s, lane);
        }

        // softcap, mask, online softmax; the rows' maxima over the 4 lanes of a row
        float mx[2] = {-INFINITY, -INFINITY};
        if (whole) {
#pragma unroll
            for (int t = 0; t < NT; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float s = S[t][e];
                    if (a.softcap != 0.0f) {
                        s = a.softcap*tanhf(s);
                    }
                    S[t][e] = s*LOG2E;
                    mx[e >> 1] = fmaxf(mx[e >> 1], S[t][e]);
                }
            }
        } else {
#pragma unroll
            for (int t = 0; t < NT; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1, col = t*8 + 2*(lane % 4) + (e & 1);
                    float s = S[t][e];
                    if (a.softcap != 0.0f) {
                        s = a.softcap*tanhf(s);
                    }
                    const int ks = ksel[col];
                    const float m = ks < 0 ? -INFINITY : !a.mask ? (ks <= row_x[i] ? 0.0f : -INFINITY) :
                        ls_mask_word(Ms[row_m[i] + col], a.mask_f16, (ks + row_x[i]) & 1);
                    s = m != -INFINITY ? (s + m)*LOG2E : -INFINITY;
                    S[t][e] = s;
                    mx[i] = fmaxf(mx[i], s);
                }
            }
        }
        float corr[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
            const float Mn = fmaxf(M[i], mx[i]);
            corr[i] = Mn == -INFINITY ? 1.0f : exp2f(M[i] - Mn);
            M[i] = Mn;
            L[i] *= corr[i];
        }
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            O[n][0] *= corr[0]; O[n][1] *= corr[0];
            O[n][2] *= corr[1]; O[n][3] *= corr[1];
        }

        asm volatile("cp.async.wait_group 0;");
        __syncthreads();
        if constexpr (Q8) {
            ls_mma_q8_dequant<D, RH, KT>(Vs, Vr, tid);
            __syncthreads();
        }

        // O += P V, 16 keys at a time: the C fragments of S's n-tiles 2kk, 2kk+1 are the A
        // fragment of k-step kk; V^T fragments of two n-tiles per ldmatrix.x4.trans
#pragma unroll
        for (int kk = 0; kk < KT/16; ++kk) {
            uint32_t pa[4];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float p[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int i = e >> 1;
                    p[e] = M[i] == -INFINITY ? 0.0f : exp2f(S[2*kk + h][e] - M[i]);
                    L[i] += p[e];
                }
                pa[2*h + 0] = ls_pack_half2(p[0], p[1]);
                pa[2*h + 1] = ls_pack_half2(p[2], p[3]);
            }
#pragma unroll
            for (int n = 0; n < NO; n += 2) {
                uint32_t vb[4];
                const int m = lane / 8;
                const int key = kk*16 + (m & 1)*8 + lane % 8, d = n*8 + (m >> 1)*8;
                ls_ldmatrix_x4_trans(vb, Vs_s + (key*RH + d)*sizeof(half));
                ls_mma_16816(O[n],     pa, vb[0], vb[1]);
                ls_mma_16816(O[n + 1], pa, vb[2], vb[3]);
            }
        }
    };

    const int32_t * cols = a.sel + (2*g + 0)*a.sel_ld;
    const int32_t * offs = a.sel + (2*g + 1)*a.sel_ld;
    const int n_col = cols[0], n_off = offs[0];

    // 1. diagonal ranges
    for (int i0 = 0; i0 < n_off; i0 += LS_MMA_CHUNK) {
        const int i = i0 + tid;
        int len = 0, k0 = 0;
        if (i < n_off) {
            const int s = offs[1 + i];
            int e = min(hi - s, (int) a.n_kv - 1);
            if (i > 0) e = min(e, lo - offs[i] - 1);
            k0  = max(lo - s, 0);
            len = max(e - k0 + 1, 0);
        }
        int total;
        const int first = ls_block_exscan(len, shi, &total);
        scan[tid] = first + len;                 // inclusive
        scan[LS_MMA_CHUNK + tid] = k0 - first;   // key of slot o in this offset's range: o + this
        __syncthreads();
        for (int base = 0; base < total; base += KT) {
            if (tid < KT) {
                const int o = base + tid;
                int key = -1;
                if (o < total) {
                    int l = 0, h = LS_MMA_CHUNK - 1; // first entry with inclusive end > o
                    while (l < h) {
                        const int mid = (l + h) / 2;
                        if (scan[mid] <= o) l = mid + 1; else h = mid;
                    }
                    key = scan[LS_MMA_CHUNK + l] + o;
                }
                tile[tid] = key;
            }
            process(tile);
        }
        __syncthreads(); // scan reused
    }

    // 2. vertical columns outside every range
    int n_queued = 0;
    for (int i0 = 0; i0 < n_col; i0 += LS_MMA_CHUNK) {
        const int i = i0 + tid;
        int j = -1;
        if (i < n_col) {
            j = cols[1 + i];
            const int e = ls_lower_bound(offs + 1, n_off, lo - j);
            if (e < n_off && offs[1 + e] <= hi - j) {
                j = -1;
            }
        }
        int total;
        const int slot = ls_block_exscan(j >= 0, shi, &total);
        if (j >= 0) {
            queue[n_queued + slot] = j;
        }
        n_queued += total;
        int done = 0;
        for (; n_queued - done >= KT; done += KT) {
            process(queue + done);
        }
        __syncthreads();
        // move the rest (< KT) to the front; the regions do not overlap
        if (done > 0 && tid < n_queued - done) {
            queue[tid] = queue[done + tid];
        }
        n_queued -= done;
    }
    if (n_queued > 0) {
        __syncthreads();
        if (tid >= n_queued && tid < KT) {
            queue[tid] = -1;
        }
        process(queue);
    }

    // normalize and write; statistics per query head
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        L[i] += __shfl_xor_sync(0xffffffff, L[i], 1);
        L[i] += __shfl_xor_sync(0xffffffff, L[i], 2);
        if (!row_ok[i]) {
            continue;
        }
        const float inv = L[i] == 0.0f ? 0.0f : 1.0f/L[i];
        float * out = a.dst + row_h[i]*a.dst_nb1 + (r0 + row_ql[i])*a.dst_nb2;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            const int d = n*8 + 2*(lane % 4);
            out[d]     = O[n][2*i + 0]*inv;
            out[d + 1] = O[n][2*i + 1]*inv;
        }
        if (lane % 4 == 0) {
            const int ql = row_ql[i] - q_first;
            float * st = a.dst + row_h[i]*a.dst_nb1 + a.n_tokens*a.dst_nb2;
            atomicAdd(st + 0, (float) q_seen[ql]);
            atomicAdd(st + 1, (float) (q_cell[ql] + 1));
        }
    }
#endif // AMPERE_MMA_AVAILABLE
}

// false: its shared memory exceeds what the device gives a block (the SIMT kernel runs)
template <int D, bool Q8>
static bool ls_launch_mma(const ls_attn_args & a, size_t smem_max, cudaStream_t st) {
    const size_t smem = ls_mma_smem_bytes<D, Q8>((int) a.n_gqa);
    if (smem > smem_max) {
        return false;
    }
    const int n_chunk = (a.block_q*(int) a.n_gqa + LS_MMA_ROWS - 1) / LS_MMA_ROWS;
    const int64_t n_block = (a.n_tokens + a.block_q - 1) / a.block_q;
    const dim3 grid((unsigned) (n_block*n_chunk), (unsigned) (a.n_head/a.n_gqa));
    CUDA_CHECK(cudaFuncSetAttribute(ls_sparse_attn_mma_kernel<D, Q8>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem));
    ls_sparse_attn_mma_kernel<D, Q8><<<grid, LS_MMA_THREADS, smem, st>>>(a);
    return true;
}

bool ls_sparse_attn_mma(const ls_attn_args & a, int64_t D, int device, cudaStream_t st) {
    auto a16 = [](uint64_t x) { return x % 16 == 0; };
    const auto & dev = ggml_cuda_info().devices[device];
    auto a4 = [](uint64_t x) { return x % 4 == 0; };
    // f16: rows copied 16 bytes at a time; q8_0: 4 or 8 bytes at a time, V in rows
    const bool f16 = a.k_type == GGML_TYPE_F16 && a.v_type == GGML_TYPE_F16 && a.v_nb0 == sizeof(half) &&
        a16((uintptr_t) a.k) && a16((uintptr_t) a.v) && a16(a.k_nb1) && a16(a.k_nb2) && a16(a.v_nb1) && a16(a.v_nb2);
    const bool q8 = a.k_type == GGML_TYPE_Q8_0 && a.v_type == GGML_TYPE_Q8_0 && a.v_nb0 == sizeof(block_q8_0) &&
        a4((uintptr_t) a.k) && a4((uintptr_t) a.v) && a4(a.k_nb1) && a4(a.k_nb2) && a4(a.v_nb1) && a4(a.v_nb2);
    const bool ok = ampere_mma_available(dev.cc) && (f16 || q8) &&
        a.n_kv < INT32_MAX && (int64_t) a.block_q*a.n_gqa < INT32_MAX;
    if (!ok) {
        return false;
    }
    const size_t smem = ls_smem_max(device);
    switch (D) {
        case 64:  return q8 ? ls_launch_mma<64, true>(a, smem, st)  : ls_launch_mma<64, false>(a, smem, st);
        case 128: return q8 ? ls_launch_mma<128, true>(a, smem, st) : ls_launch_mma<128, false>(a, smem, st);
        case 256: return q8 ? ls_launch_mma<256, true>(a, smem, st) : ls_launch_mma<256, false>(a, smem, st);
        default:  return false;
    }
}
