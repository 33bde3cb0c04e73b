// loopserve-edge: Q4_1 weights times a batch of Q8_1 rows in register tiles, for
// ggml_compute_forward_mul_mat (patch 0013).
//
// Why: llama.cpp's CPU backend has no batched kernel for Q4_1 on x86 (no repacked layout,
// no llamafile case), so a prefill multiplies each weight row by each token row with
// ggml_vec_dot_q4_1_q8_1 alone, unpacking the row's nibbles and converting its scales once
// per token. The default model (SmolLM2-135M-Instruct Q4_1) spent most of a prefill there.
// Here a job of 64 weight rows x 32 token rows unpacks each of its weight blocks and converts
// each of its token blocks' scales once, and a register tile of RM rows x RN tokens loads each
// token block once for RM rows and each unpacked weight block once for RN tokens.
//
// Each output is the sum ggml_vec_dot_q4_1_q8_1 (arch/x86/quants.c) computes, in its order:
// per block an exact integer dot product, acc = fma(d_x * d_y, dot, acc) in 8 lanes, and
// summs = fma(m_x, s_y, summs) (the compiler contracts that loop's `summs += m * s`), then
// hsum(acc) + summs. So a prefill gives the same logits bit for bit, and a row's result
// does not depend on the other rows of the batch (a one-row product still takes that loop).

#include "loopserve.h"

#define GGML_COMMON_DECL_CPP
#include "ggml-common.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "simd-mappings.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

static std::atomic<uint64_t> ls_gemm_q4_1_calls{ 0 };

uint64_t ggml_cpu_loopserve_gemm_q4_1_calls(void) {
    return ls_gemm_q4_1_calls.load(std::memory_order_relaxed);
}

#if defined(__AVX2__) && defined(__FMA__)
#    include <immintrin.h>

// the tile: with 32 vector registers (AVX-512VL) 16 accumulators, else 8 (more would spill)
#    if defined(__AVX512VL__)
#        define LS_GEMM_RM 4
#        define LS_GEMM_RN 4
#    else
#        define LS_GEMM_RM 4
#        define LS_GEMM_RN 2
#    endif
// a job: this many weight rows x token rows (multiples of the tile)
#    define LS_GEMM_JOB_M 64
#    define LS_GEMM_JOB_N 32

static inline __m256i ls_nibbles_32(const uint8_t * qs) {
    // low nibbles are elements 0..15, high nibbles 16..31 (as bytes_from_nibbles_32)
    const __m128i tmp   = _mm_loadu_si128((const __m128i *) qs);
    const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
    return _mm256_and_si256(_mm256_set1_epi8(0xF), bytes);
}

static inline __m256 ls_dot_us8(const __m256i ax, const __m256i sy) {
    // 8 lanes of 4-byte dot products (exact in int32 whichever instruction forms them)
#    if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
#    elif defined(__AVXVNNI__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ax, sy));
#    else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy)));
#    endif
}

