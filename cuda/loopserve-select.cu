// loopserve-edge: the select op on the GPU (semantics: the CPU reference, ggml-loopserve.h).
// Per (KV head, kind) row of line scores: the fewest lines whose mass reaches alpha of the
// row's (clamped to [n_min, n_max]), as ascending indices after a count. Thresholds come from
// a radix search on the float bit pattern (scores are >= 0, so bit order is value order),
// ties broken by index like the reference's (score desc, index asc) order; the lists are
// written ascending with block scans, no sort.
//
// One block per row swept the row ~18 times from L2, and 16 rows (8 KV heads) fill 16 of an
// H100's 132 SMs: the op took ~0.28 ms of each 8B-shape layer at 128K, ~200 ms of the
// prefill. On sm_90 a cluster of LS_SEL_CLUSTER blocks shares a row: each block copies its
// segment into shared memory once, the passes read it there, and the blocks add their bins
// and counts through distributed shared memory. Elsewhere (and for rows too long for the
// blocks' shared memory, or where such clusters cannot be resident) one block reads the row
// from global memory, as before.

#include "loopserve.cuh"
#include "loopserve-attn.cuh"

#include <cooperative_groups.h>
#include <cstdint>

#define LS_SEL_THREADS 512
#define LS_SEL_BINS (LS_SEL_THREADS/WARP_SIZE)
#define LS_SEL_CLUSTER 8
// rows shorter than this take one block: a cluster launch buys nothing there
#define LS_SEL_CLUSTER_MIN 8192

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= GGML_CUDA_CC_HOPPER
#define LS_SEL_CLUSTER_AVAILABLE
#endif

// the line where a running sum over lines in descending bit order first reaches a goal
struct ls_sel_cut {
    uint32_t L;    // its bit pattern
    float    m_gt; // mass of the lines above it
    int      c_gt; // their count
    int      c_eq; // lines with exactly its bits
};

