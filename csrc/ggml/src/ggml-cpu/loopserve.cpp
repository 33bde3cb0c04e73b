// loopserve-edge: CPU implementation of GGML_OP_LOOPSERVE, the reference for the
// vertical-slash sparse prefill ops (semantics in ggml/include/ggml-loopserve.h).
// Multi-threaded; correct for any input the constructors accept.

#include "loopserve.h"

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ggml-loopserve.h"
#include "simd-mappings.h"
#include "traits.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

// f16 values read as f32 vectors (GGML_F32_VEC): AVX-512 converts in AVX512F, AVX needs F16C
#if defined(__AVX512F__)
#    define LS_FA_F16_LOAD(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (p)))
#elif defined(__AVX__) && defined(__F16C__)
#    define LS_FA_F16_LOAD(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (p)))
#endif

// The sparse attention works on a block of query rows and a KV head at a time, with the
// block's (row, query head) pairs along the vector lanes: scores as [key][pair], the output
// as [d][pair], Q as [d][pair]. Then K and V rows are read as they are stored (each value
// broadcast to a vector of pairs), the softmax's maxima, exponentials and sums run across
// pairs in vectors, and no product needs a transpose or a horizontal sum (the earlier layout,
// pairs x keys, gathered K and V transposed and summed lanes at the end of every dot: with
// flash attention's V rows it spent more time arranging data than multiplying).

// keys per chunk (scratch per thread: (DK + DV + pairs) x 4 x this bytes, within L1 for the
// default model's 63 pairs)
#define LS_CPU_CHUNK 64

// keys (scores) or values of d (output) per register block: with 32 vector registers
// (AVX-512) 4 x 4 accumulators, with 16 2 x 4 (more would spill)
#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE) && GGML_F32_EPR >= 16
#    define LS_CPU_RB 4
#else
#    define LS_CPU_RB 2
#endif
// pair vectors per register block
#define LS_CPU_PV 4

#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE)
#    define LS_CPU_VL GGML_F32_EPR
#else
#    define LS_CPU_VL 1
#endif

// S[i][v] = sum_d K[i*ldk + d] QT[d][v] for KB keys and PV vectors of pairs (lanes v), S's
// and QT's rows lds and ldq floats apart
template <int KB, int PV>
static void
ls_cpu_scores(float * S, int64_t lds, const float * K, int64_t ldk, const float * QT, int64_t ldq, int64_t DK) {
#if LS_CPU_VL > 1
    GGML_F32_VEC acc[KB][PV];
    for (int k = 0; k < KB; ++k) {
        for (int v = 0; v < PV; ++v) {
            acc[k][v] = GGML_F32_VEC_ZERO;
        }
    }
    for (int64_t d = 0; d < DK; ++d) {
        GGML_F32_VEC q[PV];
        for (int v = 0; v < PV; ++v) {
            q[v] = GGML_F32_VEC_LOAD(QT + d * ldq + v * LS_CPU_VL);
        }
        for (int k = 0; k < KB; ++k) {
            const GGML_F32_VEC kv = GGML_F32_VEC_SET1(K[k * ldk + d]);
            for (int v = 0; v < PV; ++v) {
                acc[k][v] = GGML_F32_VEC_FMA(acc[k][v], q[v], kv);
            }
        }
    }
    for (int k = 0; k < KB; ++k) {
        for (int v = 0; v < PV; ++v) {
            GGML_F32_VEC_STORE(S + k * lds + v * LS_CPU_VL, acc[k][v]);
        }
    }
#else
    for (int k = 0; k < KB; ++k) {
        for (int v = 0; v < PV; ++v) {
            float s = 0.0f;
            for (int64_t d = 0; d < DK; ++d) {
                s += K[k * ldk + d] * QT[d * ldq + v];
            }
            S[k * lds + v] = s;
        }
    }
#endif
}