static inline float ls_hsum_8(const __m256 x) {
    // the order of hsum_float_8
    __m128 res = _mm256_extractf128_ps(x, 1);
    res        = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res        = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res        = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

// one product: C[j*ldc + i] = row i of A . row j of B (lda, ldb in blocks, nb blocks a row)
struct ls_gemm_q4_1_args {
    const block_q4_1 * A;
    int64_t            lda;
    const block_q8_1 * B;
    int64_t            ldb;
    float *            C;
    int64_t            ldc;
    int64_t            nb;
};

// A tile's weight rows unpacked once for all the columns of a job instead of once per RN of
// them, and the job's columns' scales in f32 (the unpacking and the f16 conversions took
// about half of a tile's instructions). Per block l: q the nibbles, d the scales, m[8*l + i]
// row i's minimum (zeros past the tile's rows), laid out as each tile below reads them; per
// column j: ys[2*(j*nb + l)] its block's scale, ys[2*(j*nb + l) + 1] its sum.
struct ls_gemm_q4_1_prep {
    std::vector<uint8_t> buf;  // the four below, 64-byte aligned
    uint8_t *            q;    // 128 bytes a block (4 rows x 32 nibbles as bytes)
    float *              d;    // 32 floats a block
    float *              m;    // 8 floats a block
    float *              ys;

    void reserve(int64_t nb, int64_t n_cols) {
        const size_t n_q = 128 * nb, n_d = sizeof(float) * 32 * nb, n_m = sizeof(float) * 8 * nb;
        buf.resize(n_q + n_d + n_m + sizeof(float) * 2 * n_cols * nb + 64);
        uint8_t * p = buf.data() + (64 - (uintptr_t) buf.data() % 64) % 64;
        q           = p;
        d           = (float *) (p + n_q);
        m           = (float *) (p + n_q + n_d);
        ys          = (float *) (p + n_q + n_d + n_m);
    }
};

// the scales of columns [j0, j1) (B's blocks as the vec_dot loop converts them)
static void ls_gemm_q4_1_scales(const ls_gemm_q4_1_args & g, int64_t j0, int64_t j1, ls_gemm_q4_1_prep & w) {
    for (int64_t j = j0; j < j1; ++j) {
        for (int64_t l = 0; l < g.nb; ++l) {
            const block_q8_1 & y                = g.B[j * g.ldb + l];
            w.ys[2 * ((j - j0) * g.nb + l)]     = GGML_CPU_FP16_TO_FP32(y.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.d);
            w.ys[2 * ((j - j0) * g.nb + l) + 1] = GGML_CPU_FP16_TO_FP32(y.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.s);
        }
    }
}

// rows i0 .. i0 + RM for the 256-bit tiles: q[l*RM + i] 32 bytes, d[l*RM + i]
template <int RM> static void ls_gemm_q4_1_unpack(const ls_gemm_q4_1_args & g, int64_t i0, ls_gemm_q4_1_prep & w) {
    const block_q4_1 * a  = g.A + i0 * g.lda;
    __m256i *          wq = (__m256i *) w.q;
    for (int64_t l = 0; l < g.nb; ++l) {
        for (int i = 0; i < 8; ++i) {
            w.m[8 * l + i] = 0.0f;
        }
        for (int i = 0; i < RM; ++i) {
            const block_q4_1 & x = a[i * g.lda + l];
            _mm256_store_si256(wq + l * RM + i, ls_nibbles_32(x.qs));
            w.d[l * RM + i] = GGML_CPU_FP16_TO_FP32(x.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.d);
            w.m[8 * l + i]  = GGML_CPU_FP16_TO_FP32(x.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.m);
        }
    }
}

// a tile's place: B's first column, C at the tile's first row and column, the columns' scales
struct ls_gemm_q4_1_at {
    const block_q8_1 * b;
    float *            c;
    const float *      ys;
};

// RM rows (unpacked in w) x RN columns
template <int RM, int RN>
static void ls_gemm_q4_1_tile(const ls_gemm_q4_1_args & g, const ls_gemm_q4_1_prep & w, const ls_gemm_q4_1_at & t) {
    const int64_t   ldb = g.ldb, ldc = g.ldc, nb = g.nb;
    const __m256i * wq = (const __m256i *) w.q;
    __m256          acc[RM][RN];
    __m128          summs[RN];  // lane i: row i (RM <= 4), one fma a block as the vec_dot loop's
    static_assert(RM <= 4, "one 4-lane vector of minima");
    for (int j = 0; j < RN; ++j) {
        for (int i = 0; i < RM; ++i) {
            acc[i][j] = _mm256_setzero_ps();
        }
        summs[j] = _mm_setzero_ps();
    }
    for (int64_t l = 0; l < nb; ++l) {
        const __m128 mx = _mm_load_ps(w.m + 8 * l);
        for (int j = 0; j < RN; ++j) {
            const block_q8_1 & y  = t.b[j * ldb + l];
            const float *      yd = t.ys + 2 * (j * nb + l);
            const __m256i      qy = _mm256_loadu_si256((const __m256i *) y.qs);
            summs[j]              = _mm_fmadd_ps(mx, _mm_set1_ps(yd[1]), summs[j]);
            for (int i = 0; i < RM; ++i) {
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(w.d[l * RM + i] * yd[0]),
                                            ls_dot_us8(_mm256_load_si256(wq + l * RM + i), qy), acc[i][j]);
            }
        }
    }
    for (int j = 0; j < RN; ++j) {
        alignas(16) float sm[4];
        _mm_store_ps(sm, summs[j]);
        for (int i = 0; i < RM; ++i) {
            t.c[j * ldc + i] = ls_hsum_8(acc[i][j]) + sm[i];
        }
    }
}