// CL: blocks of a cluster sharing one row (1: a block alone, reading global memory)
template <int CL>
static __global__ void __launch_bounds__(LS_SEL_THREADS, 1)
ls_select_kernel(const float * sc, int32_t * out, int64_t n_kv, float alpha,
        int n_min_v, int n_max_v, int n_min_s, int n_max_s, int n_sink, int n_local) {
#if !defined(LS_SEL_CLUSTER_AVAILABLE)
    if constexpr (CL > 1) {
        NO_DEVICE_CODE;
        return;
    }
#endif
    constexpr int NT = LS_SEL_THREADS, NB = LS_SEL_BINS;
    static_assert(NB == NT/WARP_SIZE, "one warp reduces one bin");
    __shared__ int   shi[32];
    __shared__ float bin_m[NB], bin0_m[NB]; // the pass's bins (the row's), the first pass's
    __shared__ int   bin_c[NB], bin0_c[NB];
    __shared__ float xm[2][NB];             // this block's bins, by pass parity
    __shared__ int   xc[2][NB];
#ifdef LS_SEL_CLUSTER_AVAILABLE
    __shared__ int   xi[2];                 // this block's tie and pick counts
#endif
    // a thread's private bins ([bin][thread]): no atomics, and a thread zeroes its own; with a
    // cluster, the block's segment of the row after them
    extern __shared__ __align__(16) char ls_sel_smem[];
    float * hm = (float *) ls_sel_smem;
    int   * hc = (int *) (hm + NB*NT);
    float * xs = (float *) (hc + NB*NT);
    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;

    const int64_t row = blockIdx.x / CL;
    const int kind = row % 2;
    const float * x = sc + row*n_kv;
    int32_t * o = out + row*(n_kv + 1);
    const int n_min = kind == 0 ? n_min_v : n_min_s;
    const int n_max = kind == 0 ? n_max_v : n_max_s;
    const int n_force = kind == 0 ? n_sink : n_local;

    // this block's lines [j0, j1)
    int rank = 0;
    int64_t j0 = 0, j1 = n_kv;
#ifdef LS_SEL_CLUSTER_AVAILABLE
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    if constexpr (CL > 1) {
        rank = (int) cluster.block_rank();
        const int64_t seg = (n_kv + CL - 1)/CL;
        j0 = min(rank*seg, n_kv);
        j1 = min(j0 + seg, n_kv);
        for (int64_t j = j0 + tid; j < j1; j += NT) {
            xs[j - j0] = x[j];
        }
        __syncthreads();
    }
#endif
    const int n_seg = (int) (j1 - j0);
    auto at = [&](int64_t j) { return CL > 1 ? xs[j - j0] : x[j]; };

    // visit(v) for every score of the block's lines: from shared memory, or with 16-byte
    // loads, several in flight per thread
    auto for_all = [&](auto visit) {
        if constexpr (CL > 1) {
#pragma unroll 8
            for (int i = tid; i < n_seg; i += NT) {
                visit(xs[i]);
            }
        } else {
            int64_t i1 = 0;
            if ((uintptr_t) x % 16 == 0) {
                const float4 * x4 = (const float4 *) x;
                i1 = n_kv/4;
#pragma unroll 4
                for (int64_t i = tid; i < i1; i += NT) {
                    const float4 v = x4[i];
                    visit(v.x); visit(v.y); visit(v.z); visit(v.w);
                }
                i1 *= 4;
            }
            for (int64_t j = i1 + tid; j < n_kv; j += NT) {
                visit(x[j]);
            }
        }
    };

    // the row's sum of an int (e: which exchange slot) and the sum over the blocks below
    // this one: the blocks' counts in rank order
    auto row_exscan = [&](int v, int e, int * total) -> int {
        int before = 0;
        *total = v;
#ifdef LS_SEL_CLUSTER_AVAILABLE
        if constexpr (CL > 1) {
            if (tid == 0) {
                xi[e] = v;
            }
            cluster.sync();
            *total = 0;
            for (int r = 0; r < CL; ++r) {
                const int w = *cluster.map_shared_rank(&xi[e], r);
                before += r < rank ? w : 0;
                *total += w;
            }
        }
#endif
        return before;
    };

    // the positive lines with bits in [lo, hi] into bins of 2^s bits: the row's in bin_m and
    // bin_c (p: the pass's parity, so that a block never overwrites bins another still reads)
    int pass = 0;
    auto histogram = [&](uint32_t lo, uint32_t hi, int s) {
        const int p = pass++ % 2;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            hm[b*NT + tid] = 0.0f;
            hc[b*NT + tid] = 0;
        }
        for_all([&](float v) {
            const uint32_t u = __float_as_uint(v);
            if (v > 0.0f && u >= lo && u <= hi) {
                const int b = (u - lo) >> s;
                hm[b*NT + tid] += v;
                hc[b*NT + tid] += 1;
            }
        });
        __syncthreads();
        float m = 0.0f;
        int   c = 0;
        for (int t = lane; t < NT; t += WARP_SIZE) {
            m += hm[warp*NT + t];
            c += hc[warp*NT + t];
        }
        m = warp_reduce_sum(m);
        c = warp_reduce_sum(c);
        if (lane == 0) {
            xm[p][warp] = m;
            xc[p][warp] = c;
        }
#ifdef LS_SEL_CLUSTER_AVAILABLE
        if constexpr (CL > 1) {
            // every block adds the blocks' bins in rank order: the same floats everywhere
            cluster.sync();
            if (tid < NB) {
                float rm = 0.0f;
                int   rc = 0;
                for (int r = 0; r < CL; ++r) {
                    rm += cluster.map_shared_rank(&xm[p][0], r)[tid];
                    rc += cluster.map_shared_rank(&xc[p][0], r)[tid];
                }
                bin_m[tid] = rm;
                bin_c[tid] = rc;
            }
            __syncthreads();
            return;
        }
#endif
        __syncthreads();
        if (tid < NB) {
            bin_m[tid] = xm[p][tid];
            bin_c[tid] = xc[p][tid];
        }
        __syncthreads();
    };

    // Radix search, 4 bits a pass: the largest bit pattern L whose lines with bits >= L reach
    // the goal, by mass or by count. Up to 8 passes, each positive line inside the pattern
    // interval adding to its bin (a bisection needs one pass per bit, ~30); the first pass,
    // over every positive line, is the one both searches share (bin0).
    auto search = [&](bool by_mass, float goal_m, int goal_c) {
        uint32_t lo = 0, width_log2 = 31;
        float base_m = 0.0f;
        int   base_c = 0;
        for (bool first = true; ; first = false) {
            const int s = max((int) width_log2 - 4, 0);
            const uint32_t hi = lo + (1u << width_log2) - 1; // inclusive: 2^31 does not overflow
            if (!first) {
                histogram(lo, hi, s);
            }
            const float * bm = first ? bin0_m : bin_m;
            const int   * bc = first ? bin0_c : bin_c;
            int b = (int) ((hi - lo) >> s);
            for (; b > 0; --b) {
                if (by_mass ? base_m + bm[b] >= goal_m : base_c + bc[b] >= goal_c) {
                    break;
                }
                base_m += bm[b];
                base_c += bc[b];
            }
            lo += (uint32_t) b << s;
            if (s == 0) {
                return ls_sel_cut{lo, base_m, base_c, bc[b]};
            }
            width_log2 = s;
        }
    };

    // the first pass: every positive line (bits below 2^31) into 16 bins; their sums are the
    // row's mass and count
    histogram(0, 0x7fffffffu, 27);
    if (tid < NB) {
        bin0_m[tid] = bin_m[tid];
        bin0_c[tid] = bin_c[tid];
    }
    float total = 0.0f;
    int   n_pos = 0;
    for (int b = 0; b < NB; ++b) {
        total += bin_m[b];
        n_pos += bin_c[b];
    }
    __syncthreads(); // bin0 is written
    int k = alpha >= 1.0f ? n_pos : 0; // alpha = 1: every line with mass
    // the k-th line's threshold, when the mass search found it already
    uint32_t Tk = 0xffffffffu;
    int ties = 0, k_mass = -1;
    if (total > 0.0f && alpha < 1.0f) {
        const float target = alpha*total;
        const ls_sel_cut c = search(true, target, 0);
        const float T = __uint_as_float(c.L);
        int need = T > 0.0f ? (int) ceilf((target - c.m_gt) / T) : c.c_eq;
        need = max(0, min(need, c.c_eq));
        k = c.c_gt + need;
        if (need > 0) {
            k_mass = k;
            Tk = c.L;
            ties = need;
        }
    }
    k = max(k, n_min);
    if (n_max > 0) k = min(k, n_max);
    k = min(k, n_pos);

    // threshold of the k-th line in (score desc, index asc) order (unless the clamps kept k)
    if (k != k_mass) {
        Tk = 0xffffffffu;
        ties = 0;
    }
    if (k > 0 && k != k_mass) {
        const ls_sel_cut c = search(false, 0.0f, k);
        Tk = c.L;
        ties = k - c.c_gt;
    }

    // write ascending: each warp a contiguous segment of the block's lines, 32 consecutive
    // lines a step (coalesced; a thread's own contiguous chunk made each load touch 32 lines),
    // scans over the warps and the blocks for tie ranks and slots
    const uint32_t below = (1u << lane) - 1;
    const int64_t seg = ((n_seg + NT/WARP_SIZE - 1)/(NT/WARP_SIZE) + WARP_SIZE - 1)/WARP_SIZE*WARP_SIZE;
    const int64_t s0 = min(j0 + warp*seg, j1), s1 = min(s0 + seg, j1);
    // the line j of this lane in a step: picked before ties are ranked, a tie
    auto line = [&](int64_t j, bool & pick, bool & tie) {
        const float v = j < s1 ? at(j) : 0.0f;
        const uint32_t b = __float_as_uint(v);
        const bool pos = v > 0.0f;
        pick = j < s1 && (j < n_force || (pos && Tk != 0xffffffffu && b > Tk));
        tie = pos && b == Tk;
    };
    int warp_ties = 0;
    for (int64_t jb = s0; jb < s1; jb += WARP_SIZE) {
        bool pick, tie;
        line(jb + lane, pick, tie);
        warp_ties += __popc(__ballot_sync(0xffffffff, tie));
    }
    int n_blk, n_out;
    int tie_base = __shfl_sync(0xffffffff, ls_block_exscan(lane == 0 ? warp_ties : 0, shi, &n_blk), 0);
    tie_base += row_exscan(n_blk, 0, &n_out);
    // the segment's picks: counted, then written after the slots are known
    int slot = 0;
    for (int write = 0; write < 2; ++write) {
        int tr = tie_base, n = 0;
        for (int64_t jb = s0; jb < s1; jb += WARP_SIZE) {
            bool pick, tie;
            line(jb + lane, pick, tie);
            const uint32_t tb = __ballot_sync(0xffffffff, tie);
            pick = pick || (tie && tr + __popc(tb & below) < ties);
            tr += __popc(tb);
            const uint32_t pb = __ballot_sync(0xffffffff, pick);
            if (write && pick) {
                o[1 + slot + n + __popc(pb & below)] = (int32_t) (jb + lane);
            }
            n += __popc(pb);
        }
        if (!write) {
            slot = __shfl_sync(0xffffffff, ls_block_exscan(lane == 0 ? n : 0, shi, &n_blk), 0);
            slot += row_exscan(n_blk, 1, &n_out);
        }
    }
    if (tid == 0 && rank == 0) {
        o[0] = n_out;
    }