// O[j][v] += sum_i V[i*svi + j*svd] P[i][v] for DB values j and PV vectors of pairs over n
// keys, O's and P's rows ldo and ldp floats apart
template <int DB, int PV>
static void
ls_cpu_out(float * O, int64_t ldo, const float * P, int64_t ldp, const float * V, int64_t svi, int64_t svd, int64_t n) {
#if LS_CPU_VL > 1
    GGML_F32_VEC acc[DB][PV];
    for (int j = 0; j < DB; ++j) {
        for (int v = 0; v < PV; ++v) {
            acc[j][v] = GGML_F32_VEC_LOAD(O + j * ldo + v * LS_CPU_VL);
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        GGML_F32_VEC p[PV];
        for (int v = 0; v < PV; ++v) {
            p[v] = GGML_F32_VEC_LOAD(P + i * ldp + v * LS_CPU_VL);
        }
        for (int j = 0; j < DB; ++j) {
            const GGML_F32_VEC vv = GGML_F32_VEC_SET1(V[i * svi + j * svd]);
            for (int v = 0; v < PV; ++v) {
                acc[j][v] = GGML_F32_VEC_FMA(acc[j][v], p[v], vv);
            }
        }
    }
    for (int j = 0; j < DB; ++j) {
        for (int v = 0; v < PV; ++v) {
            GGML_F32_VEC_STORE(O + j * ldo + v * LS_CPU_VL, acc[j][v]);
        }
    }
#else
    for (int j = 0; j < DB; ++j) {
        for (int v = 0; v < PV; ++v) {
            for (int64_t i = 0; i < n; ++i) {
                O[j * ldo + v] += V[i * svi + j * svd] * P[i * ldp + v];
            }
        }
    }
#endif
}

// f(v, PV) over nv vectors of pairs: LS_CPU_PV vectors at a time from vector v, then one at a
// time (PV a std::integral_constant, so that each call picks its register block at compile time)
template <typename F> static void ls_cpu_each_pv(int64_t nv, F && f) {
    int64_t v = 0;
    for (; v + LS_CPU_PV <= nv; v += LS_CPU_PV) {
        f(v, std::integral_constant<int, LS_CPU_PV>{});
    }
    for (; v < nv; ++v) {
        f(v, std::integral_constant<int, 1>{});
    }
}

// S[i][p] = sum_d K[i][d] QT[d][p] for n keys (K's rows DK apart) and nl lanes of pairs
static void ls_cpu_scores_chunk(float * S, const float * K, int64_t n, int64_t DK, const float * QT, int64_t nl) {
    int64_t i = 0;
    for (; i + LS_CPU_RB <= n; i += LS_CPU_RB) {
        ls_cpu_each_pv(nl / LS_CPU_VL, [&](int64_t v, auto pv) {
            ls_cpu_scores<LS_CPU_RB, decltype(pv)::value>(S + i * nl + v * LS_CPU_VL, nl, K + i * DK, DK,
                                                          QT + v * LS_CPU_VL, nl, DK);
        });
    }
    for (; i < n; ++i) {
        ls_cpu_each_pv(nl / LS_CPU_VL, [&](int64_t v, auto pv) {
            ls_cpu_scores<1, decltype(pv)::value>(S + i * nl + v * LS_CPU_VL, nl, K + i * DK, DK, QT + v * LS_CPU_VL,
                                                  nl, DK);
        });
    }
}

// O[d][p] += sum_i V[i*svi + d*svd] P[i][p] for d < DV, n keys and nl lanes of pairs
static void ls_cpu_out_chunk(float *       O,
                             const float * P,
                             const float * V,
                             int64_t       svi,
                             int64_t       svd,
                             int64_t       n,
                             int64_t       DV,
                             int64_t       nl) {
    int64_t d = 0;
    for (; d + LS_CPU_RB <= DV; d += LS_CPU_RB) {
        ls_cpu_each_pv(nl / LS_CPU_VL, [&](int64_t v, auto pv) {
            ls_cpu_out<LS_CPU_RB, decltype(pv)::value>(O + d * nl + v * LS_CPU_VL, nl, P + v * LS_CPU_VL, nl,
                                                       V + d * svd, svi, svd, n);
        });
    }
    for (; d < DV; ++d) {
        ls_cpu_each_pv(nl / LS_CPU_VL, [&](int64_t v, auto pv) {
            ls_cpu_out<1, decltype(pv)::value>(O + d * nl + v * LS_CPU_VL, nl, P + v * LS_CPU_VL, nl, V + d * svd, svi,
                                               svd, n);
        });
    }
}

// pairs rounded up to whole vectors
static int64_t ls_cpu_pair_lanes(int64_t n_pair) {
    return (n_pair + LS_CPU_VL - 1) / LS_CPU_VL * LS_CPU_VL;
}

// floats of the sparse attention's per-thread scratch after the key list
static int64_t ls_cpu_attn_floats(int64_t DK, int64_t DV, int64_t n_pair) {
    const int64_t np = ls_cpu_pair_lanes(n_pair);
    // K and V rows of a chunk, its scores, Q^T, O^T, and five floats a pair (ls_sparse_attn)
    return LS_CPU_CHUNK * (DK + DV + np) + np * (DK + DV + 5);
}

// n f16 values to f32: whole vectors inline where SIMD converts them (a call per key row of
// a chunk cost about a tenth of the sparse attention), the rest through the CPU backend's
// vector conversion (the type traits' one is a scalar loop in ggml-base)
static inline void ls_f16_to_f32(const ggml_fp16_t * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t n) {
    int64_t i = 0;
#if defined(GGML_SIMD) && defined(LS_FA_F16_LOAD)
    for (; i + GGML_F32_EPR <= n; i += GGML_F32_EPR) {
        GGML_F32_VEC_STORE(y + i, LS_FA_F16_LOAD(x + i));
    }
#endif
    if (i < n) {
        ggml_cpu_fp16_to_fp32(x + i, y + i, n - i);
    }
}

static float ls_param_f(const ggml_tensor * t, int i) {
    float f;
    memcpy(&f, &t->op_params[i], sizeof(f));
    return f;
}

// the shapes and score scale of the attention-like ops: q [DK, n_rows, n_head], k [DK, n_kv,
// n_head_kv], the scale (op parameter 1) divided by the logit softcap (parameter 2) where one
// is set, as ggml_flash_attn_ext applies them
struct ls_qk {
    int64_t DK, n_kv, n_head_kv, n_rows, n_head, n_gqa;
    float   scale, softcap;
};

static ls_qk ls_qk_of(const ggml_tensor * dst, const ggml_tensor * q, const ggml_tensor * k) {
    const float softcap = ls_param_f(dst, 2);
    const float scale   = ls_param_f(dst, 1);
    return { k->ne[0],
             k->ne[1],
             k->ne[2],
             q->ne[1],
             q->ne[2],
             q->ne[2] / k->ne[2],
             softcap != 0.0f ? scale / softcap : scale,
             softcap };
}

static int64_t ls_cell(const ggml_tensor * q_cells, int64_t i, int64_t cell_mod) {
    const int64_t c =
        q_cells->type == GGML_TYPE_I64 ? ((const int64_t *) q_cells->data)[i] : ((const int32_t *) q_cells->data)[i];
    return c % cell_mod;
}

static size_t ls_align(size_t n) {
    return (n + 63) & ~(size_t) 63;
}

//
// vertical and slash scores
//

// sums of p [n_kv, n_rows, n_head] (byte strides p_nb1, p_nb2) into dst; tasks of this thread
static void ls_vs_sums(const ggml_compute_params * params,
                       const char *                p,
                       size_t                      p_nb1,
                       size_t                      p_nb2,
                       int64_t                     n_rows,
                       int64_t                     n_head,
                       const ggml_tensor *         q_cells,
                       int64_t                     cell_mod,
                       ggml_tensor *               dst) {
    const int64_t n_kv      = dst->ne[0];
    const int64_t n_head_kv = dst->ne[2];
    const int64_t n_gqa     = n_head / n_head_kv;

    // tasks: (KV head, chunk of n_kv); each writes its own part of dst
    const int64_t chunk   = 1024;
    const int64_t n_chunk = (n_kv + chunk - 1) / chunk;
    for (int64_t task = params->ith; task < n_head_kv * n_chunk; task += params->nth) {
        const int64_t g     = task / n_chunk;
        const int64_t j0    = (task % n_chunk) * chunk;
        const int64_t j1    = std::min(n_kv, j0 + chunk);
        float *       vert  = (float *) ((char *) dst->data + 0 * dst->nb[1] + g * dst->nb[2]);
        float *       slash = (float *) ((char *) dst->data + 1 * dst->nb[1] + g * dst->nb[2]);
        for (int64_t j = j0; j < j1; ++j) {
            vert[j]  = 0.0f;
            slash[j] = 0.0f;
        }
        for (int64_t h = g * n_gqa; h < (g + 1) * n_gqa; ++h) {
            for (int64_t r = 0; r < n_rows; ++r) {
                const float * pr = (const float *) (p + r * p_nb1 + h * p_nb2);
                for (int64_t j = j0; j < j1; ++j) {
                    vert[j] += pr[j];
                }
                // offset s covers key c - s
                const int64_t c  = ls_cell(q_cells, r, cell_mod);
                const int64_t s1 = std::min(j1, c + 1);
                for (int64_t s = j0; s < s1; ++s) {
                    if (c - s < n_kv) {
                        slash[s] += pr[c - s];
                    }
                }
            }
        }
    }
}

static void ls_vs_scores(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * p = dst->src[0];
    ls_vs_sums(params, (const char *) p->data, p->nb[1], p->nb[2], p->ne[1], p->ne[2], dst->src[1], dst->op_params[2],
               dst);
}

// QT[d][p] = f(Q of pair p) for the np (row, query head) pairs of rows from r0 and KV head g
// (pair p: row r0 + p / n_gqa, head g*n_gqa + p % n_gqa), 0 in the lanes from np to nl
template <typename F>
static void
ls_cpu_qt(float * QT, const ggml_tensor * q, int64_t r0, int64_t g, int64_t n_gqa, int64_t np, int64_t nl, F && f) {
    const int64_t DK = q->ne[0];
    memset(QT, 0, DK * nl * sizeof(float));
    for (int64_t p = 0; p < np; ++p) {
        const int64_t r = r0 + p / n_gqa, h = g * n_gqa + p % n_gqa;
        const float * pq = (const float *) ((const char *) q->data + r * q->nb[1] + h * q->nb[2]);
        for (int64_t d = 0; d < DK; ++d) {
            QT[d * nl + p] = f(pq[d]);
        }
    }
}

// rows of one estimation task: its (row, query head) pairs fill about one block of lanes of
// the sparse attention's products (ls_cpu_scores)
static int64_t ls_est_rows(int64_t n_gqa) {
    return std::max<int64_t>(1, 64 / n_gqa);
}

// per-thread floats of the estimation after the probabilities and the rows' maxima: a chunk of
// K rows, its scores, Q^T and the pairs' maxima
static int64_t ls_est_floats(int64_t DK, int64_t n_gqa) {
    const int64_t nl = ls_cpu_pair_lanes(ls_est_rows(n_gqa) * n_gqa);
    return LS_CPU_CHUNK * (DK + nl) + nl * (DK + 1);
}

// the probabilities in the work buffer ([n_kv, n_rows, n_head], shared by the threads),
// then the sums as ggml_loopserve_vs_scores. The scores of a task's rows and the query heads
// of one KV head come from the sparse attention's lane-wise product (K rows read once for
// them all; one dot product call per row, head and key took most of this op's time), each
// row's softmax then runs over its contiguous probabilities in SIMD.
static void ls_vs_estimate(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * q       = dst->src[0];
    const ggml_tensor * k       = dst->src[1];
    const ggml_tensor * mask    = dst->src[2];
    const ggml_tensor * q_cells = dst->src[3];

    const auto [DK, n_kv, n_head_kv, n_rows, n_head, n_gqa, scale, softcap] = ls_qk_of(dst, q, k);

    constexpr int64_t CH = LS_CPU_CHUNK;

    float *       P      = (float *) params->wdata;  // [n_head][n_rows][n_kv]
    float *       MX     = (float *) ((char *) params->wdata + ls_align(sizeof(float) * n_kv * n_rows * n_head));
    const int64_t rows_t = ls_est_rows(n_gqa);
    const int64_t NPL    = ls_cpu_pair_lanes(rows_t * n_gqa);
    float *       Kc     = (float *) ((char *) MX + ls_align(sizeof(float) * n_rows * n_head) +
                            params->ith * ls_align(sizeof(float) * ls_est_floats(DK, n_gqa)));
    float *       S      = Kc + CH * DK;   // [CH][lanes]
    float *       QT     = S + CH * NPL;   // [DK][lanes]: Q^T, rounded to f16 as the GPU's kernel reads it
    float *       M      = QT + DK * NPL;  // [lanes]: maxima

    // scores (scaled, capped, masked) into P and each row's maximum into MX
    const int64_t n_rb = (n_rows + rows_t - 1) / rows_t;
    for (int64_t task = params->ith; task < n_head_kv * n_rb; task += params->nth) {
        const int64_t g  = task / n_rb;
        const int64_t r0 = (task % n_rb) * rows_t;
        const int64_t r1 = std::min(n_rows, r0 + rows_t);
        const int64_t np = (r1 - r0) * n_gqa;  // pair p: row r0 + p / n_gqa, head g*n_gqa + p % n_gqa
        const int64_t nl = ls_cpu_pair_lanes(np);
        ls_cpu_qt(QT, q, r0, g, n_gqa, np, nl, [](float x) { return GGML_CPU_FP16_TO_FP32(GGML_CPU_FP32_TO_FP16(x)); });
        for (int64_t p = 0; p < np; ++p) {
            M[p] = -INFINITY;
        }
        for (int64_t j0 = 0; j0 < n_kv; j0 += CH) {
            const int64_t n_c = std::min(CH, n_kv - j0);
            for (int64_t i = 0; i < n_c; ++i) {
                ls_f16_to_f32((const ggml_fp16_t *) ((const char *) k->data + (j0 + i) * k->nb[1] + g * k->nb[2]),
                              Kc + i * DK, DK);
            }
            ls_cpu_scores_chunk(S, Kc, n_c, DK, QT, nl);
            for (int64_t p = 0; p < np; ++p) {
                const int64_t r = r0 + p / n_gqa, h = g * n_gqa + p % n_gqa;
                const char *  mrow = mask ? (const char *) mask->data + r * mask->nb[1] : nullptr;
                const int64_t c    = ls_cell(q_cells, r, dst->op_params[3]);
                float *       pr   = P + (h * n_rows + r) * n_kv;
                float         mx   = M[p];
                for (int64_t i = 0; i < n_c; ++i) {
                    const int64_t j  = j0 + i;
                    float         mv = 0.0f;
                    if (mrow) {
                        mv = mask->type == GGML_TYPE_F16 ? GGML_CPU_FP16_TO_FP32(((const ggml_fp16_t *) mrow)[j]) :
                                                           ((const float *) mrow)[j];
                    }
                    float s = -INFINITY;
                    if (mv != -INFINITY && (mrow || j <= c)) {  // no mask: causal in cells
                        s = S[i * nl + p] * scale;
                        if (softcap != 0.0f) {
                            s = softcap * tanhf(s);
                        }
                        s += mv;
                    }
                    pr[j] = s;
                    mx    = std::max(mx, s);
                }
                M[p] = mx;
            }
        }
        for (int64_t p = 0; p < np; ++p) {
            MX[(g * n_gqa + p % n_gqa) * n_rows + r0 + p / n_gqa] = M[p];
        }
    }
    ggml_barrier(params->threadpool);

    // softmax of each row and head (a row that sees nothing contributes nothing)
    for (int64_t task = params->ith; task < n_rows * n_head; task += params->nth) {
        float *     pr = P + task * n_kv;
        const float mx = MX[task];
        if (mx == -INFINITY) {
            memset(pr, 0, n_kv * sizeof(float));
            continue;
        }
        const ggml_float sum = ggml_vec_soft_max_f32((int) n_kv, pr, pr, mx);
        ggml_vec_scale_f32((int) n_kv, pr, sum > 0.0 ? (float) (1.0 / sum) : 0.0f);
    }
    ggml_barrier(params->threadpool);
    ls_vs_sums(params, (const char *) P, sizeof(float) * n_kv, sizeof(float) * n_kv * n_rows, n_rows, n_head, q_cells,
               dst->op_params[3], dst);
}

//
// selection
//

static void ls_select(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * sc        = dst->src[0];
    const int64_t       n_kv      = sc->ne[0];
    const int64_t       n_head_kv = sc->ne[2];
    const float         alpha     = ls_param_f(dst, 1);

    int32_t * order = (int32_t *) ((char *) params->wdata + params->ith * ggml_cpu_loopserve_work_size(dst, 1));
    uint8_t * pick  = (uint8_t *) (order + n_kv);

    for (int64_t task = params->ith; task < 2 * n_head_kv; task += params->nth) {
        const int64_t kind    = task % 2;
        const int64_t g       = task / 2;
        const int32_t n_min   = dst->op_params[kind == 0 ? 2 : 4];
        const int32_t n_max   = dst->op_params[kind == 0 ? 3 : 5];
        const int32_t n_force = dst->op_params[kind == 0 ? 6 : 7];
        const float * x       = (const float *) ((const char *) sc->data + kind * sc->nb[1] + g * sc->nb[2]);

        double  total = 0.0;
        int64_t n_pos = 0;
        for (int64_t j = 0; j < n_kv; ++j) {
            if (x[j] > 0.0f) {
                total += x[j];
                order[n_pos++] = (int32_t) j;
            }
        }
        std::sort(order, order + n_pos, [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
        // alpha = 1: every line with mass (a prefix sum may reach the total early by rounding)
        int64_t      k      = n_pos;
        const double target = (double) alpha * total;
        double       acc    = 0.0;
        for (int64_t i = 0; alpha < 1.0f && i < n_pos; ++i) {
            acc += x[order[i]];
            if (acc >= target) {
                k = i + 1;
                break;
            }
        }
        k = std::max<int64_t>(k, n_min);
        if (n_max > 0) {
            k = std::min<int64_t>(k, n_max);
        }
        k = std::min(k, n_pos);

        memset(pick, 0, n_kv);
        for (int64_t i = 0; i < k; ++i) {
            pick[order[i]] = 1;
        }
        for (int64_t j = 0; j < std::min<int64_t>(n_force, n_kv); ++j) {
            pick[j] = 1;
        }
        int32_t * out = (int32_t *) ((char *) dst->data + kind * dst->nb[1] + g * dst->nb[2]);
        int32_t   n   = 0;
        for (int64_t j = 0; j < n_kv; ++j) {
            if (pick[j]) {
                out[1 + n++] = (int32_t) j;
            }
        }
        out[0] = n;
    }
}

//
// sparse attention
//

// The sorted key set K(b, g) of a query block with cells in [lo, hi] (ggml-loopserve.h):
// the ranges of the slash offsets merged, plus the vertical columns outside them.
static int64_t ls_block_keys(const int32_t * cols,
                             const int32_t * offs,
                             int64_t         lo,
                             int64_t         hi,
                             int64_t         n_kv,
                             int32_t *       keys) {
    const int32_t n_col           = cols[0];
    const int32_t n_off           = offs[0];
    int64_t       n               = 0;
    int32_t       ic              = 1;
    auto          emit_cols_below = [&](int64_t end) {  // columns < end
        while (ic <= n_col && cols[ic] < end) {
            keys[n++] = cols[ic++];
        }
    };
    // offsets ascending -> ranges [lo - s, hi - s] descending: walk them backwards
    int64_t cur0 = -1, cur1 = -2;
    auto    flush = [&]() {
        if (cur1 < cur0) {
            return;
        }
        emit_cols_below(cur0);
        for (int64_t j = cur0; j <= cur1; ++j) {
            keys[n++] = (int32_t) j;
        }
        while (ic <= n_col && cols[ic] <= cur1) {
            ic++;  // covered by the range
        }
    };
    for (int32_t i = n_off; i >= 1; --i) {
        const int64_t s  = offs[i];
        int64_t       r0 = lo - s;
        int64_t       r1 = std::min(hi - s, n_kv - 1);
        if (r1 < 0) {
            continue;
        }
        r0 = std::max<int64_t>(r0, 0);
        if (r1 < r0) {
            continue;
        }
        if (r0 <= cur1 + 1) {
            cur1 = std::max(cur1, r1);
        } else {
            flush();
            cur0 = r0;
            cur1 = r1;
        }
    }
    flush();
    emit_cols_below(n_kv);
    return n;
}

static void ls_sparse_attn(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * q       = dst->src[0];
    const ggml_tensor * k       = dst->src[1];
    const ggml_tensor * v       = dst->src[2];
    const ggml_tensor * mask    = dst->src[3];
    const ggml_tensor * q_cells = dst->src[4];
    const ggml_tensor * sel     = dst->src[5];

    const auto [DK, n_kv, n_head_kv, n_tokens, n_head, n_gqa, scale, softcap] = ls_qk_of(dst, q, k);

    const int64_t DV       = v->ne[0];
    const int64_t block_q  = dst->op_params[3];
    const int64_t cell_mod = dst->op_params[4];

    // f16 rows converted inline (ls_f16_to_f32); other types through their type traits
    const ggml_to_float_t k_to_float = ggml_get_type_traits(k->type)->to_float;
    const ggml_to_float_t v_to_float = ggml_get_type_traits(v->type)->to_float;
    const bool            v_rows     = v->nb[0] == ggml_type_size(v->type);  // else transposed f16/f32
    GGML_ASSERT((k->type == GGML_TYPE_F32 || k->type == GGML_TYPE_F16 || k_to_float) &&
                "loopserve sparse attention: unsupported K type");
    GGML_ASSERT((v->type == GGML_TYPE_F32 || v->type == GGML_TYPE_F16 || v_to_float) &&
                "loopserve sparse attention: unsupported V type");
    auto row_to_f32 = [](const ggml_tensor * t, ggml_to_float_t to_float, const char * x, float * y, int64_t n) {
        if (t->type == GGML_TYPE_F32) {
            memcpy(y, x, n * sizeof(float));
        } else if (t->type == GGML_TYPE_F16) {
            ls_f16_to_f32((const ggml_fp16_t *) x, y, n);
        } else {
            to_float(x, y, n);
        }
    };

    // A task is a block of query rows and a KV head; its key set is walked in chunks of
    // LS_CPU_CHUNK keys (K and V rows converted to f32 once for all the block's pairs), with
    // the pairs along the vector lanes (see ls_cpu_scores). Online softmax across chunks, each
    // lane on its own. Rows with a mask and rows without one (causal in cells) compute the same
    // arithmetic; keys above the block's last cell, which no row sees without a mask, are left
    // out (exactly what their -inf scores add: nothing).
    constexpr int64_t CH     = LS_CPU_CHUNK;
    const int64_t     n_pair = block_q * n_gqa;  // (row, head) pairs of a full block
    char *            wbase  = (char *) params->wdata + params->ith * ggml_cpu_loopserve_work_size(dst, 1);
    const int64_t     NPL    = ls_cpu_pair_lanes(n_pair);
    int32_t *         keys   = (int32_t *) wbase;
    float *           Kc     = (float *) (wbase + ls_align(sizeof(int32_t) * n_kv));  // [CH][DK]
    float *           Vc     = Kc + CH * DK;           // [CH][DV], or [DV][CH] where V is stored transposed
    float *           S      = Vc + CH * DV;           // [CH][lanes]: scores, then probabilities
    float *           QT     = S + CH * NPL;           // [DK][lanes]: Q^T, scaled
    float *           OT     = QT + DK * NPL;          // [DV][lanes]: output, unnormalized
    float *           M      = OT + DV * NPL;          // [lanes]: running maxima
    float *           L      = M + NPL;                // [lanes]: running sums
    float *           MU     = L + NPL;                // [lanes]: a chunk's maxima (0 for none yet)
    float *           A      = MU + NPL;               // [lanes]: the factors of the earlier chunks' terms
    int32_t *         CP     = (int32_t *) (A + NPL);  // [lanes]: each pair's cell
    double *          stats  = (double *) ((char *) wbase + ls_align(sizeof(int32_t) * n_kv) +
                                 ls_align(sizeof(float) * ls_cpu_attn_floats(DK, DV, n_pair)));
    memset(stats, 0, 2 * n_head * sizeof(double));
    // where V is stored transposed, a key's values are CH apart in Vc
    const int64_t svi = v_rows ? DV : 1;
    const int64_t svd = v_rows ? 1 : CH;

    const int64_t n_block = (n_tokens + block_q - 1) / block_q;
    for (int64_t task = params->ith; task < n_block * n_head_kv; task += params->nth) {
        const int64_t b  = task / n_head_kv;
        const int64_t g  = task % n_head_kv;
        const int64_t r0 = b * block_q;
        const int64_t r1 = std::min(n_tokens, r0 + block_q);

        int64_t lo = INT64_MAX, hi = -1;
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t c = ls_cell(q_cells, r, cell_mod);
            lo              = std::min(lo, c);
            hi              = std::max(hi, c);
        }
        const int32_t * cols   = (const int32_t *) ((const char *) sel->data + 0 * sel->nb[1] + g * sel->nb[2]);
        const int32_t * offs   = (const int32_t *) ((const char *) sel->data + 1 * sel->nb[1] + g * sel->nb[2]);
        const int64_t   n_keys = ls_block_keys(cols, offs, lo, hi, n_kv, keys);

        for (int64_t r = r0; r < r1; ++r) {
            const int64_t c        = ls_cell(q_cells, r, cell_mod);
            const int64_t n_causal = std::upper_bound(keys, keys + n_keys, (int32_t) c) - keys;
            for (int64_t h = g * n_gqa; h < (g + 1) * n_gqa; ++h) {
                stats[h] += (double) n_causal;
                stats[n_head + h] += (double) (c + 1);
            }
        }

        // this block's pairs (row-major: pair p is row r0 + p / n_gqa, head g*n_gqa + p % n_gqa),
        // in nl lanes (whole vectors); the lanes past them compute scores of 0 and are not written
        const int64_t np = (r1 - r0) * n_gqa;
        const int64_t nl = ls_cpu_pair_lanes(np);
        ls_cpu_qt(QT, q, r0, g, n_gqa, np, nl, [scale](float x) { return x * scale; });
        for (int64_t p = 0; p < np; ++p) {
            CP[p] = (int32_t) ls_cell(q_cells, r0 + p / n_gqa, cell_mod);
        }
        for (int64_t p = 0; p < nl; ++p) {
            M[p] = -INFINITY;
            L[p] = 0.0f;
            if (p >= np) {
                CP[p] = INT32_MAX;
            }
        }
        memset(OT, 0, DV * nl * sizeof(float));

        const int64_t n_use = mask ? n_keys : std::upper_bound(keys, keys + n_keys, (int32_t) hi) - keys;
        for (int64_t i0 = 0; i0 < n_use; i0 += CH) {
            const int64_t   n_c = std::min(CH, n_use - i0);
            const int32_t * ck  = keys + i0;
            for (int64_t i = 0; i < n_c; ++i) {
                row_to_f32(k, k_to_float, (const char *) k->data + ck[i] * k->nb[1] + g * k->nb[2], Kc + i * DK, DK);
            }
            if (v_rows) {
                for (int64_t i = 0; i < n_c; ++i) {
                    row_to_f32(v, v_to_float, (const char *) v->data + ck[i] * v->nb[1] + g * v->nb[2], Vc + i * DV,
                               DV);
                }
            } else {
                // V stored transposed: where keys are consecutive (a diagonal's range) a row of
                // V^T is contiguous in the cache, so each run of keys converts in one call
                const bool keys_contiguous = v->nb[1] == ggml_type_size(v->type);
                int32_t    run0[LS_CPU_CHUNK + 1];
                int64_t    n_run = 0;
                for (int64_t i = 0; i < n_c; ++i) {
                    if (i == 0 || !keys_contiguous || ck[i] != ck[i - 1] + 1) {
                        run0[n_run++] = (int32_t) i;
                    }
                }
                run0[n_run] = (int32_t) n_c;
                for (int64_t d = 0; d < DV; ++d) {
                    const char * vt = (const char *) v->data + d * v->nb[0] + g * v->nb[2];
                    for (int64_t r = 0; r < n_run; ++r) {
                        const int64_t i = run0[r], n = run0[r + 1] - run0[r];
                        row_to_f32(v, v_to_float, vt + ck[i] * v->nb[1], Vc + d * CH + i, n);
                    }
                }
            }

            // scores: S[i][p] = sum_d K[i][d] QT[d][p]
            ls_cpu_scores_chunk(S, Kc, n_c, DK, QT, nl);
            if (softcap != 0.0f) {
                for (int64_t e = 0; e < n_c * nl; ++e) {
                    S[e] = softcap * tanhf(S[e]);
                }
            }
            if (mask) {
                for (int64_t i = 0; i < n_c; ++i) {
                    for (int64_t p = 0; p < np; ++p) {
                        const char * mrow = (const char *) mask->data + (r0 + p / n_gqa) * mask->nb[1];
                        const float  mv   = mask->type == GGML_TYPE_F16 ?
                                                GGML_CPU_FP16_TO_FP32(((const ggml_fp16_t *) mrow)[ck[i]]) :
                                                ((const float *) mrow)[ck[i]];
                        S[i * nl + p]     = mv == -INFINITY ? -INFINITY : S[i * nl + p] + mv;
                    }
                }
            } else {
                // causal in cells: only keys above the block's first cell are hidden from some rows
                for (int64_t i = std::upper_bound(ck, ck + n_c, (int32_t) lo) - ck; i < n_c; ++i) {
                    for (int64_t p = 0; p < np; ++p) {
                        if (ck[i] > CP[p]) {
                            S[i * nl + p] = -INFINITY;
                        }
                    }
                }
            }

            // online softmax, lane by lane: the chunk's maxima, the rescale of what came before,
            // then S becomes exp(S - max) (0 where -inf, and for a pair that sees nothing yet)
            for (int64_t p = 0; p < nl; ++p) {
                MU[p] = M[p];
            }
            for (int64_t i = 0; i < n_c; ++i) {
                const float * sr = S + i * nl;
                for (int64_t p = 0; p < nl; ++p) {
                    MU[p] = MU[p] > sr[p] ? MU[p] : sr[p];
                }
            }
            bool rescale = false;
            for (int64_t p = 0; p < nl; ++p) {
                const float m_new = MU[p];
                MU[p]             = m_new == -INFINITY ? 0.0f : m_new;
                A[p]              = 1.0f;
                if (m_new != M[p]) {
                    A[p] = expf(M[p] - MU[p]);  // 0 on the pair's first visible chunk
                    L[p] *= A[p];
                    M[p]    = m_new;
                    rescale = true;
                }
            }
            if (rescale) {
                for (int64_t d = 0; d < DV; ++d) {
                    float * o = OT + d * nl;
                    for (int64_t p = 0; p < nl; ++p) {
                        o[p] *= A[p];
                    }
                }
            }
            for (int64_t i = 0; i < n_c; ++i) {
                float * sr = S + i * nl;
                for (int64_t p = 0; p < nl; ++p) {
                    sr[p] -= MU[p];
                }
            }
            ggml_vec_soft_max_f32((int) (n_c * nl), S, S, 0.0f);
            for (int64_t i = 0; i < n_c; ++i) {
                const float * sr = S + i * nl;
                for (int64_t p = 0; p < nl; ++p) {
                    L[p] += sr[p];
                }
            }

            // output: O^T[d][p] += sum_i V[i][d] S[i][p]
            ls_cpu_out_chunk(OT, S, Vc, svi, svd, n_c, DV, nl);
        }

        for (int64_t p = 0; p < np; ++p) {
            const int64_t r = r0 + p / n_gqa, h = g * n_gqa + p % n_gqa;
            const float   l_inv = L[p] == 0.0f ? 0.0f : 1.0f / L[p];
            float *       out   = (float *) ((char *) dst->data + h * dst->nb[1] + r * dst->nb[2]);
            for (int64_t d = 0; d < DV; ++d) {
                out[d] = OT[d * nl + p] * l_inv;
            }
        }
    }

    // statistics row: sum the threads' partials
    ggml_barrier(params->threadpool);
    if (params->ith == 0) {
        const size_t ws = ggml_cpu_loopserve_work_size(dst, 1);
        for (int64_t h = 0; h < n_head; ++h) {
            double computed = 0.0, causal = 0.0;
            for (int t = 0; t < params->nth; ++t) {
                const double * st = (const double *) ((char *) stats + t * ws);
                computed += st[h];
                causal += st[n_head + h];
            }
            float * out = (float *) ((char *) dst->data + h * dst->nb[1] + n_tokens * dst->nb[2]);
            out[0]      = (float) computed;
            out[1]      = (float) causal;
            for (int64_t d = 2; d < DV; ++d) {
                out[d] = 0.0f;
            }
        }
    }
}

int64_t ggml_cpu_loopserve_next_visible(const ggml_fp16_t * mask, int64_t i0, int64_t n) {
    // -inf in f16 is one bit pattern; eight values (16 bytes) compared at a time
    constexpr uint16_t NEG_INF  = 0xFC00;
    constexpr uint64_t NEG_INF4 = 0xFC00FC00FC00FC00ull;
    int64_t            i        = i0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w[2];
        memcpy(w, mask + i, sizeof(w));
        if (w[0] != NEG_INF4 || w[1] != NEG_INF4) {
            break;
        }
    }
    for (; i < n; ++i) {
        if (mask[i] != NEG_INF) {
            return i;
        }
    }
    return n;
}

// visible cells per block of the row below (their scores and cells on the stack; a multiple
// of LS_FA_GROUP), and the largest K head dim (Q in f32 on the stack)
#define LS_FA_BLOCK  256
#define LS_FA_DK_MAX 576

#if defined(GGML_SIMD) && defined(LS_FA_F16_LOAD)
#    if defined(__AVX512F__)
// cells scored together: one vector of partial sums each, then one transposed reduction for
// all 16 (summing each vector on its own took as long as its products)
#        define LS_FA_GROUP 16

// lane i of the result: the sum of the lanes of x[i]
static __m512 ls_fa_hsum16(const __m512 * x) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; ++i) {  // per 128 bits: (a0+a2, b0+b2, a1+a3, b1+b3)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    }
    for (int i = 0; i < 4; ++i) {  // per 128 bits: the sums of x[4i .. 4i+3] over those bits
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// x[r][c] for NR rows and a group of 16 cells over NCP chunks of 16 from d0, the rows' Q in
// registers and each cell's K converted once for all of them (one row at a time converted every
// K row again for each row, and its chains of FMAs waited on each other). Each (row, cell) is
// K*Q over the first chunk, then FMAs in the order of d: ls_fa_dots' arithmetic.
template <int NR, int NCP>
static void ls_fa_dots_piece(__m512 *              xs,
                             const int32_t *       cells,
                             const char *          k,
                             size_t                nbk1,
                             const float * const * Q,
                             int64_t               d0) {
    __m512 q[NR][NCP];
    for (int r = 0; r < NR; ++r) {
        for (int j = 0; j < NCP; ++j) {
            q[r][j] = _mm512_loadu_ps(Q[r] + d0 + 16 * j);
        }
    }
    for (int c = 0; c < LS_FA_GROUP; ++c) {
        const ggml_fp16_t * kr = (const ggml_fp16_t *) (k + cells[c] * nbk1) + d0;
        __m512              kc[NCP];
        for (int j = 0; j < NCP; ++j) {
            kc[j] = LS_FA_F16_LOAD(kr + 16 * j);
        }
        for (int r = 0; r < NR; ++r) {
            __m512 x =
                d0 == 0 ? _mm512_mul_ps(kc[0], q[r][0]) : _mm512_fmadd_ps(kc[0], q[r][0], xs[r * LS_FA_GROUP + c]);
            for (int j = 1; j < NCP; ++j) {
                x = _mm512_fmadd_ps(kc[j], q[r][j], x);
            }
            xs[r * LS_FA_GROUP + c] = x;
        }
    }
}

// sc[r][0 .. 16) for NR rows and a group of 16 cells (DK a multiple of 16)
template <int NR>
static void ls_fa_dots_rows(float * const *       sc,
                            const int32_t *       cells,
                            const char *          k,
                            size_t                nbk1,
                            const float * const * Q,
                            int64_t               DK) {
    __m512  xs[NR * LS_FA_GROUP];
    int64_t d0 = 0;
    for (; d0 + 64 <= DK; d0 += 64) {
        ls_fa_dots_piece<NR, 4>(xs, cells, k, nbk1, Q, d0);
    }
    switch ((DK - d0) / 16) {
        case 1:
            ls_fa_dots_piece<NR, 1>(xs, cells, k, nbk1, Q, d0);
            break;
        case 2:
            ls_fa_dots_piece<NR, 2>(xs, cells, k, nbk1, Q, d0);
            break;
        case 3:
            ls_fa_dots_piece<NR, 3>(xs, cells, k, nbk1, Q, d0);
            break;
        default:
            break;
    }
    for (int r = 0; r < NR; ++r) {
        _mm512_storeu_ps(sc[r], ls_fa_hsum16(xs + r * LS_FA_GROUP));
    }
}

// V rows shared by this many query rows at once, over this many vectors of d (8 x 2
// accumulators, 2 V vectors)
#        define LS_FA_VROWS 8
#        define LS_FA_VARR  1
#    else
#        define LS_FA_GROUP 1
#        define LS_FA_VROWS 1
#        define LS_FA_VARR  GGML_F32_ARR

// DK a multiple of GGML_F32_EPR: whole steps of GGML_F32_STEP, then one vector at a time
static void ls_fa_dots(float * sc, const int32_t * cells, const char * k, size_t nbk1, const float * Q, int64_t DK) {
    const ggml_fp16_t * kr = (const ggml_fp16_t *) (k + cells[0] * nbk1);
    GGML_F32_VEC        acc[GGML_F32_ARR];
    for (int j = 0; j < GGML_F32_ARR; ++j) {
        acc[j] = GGML_F32_VEC_ZERO;
    }
    int64_t d = 0;
    for (; d + GGML_F32_STEP <= DK; d += GGML_F32_STEP) {
        for (int j = 0; j < GGML_F32_ARR; ++j) {
            acc[j] = GGML_F32_VEC_FMA(acc[j], LS_FA_F16_LOAD(kr + d + j * GGML_F32_EPR),
                                      GGML_F32_VEC_LOAD(Q + d + j * GGML_F32_EPR));
        }
    }
    for (int j = 0; d < DK; d += GGML_F32_EPR, ++j) {
        acc[j] = GGML_F32_VEC_FMA(acc[j], LS_FA_F16_LOAD(kr + d), GGML_F32_VEC_LOAD(Q + d));
    }
    ggml_float res;
    GGML_F32_VEC_REDUCE(res, acc);
    sc[0] = (float) res;
}
#    endif

// The rows of one KV head that share a block of cells: their Q, scores, mask values, cells
// (their first n[r] of the block's), M, S and VKQ
struct ls_fa_rows {
    std::vector<const float *> q;
    std::vector<float *>       sc;
    std::vector<const float *> mv;
    std::vector<int>           n;
    std::vector<float *>       ms;
    std::vector<float *>       vkq;

    void clear() {
        q.clear();
        sc.clear();
        mv.clear();
        n.clear();
        ms.clear();
        vkq.clear();
    }
};

// sc of every row over the block's first n cells, whole groups (the last one padded with the
// last cell by the caller; the extra scores unused)
static void ls_fa_scores(const ls_fa_rows & rows,
                         const int32_t *    cells,
                         int                n,
                         const char *       k,
                         size_t             nbk1,
                         int64_t            DK) {
    const int R = (int) rows.q.size();
#    if defined(__AVX512F__)
    for (int c0 = 0; c0 < n; c0 += LS_FA_GROUP) {
        float * sc[4];
        int     r = 0;
        for (; r < R; r += 4) {
            const int nr = std::min(4, R - r);
            for (int i = 0; i < nr; ++i) {
                sc[i] = rows.sc[r + i] + c0;
            }
            const float * const * Q = rows.q.data() + r;
            switch (nr) {
                case 4:
                    ls_fa_dots_rows<4>(sc, cells + c0, k, nbk1, Q, DK);
                    break;
                case 3:
                    ls_fa_dots_rows<3>(sc, cells + c0, k, nbk1, Q, DK);
                    break;
                case 2:
                    ls_fa_dots_rows<2>(sc, cells + c0, k, nbk1, Q, DK);
                    break;
                default:
                    ls_fa_dots_rows<1>(sc, cells + c0, k, nbk1, Q, DK);
                    break;
            }
        }
    }
#    else
    for (int r = 0; r < R; ++r) {
        for (int c0 = 0; c0 < n; c0 += LS_FA_GROUP) {
            ls_fa_dots(rows.sc[r] + c0, cells + c0, k, nbk1, rows.q[r], DK);
        }
    }
#    endif
}

// a row's scores of its n cells (mask values mv) into probabilities, M, S and VKQ rescaled
static void ls_fa_softmax(float *       sc,
                          const float * mv,
                          int           n,
                          float         scale,
                          float         softcap,
                          int64_t       DV,
                          float *       M,
                          float *       S,
                          float *       VKQ) {
    if (softcap != 0.0f) {
        for (int i = 0; i < n; ++i) {
            sc[i] = softcap * tanhf(sc[i] * scale) + mv[i];
        }
    } else {
        for (int i = 0; i < n; ++i) {
            sc[i] = sc[i] * scale + mv[i];
        }
    }
    // the maximum over 16 running maxima, each as MAXPS takes it (a > b ? a : b; one chain of
    // dependent maxss took longer, and the compiler left 16 of them scalar)
    float m16[16];
    for (int e = 0; e < 16; ++e) {
        m16[e] = -INFINITY;
    }
    int i16 = 0;
#    if defined(__AVX512F__)
    __m512 mv16 = _mm512_loadu_ps(m16);
    for (; i16 + 16 <= n; i16 += 16) {
        mv16 = _mm512_max_ps(mv16, _mm512_loadu_ps(sc + i16));
    }
    _mm512_storeu_ps(m16, mv16);
#    endif
    for (; i16 + 16 <= n; i16 += 16) {
        for (int e = 0; e < 16; ++e) {
            m16[e] = m16[e] > sc[i16 + e] ? m16[e] : sc[i16 + e];
        }
    }
    for (; i16 < n; ++i16) {
        m16[0] = m16[0] > sc[i16] ? m16[0] : sc[i16];
    }
    float mx = -INFINITY;
    for (int e = 0; e < 16; ++e) {
        mx = std::max(mx, m16[e]);
    }
    if (mx > *M) {
        if (*M != -INFINITY) {
            const float ms = expf(*M - mx);
            ggml_vec_scale_f32((int) DV, VKQ, ms);
            *S *= ms;
        }
        *M = mx;
    }
    *S += (float) ggml_vec_soft_max_f32(n, sc, sc, *M);
}

// VKQ[r][0 .. ARR vectors) += sum_i p[r][i] V[cells[i]] over each row's first n[r] cells, in
// registers over the whole block: per row the even cells into one set of sums and the odd into
// another (one chain of FMAs waited on itself), the cells all the rows have converted once
template <int ARR, int NR>
static void ls_fa_v_rows(float * const *       VKQ,
                         const float * const * p,
                         const int *           n,
                         const int32_t *       cells,
                         const char *          v,
                         size_t                nbv1) {
    GGML_F32_VEC a0[NR][ARR];
    GGML_F32_VEC a1[NR][ARR];
    int          nmin = n[0];
    for (int r = 0; r < NR; ++r) {
        for (int j = 0; j < ARR; ++j) {
            a0[r][j] = GGML_F32_VEC_LOAD(VKQ[r] + j * GGML_F32_EPR);
            a1[r][j] = GGML_F32_VEC_ZERO;
        }
        nmin = std::min(nmin, n[r]);
    }
    int i = 0;
    for (; i + 2 <= nmin; i += 2) {
        const ggml_fp16_t * v0 = (const ggml_fp16_t *) (v + cells[i] * nbv1);
        const ggml_fp16_t * v1 = (const ggml_fp16_t *) (v + cells[i + 1] * nbv1);
        GGML_F32_VEC        x0[ARR];
        GGML_F32_VEC        x1[ARR];
        for (int j = 0; j < ARR; ++j) {
            x0[j] = LS_FA_F16_LOAD(v0 + j * GGML_F32_EPR);
            x1[j] = LS_FA_F16_LOAD(v1 + j * GGML_F32_EPR);
        }
        for (int r = 0; r < NR; ++r) {
            const GGML_F32_VEC w0 = GGML_F32_VEC_SET1(p[r][i]);
            const GGML_F32_VEC w1 = GGML_F32_VEC_SET1(p[r][i + 1]);
            for (int j = 0; j < ARR; ++j) {
                a0[r][j] = GGML_F32_VEC_FMA(a0[r][j], x0[j], w0);
                a1[r][j] = GGML_F32_VEC_FMA(a1[r][j], x1[j], w1);
            }
        }
    }
    // each row's cells past the shortest row's, paired as above
    for (int r = 0; r < NR; ++r) {
        int e = i;
        for (; e + 2 <= n[r]; e += 2) {
            const ggml_fp16_t * v0 = (const ggml_fp16_t *) (v + cells[e] * nbv1);
            const ggml_fp16_t * v1 = (const ggml_fp16_t *) (v + cells[e + 1] * nbv1);
            const GGML_F32_VEC  w0 = GGML_F32_VEC_SET1(p[r][e]);
            const GGML_F32_VEC  w1 = GGML_F32_VEC_SET1(p[r][e + 1]);
            for (int j = 0; j < ARR; ++j) {
                a0[r][j] = GGML_F32_VEC_FMA(a0[r][j], LS_FA_F16_LOAD(v0 + j * GGML_F32_EPR), w0);
                a1[r][j] = GGML_F32_VEC_FMA(a1[r][j], LS_FA_F16_LOAD(v1 + j * GGML_F32_EPR), w1);
            }
        }
        if (e < n[r]) {
            const ggml_fp16_t * v0 = (const ggml_fp16_t *) (v + cells[e] * nbv1);
            const GGML_F32_VEC  w0 = GGML_F32_VEC_SET1(p[r][e]);
            for (int j = 0; j < ARR; ++j) {
                a0[r][j] = GGML_F32_VEC_FMA(a0[r][j], LS_FA_F16_LOAD(v0 + j * GGML_F32_EPR), w0);
            }
        }
        for (int j = 0; j < ARR; ++j) {
            GGML_F32_VEC_STORE(VKQ[r] + j * GGML_F32_EPR, GGML_F32_VEC_ADD(a0[r][j], a1[r][j]));
        }
    }
}

// VKQ of every row += its probabilities times V, LS_FA_VARR vectors of d at a time, then one
// (each lane of d sums on its own, so the pieces change nothing in a row's arithmetic), NR rows
// at a time
template <int NR>
static void ls_fa_values_rows(const ls_fa_rows & rows,
                              int                r,
                              const int32_t *    cells,
                              const char *       v,
                              size_t             nbv1,
                              int64_t            DV) {
    float *       vkq[NR];
    const float * p[NR];
    for (int i = 0; i < NR; ++i) {
        p[i] = rows.sc[r + i];
    }
    int64_t d0 = 0;
    for (; d0 + LS_FA_VARR * GGML_F32_EPR <= DV; d0 += LS_FA_VARR * GGML_F32_EPR) {
        for (int i = 0; i < NR; ++i) {
            vkq[i] = rows.vkq[r + i] + d0;
        }
        ls_fa_v_rows<LS_FA_VARR, NR>(vkq, p, rows.n.data() + r, cells, v + d0 * sizeof(ggml_fp16_t), nbv1);
    }
    for (; d0 < DV; d0 += GGML_F32_EPR) {
        for (int i = 0; i < NR; ++i) {
            vkq[i] = rows.vkq[r + i] + d0;
        }
        ls_fa_v_rows<1, NR>(vkq, p, rows.n.data() + r, cells, v + d0 * sizeof(ggml_fp16_t), nbv1);
    }
}

// the rows' block of cells (n: the longest row's; cells padded to a whole group) into their M, S
// and VKQ; each row's arithmetic that of the row alone
static void ls_fa_block_rows(const ls_fa_rows & rows,
                             const int32_t *    cells,
                             int                n,
                             const char *       k,
                             size_t             nbk1,
                             int64_t            DK,
                             float              scale,
                             float              softcap,
                             const char *       v,
                             size_t             nbv1,
                             int64_t            DV) {
    ls_fa_scores(rows, cells, n, k, nbk1, DK);
    const int R = (int) rows.q.size();
    for (int r = 0; r < R; ++r) {
        ls_fa_softmax(rows.sc[r], rows.mv[r], rows.n[r], scale, softcap, DV, rows.ms[r], rows.ms[r] + 1, rows.vkq[r]);
    }
    int r = 0;
    for (; r + LS_FA_VROWS <= R; r += LS_FA_VROWS) {
        ls_fa_values_rows<LS_FA_VROWS>(rows, r, cells, v, nbv1, DV);
    }
#    if LS_FA_VROWS == 8
    if (R - r >= 4) {
        ls_fa_values_rows<4>(rows, r, cells, v, nbv1, DV);
        r += 4;
    }
    if (R - r >= 2) {
        ls_fa_values_rows<2>(rows, r, cells, v, nbv1, DV);
        r += 2;
    }
#    endif
    for (; r < R; ++r) {
        ls_fa_values_rows<1>(rows, r, cells, v, nbv1, DV);
    }
}
#endif

// The visible cells of a mask row in [ic0, ic1): in the order of a batch-invariant list
// (GGML_LOOPSERVE_FA_ORDER_SRC) where there is one (each sequence's cells in position order),
// else in cell order; without a mask, every cell.
static void ls_fa_list(const int32_t *        order,
                       int64_t                n_kv,
                       const ggml_fp16_t *    mask,
                       int64_t                ic0,
                       int64_t                ic1,
                       std::vector<int32_t> & cells) {
    cells.clear();
    if (mask == nullptr) {
        for (int64_t ic = ic0; ic < ic1; ++ic) {
            cells.push_back((int32_t) ic);
        }
        return;
    }
    if (order == nullptr) {
        for (int64_t ic = ggml_cpu_loopserve_next_visible(mask, ic0, ic1); ic < ic1;
             ic         = ggml_cpu_loopserve_next_visible(mask, ic + 1, ic1)) {
            cells.push_back((int32_t) ic);
        }
        return;
    }
    const int64_t first = ggml_cpu_loopserve_next_visible(mask, ic0, ic1);
    const int32_t j0    = first < ic1 ? order[n_kv + first] : 0;
    const int32_t j1    = first < ic1 ? order[2 * n_kv + first] : 0;
    for (int32_t j = j0; j < j1; ++j) {
        const int64_t ic = order[j];
        if (ic < ic0 || ic >= ic1) {
            continue;
        }
        if (GGML_CPU_FP16_TO_FP32(mask[ic]) == -INFINITY) {
            continue;
        }
        cells.push_back((int32_t) ic);
    }
}

// dst's batch-invariant list of the cells, or nullptr
static const int32_t * ls_fa_order(const ggml_tensor * dst) {
    const ggml_tensor * ord = dst->src[GGML_LOOPSERVE_FA_ORDER_SRC];
    const ggml_tensor * k   = dst->src[1];
    if (ord == nullptr || dst->src[3] == nullptr || ord->type != GGML_TYPE_I32 || ord->ne[0] != 3 * k->ne[1] + 1) {
        return nullptr;
    }
    return (const int32_t *) ord->data;
}

// The visible cells of a mask row as last found on this thread (the stock loop's side, below):
// the heads of a query row come one after another, and every layer of a cache has the same
// mask, so a row's cells serve the next calls with the same mask row, list and ubatch (the
// list's last value numbers the ubatches).
struct ls_fa_walk {
    const int32_t *      order = nullptr;
    int32_t              gen   = 0;
    const ggml_fp16_t *  mask  = nullptr;
    int64_t              ic0   = 0;
    int64_t              ic1   = 0;
    std::vector<int32_t> cells;
};

// keep: the mask is a graph input (or a view of one), whose rows hold through a ubatch; a mask
// computed in the graph may share its memory with another one computed later
static const ls_fa_walk & ls_fa_visible(const int32_t *     order,
                                        int64_t             n_kv,
                                        const ggml_fp16_t * mask,
                                        int64_t             ic0,
                                        int64_t             ic1,
                                        bool                keep) {
    static thread_local ls_fa_walk w;
    const int32_t                  gen = order[3 * n_kv];
    if (keep && w.order == order && w.gen == gen && w.mask == mask && w.ic0 == ic0 && w.ic1 == ic1) {
        return w;
    }
    w.order = keep ? order : nullptr;
    w.gen   = gen;
    w.mask  = mask;
    w.ic0   = ic0;
    w.ic1   = ic1;
    ls_fa_list(order, n_kv, mask, ic0, ic1, w.cells);
    return w;
}

#if defined(GGML_SIMD) && defined(LS_FA_F16_LOAD)
// Query tokens of a tile: the rows of up to this many tokens of one chunk are computed together,
// block by block, so that a block of K and V rows serves every row of the tile while it is in
// cache (one row at a time read each row's cells from memory again: a long prompt's attention
// ran ~2-3x slower than the stock tiled path). Each row's own arithmetic is unchanged.
#    define LS_FA_TILE_T 8

// LOOPSERVE_FA_TILE=N: N tokens a tile; 0: one row at a time, as before the tiles (read per
// tile, so that a benchmark can compare them in one process)
static int64_t ls_fa_tile_tokens() {
    const char * env = getenv("LOOPSERVE_FA_TILE");
    return env != nullptr && *env != '\0' ? std::max(0, atoi(env)) : LS_FA_TILE_T;
}

// The rows computed ahead on this thread, handed to the calls that follow (the one-chunk loop
// asks for its rows one at a time, in order)
struct ls_fa_tile {
    const ggml_tensor *               dst = nullptr;
    int64_t                           iq3 = -1;
    int64_t                           t0  = 0;  // its first token
    int64_t                           nt  = 0;  // tokens
    int64_t                           nh  = 0;  // heads a token (the rows of token t: t * nh + head)
    std::vector<uint8_t>              ready;
    std::vector<float>                ms;       // M and S of each row
    std::vector<float>                vkq;      // DV floats a row
    std::vector<float>                q;        // DK floats a row
    std::vector<std::vector<int32_t>> cells;    // each token's visible cells, in the order its rows sum them
    std::vector<const ggml_fp16_t *>  masks;    // each token's mask row
    std::vector<float>                sc;       // LS_FA_BLOCK scores a row of a KV head
    std::vector<std::vector<float>>   mv;       // each token's mask values of its cells
    std::vector<int64_t>              left;     // the tokens of a block not yet computed
    ls_fa_rows                        rows;     // the rows computed together
};
#endif

bool ggml_cpu_loopserve_fa_row(const ggml_tensor * dst,
                               int64_t             ir,
                               int64_t             ir1,
                               int64_t             iq1,
                               int64_t             iq2,
                               int64_t             iq3,
                               const ggml_fp16_t * mask,
                               float               slope,
                               int64_t             ic0,
                               int64_t             ic1,
                               float *             M,
                               float *             S,
                               float *             VKQ) {
#if defined(GGML_SIMD) && defined(LS_FA_F16_LOAD)
    const ggml_tensor * q  = dst->src[0];
    const ggml_tensor * k  = dst->src[1];
    const ggml_tensor * v  = dst->src[2];
    const ggml_tensor * mt = dst->src[3];
    const int64_t       DK = k->ne[0];
    const int64_t       DV = v->ne[0];
    if (q->type != GGML_TYPE_F32 || k->type != GGML_TYPE_F16 || v->type != GGML_TYPE_F16 || DK % GGML_F32_EPR != 0 ||
        DV % GGML_F32_EPR != 0 || DK > LS_FA_DK_MAX) {
        return false;
    }
    static thread_local ls_fa_tile tl;
    const int64_t                  nh     = q->ne[2];
    const auto                     served = [&](int64_t t, int64_t h) {
        const int64_t r = (t - tl.t0) * tl.nh + h;
        if (tl.dst != dst || tl.iq3 != iq3 || t < tl.t0 || t >= tl.t0 + tl.nt || !tl.ready[r]) {
            return false;
        }
        tl.ready[r] = 0;  // each row once: nothing stale is left for a later call
        *M          = tl.ms[2 * r];
        *S          = tl.ms[2 * r + 1];
        memcpy(VKQ, tl.vkq.data() + r * DV, DV * sizeof(float));
        return true;
    };
    if (served(iq1, iq2)) {
        return true;
    }

    // A tile from this row: the rows of the tokens that follow within the chunk (ir < ir1), a
    // token's heads one after another as the loop goes. One row where the rows of a token do not
    // share their cells (a mask per head) or their slope (ALiBi), or where asked.
    const int64_t tile = ls_fa_tile_tokens();
    const bool    one  = tile == 0 || ls_param_f(dst, 1) != 0.0f || (mt != nullptr && mt->ne[2] != 1);
    const int64_t nt   = one ? 1 : std::min<int64_t>({ tile, q->ne[1] - iq1, (ir1 - ir + iq2 + nh - 1) / nh });
    tl.dst             = dst;
    tl.iq3             = iq3;
    tl.t0              = iq1;
    tl.nt              = nt;
    tl.nh              = nh;
    tl.ready.assign(nt * nh, 0);
    tl.ms.resize(2 * nt * nh);
    tl.vkq.resize(nt * nh * DV);
    tl.q.resize(nt * nh * DK);
    tl.cells.resize(nt);
    tl.masks.resize(nt);
    tl.mv.resize(nt);
    const int32_t * order = ls_fa_order(dst);
    for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = iq1 + i;
        tl.masks[i] =
            i == 0 || mt == nullptr ?
                mask :
                (const ggml_fp16_t *) ((const char *) mt->data + t * mt->nb[1] + (iq3 % mt->ne[3]) * mt->nb[3]);
        ls_fa_list(order, k->ne[1], tl.masks[i], ic0, ic1, tl.cells[i]);
        // the mask's values once for all the token's KV heads
        tl.mv[i].resize(tl.cells[i].size());
        for (size_t c = 0; c < tl.cells[i].size(); ++c) {
            tl.mv[i][c] = tl.masks[i] == nullptr ?
                              0.0f :
                              (one ? slope : 1.0f) * GGML_CPU_FP16_TO_FP32(tl.masks[i][tl.cells[i][c]]);
        }
    }
    // the rows: from this one to the chunk's end, within the tokens above
    const auto in_tile = [&](int64_t i, int64_t h) {
        const int64_t r = ir + i * nh + h - iq2;
        return r >= ir && r < ir1 && (!one || h == iq2);
    };
    const float scale0  = ls_param_f(dst, 0);
    const float softcap = ls_param_f(dst, 2);
    const float scale   = softcap != 0.0f ? scale0 / softcap : scale0;
    for (int64_t i = 0; i < nt; ++i) {
        for (int64_t h = 0; h < nh; ++h) {
            if (!in_tile(i, h)) {
                continue;
            }
            const int64_t r = i * nh + h;
            // Q in f32 (the stock loop rounds it to f16 for ggml_vec_dot_f16)
            memcpy(tl.q.data() + r * DK, (const char *) q->data + (iq1 + i) * q->nb[1] + h * q->nb[2] + iq3 * q->nb[3],
                   DK * sizeof(float));
            tl.ms[2 * r]     = -INFINITY;
            tl.ms[2 * r + 1] = 0.0f;
            memset(tl.vkq.data() + r * DV, 0, DV * sizeof(float));
        }
    }
    // each KV head's rows block by block; a row's blocks are its own cells 0-255, 256-511, ...
    // as when it went alone, so its sums are the same. Tokens whose block is the start of another
    // token's (a prompt's tokens: each sees the cells of those before it) go together over the
    // longer one's cells, so that a K or V row is read and converted once for all their rows.
    const int64_t g  = nh / k->ne[2];
    int64_t       nb = 0;
    for (int64_t i = 0; i < nt; ++i) {
        nb = std::max<int64_t>(nb, ((int64_t) tl.cells[i].size() + LS_FA_BLOCK - 1) / LS_FA_BLOCK);
    }
    tl.sc.resize(nt * g * LS_FA_BLOCK);
    int32_t    cells[LS_FA_BLOCK];
    const auto length = [&](int64_t i, int64_t c0) {
        return (int) std::clamp<int64_t>((int64_t) tl.cells[i].size() - c0, 0, LS_FA_BLOCK);
    };
    for (int64_t kvh = 0; kvh < k->ne[2]; ++kvh) {
        const char * kh = (const char *) k->data + kvh * k->nb[2] + (iq3 / (q->ne[3] / k->ne[3])) * k->nb[3];
        const char * vh =
            (const char *) v->data + (kvh * v->ne[2] / k->ne[2]) * v->nb[2] + (iq3 / (q->ne[3] / v->ne[3])) * v->nb[3];
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t c0 = b * LS_FA_BLOCK;
            tl.left.clear();
            for (int64_t i = 0; i < nt; ++i) {
                bool rows = false;
                for (int64_t h = kvh * g; h < (kvh + 1) * g; ++h) {
                    rows = rows || in_tile(i, h);
                }
                if (rows && length(i, c0) > 0) {
                    tl.left.push_back(i);
                }
            }
            while (!tl.left.empty()) {
                // the longest block left, with the tokens whose block starts it
                int64_t ref = tl.left[0];
                for (const int64_t i : tl.left) {
                    ref = length(i, c0) > length(ref, c0) ? i : ref;
                }
                const int32_t * rc    = tl.cells[ref].data() + c0;
                const int       n_ref = length(ref, c0);
                size_t          kept  = 0;
                tl.rows.clear();
                for (const int64_t i : tl.left) {
                    const int n = length(i, c0);
                    if (memcmp(tl.cells[i].data() + c0, rc, n * sizeof(int32_t)) != 0) {
                        tl.left[kept++] = i;
                        continue;
                    }
                    for (int64_t h = kvh * g; h < (kvh + 1) * g; ++h) {
                        if (!in_tile(i, h)) {
                            continue;
                        }
                        const int64_t r = i * nh + h;
                        tl.rows.q.push_back(tl.q.data() + r * DK);
                        tl.rows.sc.push_back(tl.sc.data() + tl.rows.sc.size() * LS_FA_BLOCK);
                        tl.rows.mv.push_back(tl.mv[i].data() + c0);
                        tl.rows.n.push_back(n);
                        tl.rows.ms.push_back(&tl.ms[2 * r]);
                        tl.rows.vkq.push_back(tl.vkq.data() + r * DV);
                    }
                }
                tl.left.resize(kept);
                // the cells, whole groups: the last one padded with the last cell
                memcpy(cells, rc, n_ref * sizeof(int32_t));
                for (int c = n_ref; c % LS_FA_GROUP != 0; ++c) {
                    cells[c] = rc[n_ref - 1];
                }
                ls_fa_block_rows(tl.rows, cells, n_ref, kh, k->nb[1], DK, scale, softcap, vh, v->nb[1], DV);
            }
        }
    }
    for (int64_t i = 0; i < nt; ++i) {
        for (int64_t h = 0; h < nh; ++h) {
            tl.ready[i * nh + h] = in_tile(i, h);
        }
    }
    return served(iq1, iq2);
#else
    GGML_UNUSED_VARS(dst, ir, ir1, iq1, iq2, iq3, mask, slope, ic0, ic1, M, S, VKQ);
    return false;
#endif
}