#    if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#        define LS_GEMM_512 1

// rows i0 .. i0 + 2*RP for the 512-bit tiles: per block and pair p of rows, q[l*RP + p] the
// nibbles as bytes (row 2p's 32 in the low 256 bits, row 2p+1's in the high), d[l*RP + p] the
// scales (lanes 0..7 row 2p's, 8..15 row 2p+1's)
template <int RP> static void ls_gemm_q4_1_unpack512(const ls_gemm_q4_1_args & g, int64_t i0, ls_gemm_q4_1_prep & w) {
    const block_q4_1 * a   = g.A + i0 * g.lda;
    const __m256i      low = _mm256_set1_epi8(0xF);
    __m512i *          wq  = (__m512i *) w.q;
    __m512 *           wd  = (__m512 *) w.d;
    for (int64_t l = 0; l < g.nb; ++l) {
        float * mrow = w.m + 8 * l;
        for (int i = 2 * RP; i < 8; ++i) {
            mrow[i] = 0.0f;
        }
        for (int p = 0; p < RP; ++p) {
            const block_q4_1 & x0 = a[(2 * p) * g.lda + l];
            const block_q4_1 & x1 = a[(2 * p + 1) * g.lda + l];
            // [x0 raw | x1 raw] -> [x0 low | x1 low], [x0 high | x1 high] -> [x0 low, x0 high, x1 low, x1 high]
            const __m256i      raw =
                _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) x0.qs)),
                                        _mm_loadu_si128((const __m128i *) x1.qs), 1);
            const __m256i lo = _mm256_and_si256(raw, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            const __m512i z  = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            _mm512_store_si512(wq + l * RP + p, _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0)));
            const __m256 d0 = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(x0.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.d));
            const __m256 d1 = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(x1.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.d));
            _mm512_store_ps(wd + l * RP + p,
                            _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(d0)),
                                                                _mm256_castps_pd(d1), 1)));
            mrow[2 * p]     = GGML_CPU_FP16_TO_FP32(x0.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.m);
            mrow[2 * p + 1] = GGML_CPU_FP16_TO_FP32(x1.GGML_COMMON_AGGR_U.GGML_COMMON_AGGR_S.m);
        }
    }
}

// 2*RP rows (unpacked in w) x RN columns, two rows per 512-bit vector: lanes 0..7 hold row
// 2p's 8 lanes of the loop above, lanes 8..15 row 2p+1's, so that each instruction serves two
// outputs with each lane's arithmetic unchanged
template <int RP, int RN>
static void ls_gemm_q4_1_tile512(const ls_gemm_q4_1_args & g, const ls_gemm_q4_1_prep & w, const ls_gemm_q4_1_at & t) {
    const int64_t   ldb = g.ldb, ldc = g.ldc, nb = g.nb;
    const __m512i * wq = (const __m512i *) w.q;
    const __m512 *  wd = (const __m512 *) w.d;
    __m512          acc[RP][RN];
    __m256          summs[RN];  // lane i: row i (2*RP <= 8)
    static_assert(2 * RP <= 8, "one 8-lane vector of minima");
    for (int j = 0; j < RN; ++j) {
        for (int p = 0; p < RP; ++p) {
            acc[p][j] = _mm512_setzero_ps();
        }
        summs[j] = _mm256_setzero_ps();
    }
    for (int64_t l = 0; l < nb; ++l) {
        const __m256 mx = _mm256_load_ps(w.m + 8 * l);
        for (int j = 0; j < RN; ++j) {
            const block_q8_1 & y  = t.b[j * ldb + l];
            const float *      yd = t.ys + 2 * (j * nb + l);
            const __m512i      qy = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) y.qs));
            const __m512       dy = _mm512_set1_ps(yd[0]);
            summs[j]              = _mm256_fmadd_ps(mx, _mm256_set1_ps(yd[1]), summs[j]);
            for (int p = 0; p < RP; ++p) {
#        if defined(__AVX512VNNI__)
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[l * RP + p], qy);
#        else
                const __m512i dot = _mm512_madd_epi16(_mm512_set1_epi16(1), _mm512_maddubs_epi16(wq[l * RP + p], qy));