#ifdef LS_SEL_CLUSTER_AVAILABLE
    if constexpr (CL > 1) {
        cluster.sync(); // no block leaves while another may still read its shared memory
    }
#endif
}

// Whether clusters of LS_SEL_CLUSTER blocks with this shared memory each can be resident at
// all: a cluster sits within one GPC, and a MIG slice or another sm_90 part may offer fewer
// SMs there than an H100's. Asked once per device and size (the largest size that fit and the
// smallest that did not are kept: residency only falls as the size grows).
static bool ls_select_cluster_fits(int device, const cudaLaunchConfig_t & cfg) {
    static size_t fit[GGML_CUDA_MAX_DEVICES]   = {};
    static size_t unfit[GGML_CUDA_MAX_DEVICES] = {};
    const size_t smem = cfg.dynamicSmemBytes;
    if (smem <= fit[device]) {
        return true;
    }
    if (unfit[device] != 0 && smem >= unfit[device]) {
        return false;
    }
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, (const void *) ls_select_kernel<LS_SEL_CLUSTER>, &cfg) != cudaSuccess) {
        (void) cudaGetLastError();
        n = 0;
    }
    if (n > 0) {
        fit[device] = smem;
    } else {
        unfit[device] = smem;
    }
    return n > 0;
}

size_t ls_select_smem_min() {
    return 2*LS_SEL_BINS*LS_SEL_THREADS*sizeof(float);
}