const int32_t * ggml_cpu_loopserve_fa_cells(const ggml_tensor * dst,
                                            const ggml_fp16_t * mask,
                                            int64_t             ic0,
                                            int64_t             ic1,
                                            int64_t *           n) {
    const int32_t * order = ls_fa_order(dst);
    if (order == nullptr || mask == nullptr) {
        return nullptr;
    }
    const ggml_tensor * mt = dst->src[3];
    while (mt->view_src != nullptr) {
        mt = mt->view_src;
    }
    const bool         keep = (mt->flags & GGML_TENSOR_FLAG_INPUT) != 0;
    const ls_fa_walk & w    = ls_fa_visible(order, dst->src[1]->ne[1], mask, ic0, ic1, keep);
    *n                      = (int64_t) w.cells.size();
    return w.cells.data();
}

size_t ggml_cpu_loopserve_work_size(const ggml_tensor * node, int n_tasks) {
    switch ((ggml_loopserve_op) node->op_params[0]) {
        case GGML_LOOPSERVE_OP_VS_SCORES:
            return 0;
        case GGML_LOOPSERVE_OP_VS_ESTIMATE:
            {
                const ggml_tensor * q     = node->src[0];
                const ggml_tensor * k     = node->src[1];
                const int64_t       n_gqa = q->ne[2] / k->ne[2];
                return ls_align(sizeof(float) * k->ne[1] * q->ne[1] * q->ne[2]) +
                       ls_align(sizeof(float) * q->ne[1] * q->ne[2]) +
                       ls_align(sizeof(float) * ls_est_floats(k->ne[0], n_gqa)) * n_tasks;
            }
        case GGML_LOOPSERVE_OP_SELECT:
            {
                const int64_t n_kv = node->src[0]->ne[0];
                return ls_align(n_kv * (sizeof(int32_t) + 1)) * n_tasks;
            }
        case GGML_LOOPSERVE_OP_SPARSE_ATTN:
            {
                const int64_t n_kv   = node->src[1]->ne[1];
                const int64_t DK     = node->src[1]->ne[0];
                const int64_t DV     = node->src[2]->ne[0];
                const int64_t n_head = node->src[0]->ne[2];
                const int64_t n_pair = node->op_params[3] * (n_head / node->src[1]->ne[2]);
                return (ls_align(sizeof(int32_t) * n_kv) +
                        ls_align(sizeof(float) * ls_cpu_attn_floats(DK, DV, n_pair)) +
                        ls_align(2 * n_head * sizeof(double))) *
                       n_tasks;
            }
    }
    return 0;
}

void ggml_compute_forward_loopserve(const ggml_compute_params * params, ggml_tensor * dst) {
    switch ((ggml_loopserve_op) dst->op_params[0]) {
        case GGML_LOOPSERVE_OP_VS_SCORES:
            ls_vs_scores(params, dst);
            break;
        case GGML_LOOPSERVE_OP_SELECT:
            ls_select(params, dst);
            break;
        case GGML_LOOPSERVE_OP_SPARSE_ATTN:
            ls_sparse_attn(params, dst);
            break;
        case GGML_LOOPSERVE_OP_VS_ESTIMATE:
            ls_vs_estimate(params, dst);
            break;
        default:
            GGML_ABORT("unknown loopserve op %d", dst->op_params[0]);
    }
}