#        endif
                acc[p][j] = _mm512_fmadd_ps(_mm512_mul_ps(wd[l * RP + p], dy), _mm512_cvtepi32_ps(dot), acc[p][j]);
            }
        }
    }
    for (int j = 0; j < RN; ++j) {
        alignas(32) float sm[8];
        _mm256_store_ps(sm, summs[j]);
        for (int p = 0; p < RP; ++p) {
            t.c[j * ldc + 2 * p] = ls_hsum_8(_mm512_castps512_ps256(acc[p][j])) + sm[2 * p];
            t.c[j * ldc + 2 * p + 1] =
                ls_hsum_8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[p][j]), 1))) + sm[2 * p + 1];
        }
    }
}
#    endif

// rows [i0, i1) x columns [j0, j1): whole tiles, then the edges a row or a column at a time
static void ls_gemm_q4_1_job(const ls_gemm_q4_1_args & g, int64_t i0, int64_t i1, int64_t j0, int64_t j1, bool narrow) {
    static thread_local ls_gemm_q4_1_prep w;
    w.reserve(g.nb, j1 - j0);
    ls_gemm_q4_1_scales(g, j0, j1, w);
    auto at = [&](int64_t i, int64_t j) {
        return ls_gemm_q4_1_at{ g.B + j * g.ldb, g.C + j * g.ldc + i, w.ys + 2 * (j - j0) * g.nb };
    };
#    if defined(LS_GEMM_512)
    if (!narrow) {
        // 4 rows x 8 columns per tile (the fastest of 2-8 x 3-16 on the default model); what is
        // left to the 256-bit tiles below
        constexpr int RP = 2, RN = 8;
        const int64_t im = i0 + (i1 - i0) / (2 * RP) * (2 * RP);
        const int64_t jm = j0 + (j1 - j0) / RN * RN;
        for (int64_t i = i0; i < im; i += 2 * RP) {
            ls_gemm_q4_1_unpack512<RP>(g, i, w);
            for (int64_t j = j0; j < jm; j += RN) {
                ls_gemm_q4_1_tile512<RP, RN>(g, w, at(i, j));
            }
            for (int64_t j = jm; j < j1; ++j) {
                ls_gemm_q4_1_tile512<RP, 1>(g, w, at(i, j));
            }
        }
        i0 = im;
    }
#    else
    GGML_UNUSED(narrow);
#    endif
    constexpr int RM = LS_GEMM_RM;
    constexpr int RN = LS_GEMM_RN;
    const int64_t im = i0 + (i1 - i0) / RM * RM;
    const int64_t jm = j0 + (j1 - j0) / RN * RN;
    for (int64_t i = i0; i < im; i += RM) {
        ls_gemm_q4_1_unpack<RM>(g, i, w);
        for (int64_t j = j0; j < jm; j += RN) {
            ls_gemm_q4_1_tile<RM, RN>(g, w, at(i, j));
        }
        for (int64_t j = jm; j < j1; ++j) {
            ls_gemm_q4_1_tile<RM, 1>(g, w, at(i, j));
        }
    }
    for (int64_t i = im; i < i1; ++i) {
        ls_gemm_q4_1_unpack<1>(g, i, w);
        for (int64_t j = j0; j < jm; j += RN) {
            ls_gemm_q4_1_tile<1, RN>(g, w, at(i, j));
        }
        for (int64_t j = jm; j < j1; ++j) {
            ls_gemm_q4_1_tile<1, 1>(g, w, at(i, j));
        }
    }
}