void ls_select(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * sc = dst->src[0];
    cudaStream_t st = ctx.stream();
    float alpha;
    memcpy(&alpha, &dst->op_params[1], sizeof(float));
    const int32_t * p = dst->op_params;
    const int64_t n_kv = sc->ne[0], n_rows = 2*sc->ne[2];
    const auto & dev = ggml_cuda_info().devices[ctx.device];
    const size_t bins = ls_select_smem_min();
    GGML_ASSERT(bins <= ls_smem_max(ctx.device) && "loopserve: the selection's shared memory exceeds the device's (supports_op says so)");
    const size_t smem_cl = bins + (size_t) ((n_kv + LS_SEL_CLUSTER - 1)/LS_SEL_CLUSTER)*sizeof(float);
    if (GGML_CUDA_CC_IS_NVIDIA(dev.cc) && ggml_cuda_highest_compiled_arch(dev.cc) >= GGML_CUDA_CC_HOPPER &&
            n_kv >= LS_SEL_CLUSTER_MIN && smem_cl + 2048 <= ls_smem_max(ctx.device)) {
        auto * kern = ls_select_kernel<LS_SEL_CLUSTER>;
        CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem_cl));
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3((unsigned) (n_rows*LS_SEL_CLUSTER));
        cfg.blockDim = dim3(LS_SEL_THREADS);
        cfg.dynamicSmemBytes = smem_cl;
        cfg.stream = st;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = LS_SEL_CLUSTER;
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        if (ls_select_cluster_fits(ctx.device, cfg)) {
            CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, (const float *) sc->data, (int32_t *) dst->data, n_kv, alpha,
                    (int) p[2], (int) p[3], (int) p[4], (int) p[5], (int) p[6], (int) p[7]));
            return;
        }
    }
    CUDA_CHECK(cudaFuncSetAttribute(ls_select_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) bins));
    ls_select_kernel<1><<<n_rows, LS_SEL_THREADS, bins, st>>>((const float *) sc->data, (int32_t *) dst->data,
            n_kv, alpha, p[2], p[3], p[4], p[5], p[6], p[7]);
}