bool ggml_cpu_loopserve_mul_mat_q4_1(const struct ggml_compute_params * params,
                                     struct ggml_tensor *               dst,
                                     const void *                       wdata,
                                     size_t                             row_size) {
    const ggml_tensor * src0 = dst->src[0];
    const ggml_tensor * src1 = dst->src[1];
    // ggml's reference mode (use_ref: batch-invariant attention) keeps the tiles: each output is
    // the vec_dot loop's sum bit for bit whatever the batch, which is all that mode asks of a product
    if (src0->type != GGML_TYPE_Q4_1 || src1->type != GGML_TYPE_F32 || src1->ne[1] < 2) {
        return false;  // one row: the vec_dot loop, which computes the same
    }
    if (src0->ne[2] != 1 || src0->ne[3] != 1 || src1->ne[2] != 1 || src1->ne[3] != 1) {
        return false;  // batched or broadcast products: not the weights of a layer
    }
    // LOOPSERVE_Q4_1_GEMM=0 leaves every product to the vec_dot loop, =256 to the 256-bit tiles
    // alone (what a machine without AVX-512 runs); read per call, so that a test or benchmark
    // can compare them in one process
    const char * env = getenv("LOOPSERVE_Q4_1_GEMM");
    if (env != nullptr && strcmp(env, "0") == 0) {
        return false;
    }
    const bool narrow = env != nullptr && strcmp(env, "256") == 0;

    const int64_t           m = src0->ne[1];
    const int64_t           n = src1->ne[1];
    const ls_gemm_q4_1_args g = {
        (const block_q4_1 *) src0->data,
        (int64_t) (src0->nb[1] / sizeof(block_q4_1)),
        (const block_q8_1 *) wdata,
        (int64_t) (row_size / sizeof(block_q8_1)),
        (float *) dst->data,
        (int64_t) (dst->nb[1] / sizeof(float)),
        src0->ne[0] / QK4_1,
    };

    const int64_t n_jm   = (m + LS_GEMM_JOB_M - 1) / LS_GEMM_JOB_M;
    const int64_t n_jn   = (n + LS_GEMM_JOB_N - 1) / LS_GEMM_JOB_N;
    const int64_t n_jobs = n_jm * n_jn;
    // jobs handed out as the vec_dot loop's chunks are (thread ith starts at job ith; the
    // counter stands at nth since before the barrier the caller passed)
    for (int64_t job = params->ith; job < n_jobs; job = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t jm = job % n_jm;
        const int64_t jn = job / n_jm;
        const int64_t i0 = jm * LS_GEMM_JOB_M;
        const int64_t j0 = jn * LS_GEMM_JOB_N;
        ls_gemm_q4_1_job(g, i0, std::min(m, i0 + LS_GEMM_JOB_M), j0, std::min(n, j0 + LS_GEMM_JOB_N), narrow);
    }
    if (params->ith == 0) {
        ls_gemm_q4_1_calls.fetch_add(1, std::memory_order_relaxed);
    }
    return true;
}

#else

bool ggml_cpu_loopserve_mul_mat_q4_1(const struct ggml_compute_params * params,
                                     struct ggml_tensor *               dst,
                                     const void *                       wdata,
                                     size_t                             row_size) {
    // no AVX2 and FMA: the vec_dot loop
    GGML_UNUSED(params);
    GGML_UNUSED(dst);
    GGML_UNUSED(wdata);
    GGML_UNUSED(row_size);
    return false;
}

#endif
