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
#include <cstring>

// the sparse attention's chunks of keys (scratch per thread: (DK + DV) x 4 x this bytes),
// (row, head) pairs and keys per register block
#define LS_CPU_CHUNK  1024
#define LS_CPU_PAIRS  8
#define LS_CPU_LANES  16
// floats between rows of the chunk's K^T, V^T and scores: a chunk plus a register block, so
// that the rows are not 4 KiB apart (gathering a key's DK values into K^T then hit one L1
// set DK times over: the op ran several times slower per element than stock attention)
#define LS_CPU_STRIDE (LS_CPU_CHUNK + LS_CPU_LANES)

// vectors per register block of the two products below: with 32 vector registers (AVX-512)
// two, so that each broadcast of Q (scores) or load of S (output) serves two FMAs; with 16,
// one (two would spill). Each output is summed in the same order either way.
#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE) && GGML_F32_EPR >= 16
#    define LS_CPU_WIDE 2
#else
#    define LS_CPU_WIDE 1
#endif

// S[p][i] = sum_d Q[p][d] KT[d][i] for LS_CPU_PAIRS rows of Q (DK apart) and i < n (rounded
// up to LS_CPU_LANES), rows of S and KT LS_CPU_STRIDE apart; KB key vectors at a time
template <int KB> static int64_t ls_cpu_scores_kb(float * S, const float * Q, const float * KT, int64_t DK, int64_t n) {
    constexpr int NP = LS_CPU_PAIRS;
    int64_t       ib = 0;
#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE)
    // a block whose last vector holds no key is left to the narrower pass
    for (; ib + (KB - 1) * GGML_F32_EPR < n; ib += KB * GGML_F32_EPR) {
        GGML_F32_VEC acc[KB][NP];
        for (int kb = 0; kb < KB; ++kb) {
            for (int p = 0; p < NP; ++p) {
                acc[kb][p] = GGML_F32_VEC_ZERO;
            }
        }
        for (int64_t d = 0; d < DK; ++d) {
            GGML_F32_VEC k[KB];
            for (int kb = 0; kb < KB; ++kb) {
                k[kb] = GGML_F32_VEC_LOAD(KT + d * LS_CPU_STRIDE + ib + kb * GGML_F32_EPR);
            }
            for (int p = 0; p < NP; ++p) {
                const GGML_F32_VEC q = GGML_F32_VEC_SET1(Q[p * DK + d]);
                for (int kb = 0; kb < KB; ++kb) {
                    acc[kb][p] = GGML_F32_VEC_FMA(acc[kb][p], k[kb], q);
                }
            }
        }
        for (int kb = 0; kb < KB; ++kb) {
            for (int p = 0; p < NP; ++p) {
                GGML_F32_VEC_STORE(S + p * LS_CPU_STRIDE + ib + kb * GGML_F32_EPR, acc[kb][p]);
            }
        }
    }
#else
    for (; ib < n; ++ib) {
        for (int p = 0; p < NP; ++p) {
            float s = 0.0f;
            for (int64_t d = 0; d < DK; ++d) {
                s += Q[p * DK + d] * KT[d * LS_CPU_STRIDE + ib];
            }
            S[p * LS_CPU_STRIDE + ib] = s;
        }
    }
#endif
    return ib;
}

static void ls_cpu_scores(float * S, const float * Q, const float * KT, int64_t DK, int64_t n) {
    const int64_t done = ls_cpu_scores_kb<LS_CPU_WIDE>(S, Q, KT, DK, n);
    if (LS_CPU_WIDE > 1 && done < n) {
        ls_cpu_scores_kb<1>(S + done, Q, KT + done, DK, n - done);
    }
}

// x[j][p] = sum_i S[p][i] v[j][i] for LS_CPU_PAIRS rows of S (LS_CPU_STRIDE apart) and ND
// rows of V^T (LS_CPU_STRIDE apart), i < n rounded up to LS_CPU_LANES
template <int ND> static void ls_cpu_dots(float (*x)[LS_CPU_PAIRS], const float * S, const float * v, int64_t n) {
    constexpr int NP = LS_CPU_PAIRS;
#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE)
    GGML_F32_VEC acc[ND][NP];
    for (int j = 0; j < ND; ++j) {
        for (int p = 0; p < NP; ++p) {
            acc[j][p] = GGML_F32_VEC_ZERO;
        }
    }
    for (int64_t ib = 0; ib < n; ib += GGML_F32_EPR) {
        GGML_F32_VEC vv[ND];
        for (int j = 0; j < ND; ++j) {
            vv[j] = GGML_F32_VEC_LOAD(v + j * LS_CPU_STRIDE + ib);
        }
        for (int p = 0; p < NP; ++p) {
            const GGML_F32_VEC sv = GGML_F32_VEC_LOAD(S + p * LS_CPU_STRIDE + ib);
            for (int j = 0; j < ND; ++j) {
                acc[j][p] = GGML_F32_VEC_FMA(acc[j][p], vv[j], sv);
            }
        }
    }
    for (int j = 0; j < ND; ++j) {
        for (int p = 0; p < NP; ++p) {
            float lanes[GGML_F32_EPR];
            GGML_F32_VEC_STORE(lanes, acc[j][p]);
            x[j][p] = 0.0f;
            for (int e = 0; e < GGML_F32_EPR; ++e) {
                x[j][p] += lanes[e];
            }
        }
    }
#else
    for (int j = 0; j < ND; ++j) {
        for (int p = 0; p < NP; ++p) {
            x[j][p] = 0.0f;
            for (int64_t i = 0; i < n; ++i) {
                x[j][p] += S[p * LS_CPU_STRIDE + i] * v[j * LS_CPU_STRIDE + i];
            }
        }
    }
#endif
}

// floats of the sparse attention's per-thread scratch after the key list
static int64_t ls_cpu_attn_floats(int64_t DK, int64_t DV, int64_t n_pair) {
    return (DK + DV) * LS_CPU_STRIDE + LS_CPU_PAIRS * (LS_CPU_STRIDE + DK) + std::max(DK, DV) + n_pair * (DV + 2);
}

static void ls_f16_row(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t n) {
    ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) x, y, n);
}

static float ls_param_f(const ggml_tensor * t, int i) {
    float f;
    memcpy(&f, &t->op_params[i], sizeof(f));
    return f;
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

// the probabilities in the work buffer ([n_kv, n_rows, n_head], shared by the threads),
// then the sums as ggml_loopserve_vs_scores
static void ls_vs_estimate(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * q       = dst->src[0];
    const ggml_tensor * k       = dst->src[1];
    const ggml_tensor * mask    = dst->src[2];
    const ggml_tensor * q_cells = dst->src[3];
    const int64_t       DK      = k->ne[0];
    const int64_t       n_kv    = k->ne[1];
    const int64_t       n_rows  = q->ne[1];
    const int64_t       n_head  = q->ne[2];
    const int64_t       n_gqa   = n_head / k->ne[2];
    float               scale   = ls_param_f(dst, 1);
    const float         softcap = ls_param_f(dst, 2);
    if (softcap != 0.0f) {
        scale /= softcap;
    }

    float *       P   = (float *) params->wdata;
    ggml_fp16_t * Q16 = (ggml_fp16_t *) ((char *) params->wdata + ls_align(sizeof(float) * n_kv * n_rows * n_head) +
                                         params->ith * ls_align(sizeof(ggml_fp16_t) * DK));
    for (int64_t task = params->ith; task < n_rows * n_head; task += params->nth) {
        const int64_t r = task % n_rows, h = task / n_rows;
        const float * pq = (const float *) ((const char *) q->data + r * q->nb[1] + h * q->nb[2]);
        ggml_cpu_fp32_to_fp16(pq, Q16, DK);
        const char *  kh   = (const char *) k->data + (h / n_gqa) * k->nb[2];
        const char *  mrow = mask ? (const char *) mask->data + r * mask->nb[1] : nullptr;
        const int64_t c    = ls_cell(q_cells, r, dst->op_params[3]);
        float *       pr   = P + (h * n_rows + r) * n_kv;
        float         mx   = -INFINITY;
        for (int64_t j = 0; j < n_kv; ++j) {
            float mv = 0.0f;
            if (mrow) {
                mv = mask->type == GGML_TYPE_F16 ? GGML_CPU_FP16_TO_FP32(((const ggml_fp16_t *) mrow)[j]) :
                                                   ((const float *) mrow)[j];
            }
            float s = -INFINITY;
            if (mv != -INFINITY && (mrow || j <= c)) {  // no mask: causal in cells
                ggml_vec_dot_f16(DK, &s, 0, (ggml_fp16_t *) (kh + j * k->nb[1]), 0, Q16, 0, 1);
                s *= scale;
                if (softcap != 0.0f) {
                    s = softcap * tanhf(s);
                }
                s += mv;
            }
            pr[j] = s;
            mx    = std::max(mx, s);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < n_kv; ++j) {
            pr[j] = mx == -INFINITY ? 0.0f : expf(pr[j] - mx);
            sum += pr[j];
        }
        const float inv = sum > 0.0 ? (float) (1.0 / sum) : 0.0f;
        for (int64_t j = 0; j < n_kv; ++j) {
            pr[j] *= inv;
        }
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

    const int64_t DK        = k->ne[0];
    const int64_t DV        = v->ne[0];
    const int64_t n_kv      = k->ne[1];
    const int64_t n_head_kv = k->ne[2];
    const int64_t n_tokens  = q->ne[1];
    const int64_t n_head    = q->ne[2];
    const int64_t n_gqa     = n_head / n_head_kv;

    float         scale    = ls_param_f(dst, 1);
    const float   softcap  = ls_param_f(dst, 2);
    const int64_t block_q  = dst->op_params[3];
    const int64_t cell_mod = dst->op_params[4];
    if (softcap != 0.0f) {
        scale /= softcap;
    }

    // f16 rows through the CPU backend's vector conversion (F16C): the type traits' one is a
    // scalar loop in ggml-base, and took a third of this op's time (the same values)
    const ggml_to_float_t k_to_float = k->type == GGML_TYPE_F16 ? ls_f16_row : ggml_get_type_traits(k->type)->to_float;
    const ggml_to_float_t v_to_float = v->type == GGML_TYPE_F16 ? ls_f16_row : ggml_get_type_traits(v->type)->to_float;
    const bool            v_rows     = v->nb[0] == ggml_type_size(v->type);  // else transposed f16/f32
    GGML_ASSERT((k->type == GGML_TYPE_F32 || k_to_float) && "loopserve sparse attention: unsupported K type");
    GGML_ASSERT((v->type == GGML_TYPE_F32 || v_to_float) && "loopserve sparse attention: unsupported V type");

    // A task is a block of query rows and a KV head; its key set is walked in chunks of
    // LS_CPU_CHUNK keys, gathered once for the block's rows and the group's heads as K^T and
    // V^T in f32, and LS_CPU_PAIRS (row, head) pairs at a time go through small
    // register-blocked products (scores: pairs x chunk, output: pairs x DV; SIMD through
    // ggml's vector macros); each K/V row is converted once per block instead of once per
    // query row and head. Online softmax across chunks. Rows with a mask and rows without
    // one (causal in cells) compute the same arithmetic; chunks no key of which the pairs'
    // rows see are skipped (exactly what a chunk of -inf scores adds: nothing).
    constexpr int64_t CH = LS_CPU_CHUNK, CS = LS_CPU_STRIDE;
    constexpr int     NP = LS_CPU_PAIRS, LN = LS_CPU_LANES;
#if defined(GGML_SIMD)
    static_assert(LN % GGML_F32_EPR == 0, "a register block of keys is whole registers");
#endif
    const int64_t n_pair = block_q * n_gqa;  // (row, head) pairs of a block
    char *        wbase  = (char *) params->wdata + params->ith * ggml_cpu_loopserve_work_size(dst, 1);
    int32_t *     keys   = (int32_t *) wbase;
    float *       KT     = (float *) (wbase + ls_align(sizeof(int32_t) * n_kv));  // [DK][CS]
    float *       VT     = KT + DK * CS;                                          // [DV][CS]
    float *       S      = VT + DV * CS;                                          // [NP][CS]
    float *       Qs     = S + NP * CS;                                           // [NP][DK]
    float *       row    = Qs + NP * DK;                                          // [max(DK, DV)]
    float *       O      = row + std::max(DK, DV);                                // [n_pair][DV]
    float *       M      = O + n_pair * DV;                                       // [n_pair]
    float *       L      = M + n_pair;                                            // [n_pair]
    double *      stats  = (double *) ((char *) wbase + ls_align(sizeof(int32_t) * n_kv) +
                                 ls_align(sizeof(float) * ls_cpu_attn_floats(DK, DV, n_pair)));
    memset(stats, 0, 2 * n_head * sizeof(double));

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
        for (int64_t pr = 0; pr < n_pair; ++pr) {
            M[pr] = -INFINITY;
            L[pr] = 0.0f;
        }
        memset(O, 0, n_pair * DV * sizeof(float));

        for (int64_t i0 = 0; i0 < n_keys; i0 += CH) {
            const int64_t n_c  = std::min(CH, n_keys - i0);
            // K^T and V^T of the chunk; V^T's columns up to the next multiple of LN zeroed
            // (the products read them, with probabilities 0)
            const int64_t n_cp = (n_c + LN - 1) / LN * LN;
            for (int64_t i = 0; i < n_c; ++i) {
                const char *  kr = (const char *) k->data + keys[i0 + i] * k->nb[1] + g * k->nb[2];
                const float * kf = (const float *) kr;
                if (k->type != GGML_TYPE_F32) {
                    k_to_float(kr, row, DK);
                    kf = row;
                }
                for (int64_t d = 0; d < DK; ++d) {
                    KT[d * CS + i] = kf[d];
                }
            }
            if (v_rows) {
                for (int64_t i = 0; i < n_c; ++i) {
                    const char *  vr = (const char *) v->data + keys[i0 + i] * v->nb[1] + g * v->nb[2];
                    const float * vf = (const float *) vr;
                    if (v->type != GGML_TYPE_F32) {
                        v_to_float(vr, row, DV);
                        vf = row;
                    }
                    for (int64_t d = 0; d < DV; ++d) {
                        VT[d * CS + i] = vf[d];
                    }
                }
            } else {
                // V stored transposed: where keys are consecutive (a diagonal's range) a row of
                // V^T is contiguous in the cache, so each run of keys converts in one vector call
                // instead of one table lookup per value
                const bool keys_contiguous = v->nb[1] == ggml_type_size(v->type);
                int32_t    run0[LS_CPU_CHUNK + 1];
                int64_t    n_run = 0;
                for (int64_t i = 0; i < n_c; ++i) {
                    if (i == 0 || !keys_contiguous || keys[i0 + i] != keys[i0 + i - 1] + 1) {
                        run0[n_run++] = (int32_t) i;
                    }
                }
                run0[n_run] = (int32_t) n_c;
                for (int64_t d = 0; d < DV; ++d) {
                    const char * vt = (const char *) v->data + d * v->nb[0] + g * v->nb[2];
                    for (int64_t r = 0; r < n_run; ++r) {
                        const int64_t i = run0[r], n = run0[r + 1] - run0[r];
                        const char *  e = vt + keys[i0 + i] * v->nb[1];
                        if (v->type == GGML_TYPE_F16) {
                            ls_f16_row(e, VT + d * CS + i, n);
                        } else {
                            memcpy(VT + d * CS + i, e, n * sizeof(float));
                        }
                    }
                }
            }
            for (int64_t d = 0; d < DV; ++d) {
                for (int64_t i = n_c; i < n_cp; ++i) {
                    VT[d * CS + i] = 0.0f;
                }
            }

            for (int64_t p0 = 0; p0 < (r1 - r0) * n_gqa; p0 += NP) {
                const int64_t np = std::min<int64_t>(NP, (r1 - r0) * n_gqa - p0);
                if (!mask) {
                    bool any = false;
                    for (int64_t p = 0; p < np; ++p) {
                        any = any || keys[i0] <= ls_cell(q_cells, r0 + (p0 + p) / n_gqa, cell_mod);
                    }
                    if (!any) {
                        continue;  // no key of the chunk is visible to these rows (causal in cells)
                    }
                }
                memset(Qs, 0, NP * DK * sizeof(float));  // pairs past the block: scores of nothing
                for (int64_t p = 0; p < np; ++p) {
                    const int64_t r = r0 + (p0 + p) / n_gqa, h = g * n_gqa + (p0 + p) % n_gqa;
                    const float * pq = (const float *) ((const char *) q->data + r * q->nb[1] + h * q->nb[2]);
                    for (int64_t d = 0; d < DK; ++d) {
                        Qs[p * DK + d] = pq[d] * scale;
                    }
                }
                // scores: S[p][i] = sum_d Qs[p][d] KT[d][i], a register of keys at a time
                ls_cpu_scores(S, Qs, KT, DK, n_c);
                // each pair's visible scores, softmax against its running maximum; S becomes
                // the probabilities, 0 past the chunk and for pairs that see nothing in it
                for (int64_t p = 0; p < NP; ++p) {
                    float *       sp   = S + p * CS;
                    float         mx   = -INFINITY;
                    const int64_t r    = p < np ? r0 + (p0 + p) / n_gqa : -1;
                    const int64_t c    = p < np ? ls_cell(q_cells, r, cell_mod) : -1;
                    const char *  mrow = mask && p < np ? (const char *) mask->data + r * mask->nb[1] : nullptr;
                    if (p < np && !mrow && softcap == 0.0f) {
                        // causal in cells: the chunk's keys ascend, so the visible ones are a
                        // prefix. The same scores as the loop below gives (s + 0 and -inf), the
                        // maximum over 8 running maxima instead of one chain of dependent maxss
                        // (that loop was the op's largest cost after the gather)
                        const int64_t n_vis = std::upper_bound(keys + i0, keys + i0 + n_c, (int32_t) c) - (keys + i0);
                        float         m8[8] = { -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                                                -INFINITY, -INFINITY, -INFINITY, -INFINITY };
                        int64_t       i     = 0;
                        for (; i + 8 <= n_vis; i += 8) {
                            for (int e = 0; e < 8; ++e) {
                                m8[e] = std::max(m8[e], sp[i + e]);
                            }
                        }
                        for (; i < n_vis; ++i) {
                            m8[0] = std::max(m8[0], sp[i]);
                        }
                        for (int e = 0; e < 8; ++e) {
                            mx = std::max(mx, m8[e]);
                        }
                        for (i = n_vis; i < n_c; ++i) {
                            sp[i] = -INFINITY;
                        }
                    }
                    for (int64_t i = 0; p < np && (mrow || softcap != 0.0f) && i < n_c; ++i) {
                        const int64_t j  = keys[i0 + i];
                        float         mv = 0.0f;
                        if (mrow) {
                            mv = mask->type == GGML_TYPE_F16 ? GGML_CPU_FP16_TO_FP32(((const ggml_fp16_t *) mrow)[j]) :
                                                               ((const float *) mrow)[j];
                        } else if (j > c) {
                            mv = -INFINITY;
                        }
                        const float s = softcap != 0.0f ? softcap * tanhf(sp[i]) : sp[i];
                        sp[i]         = mv == -INFINITY ? -INFINITY : s + mv;
                        mx            = std::max(mx, sp[i]);
                    }
                    if (mx == -INFINITY) {
                        memset(sp, 0, n_cp * sizeof(float));
                        continue;
                    }
                    const int64_t pr    = p0 + p;
                    const float   m_new = std::max(M[pr], mx);
                    const float   ms    = expf(M[pr] - m_new);  // 0 on the pair's first visible chunk
                    if (ms != 1.0f) {
                        ggml_vec_scale_f32((int) DV, O + pr * DV, ms);
                    }
                    L[pr] = L[pr] * ms + (float) ggml_vec_soft_max_f32((int) n_c, sp, sp, m_new);
                    M[pr] = m_new;
                    for (int64_t i = n_c; i < n_cp; ++i) {
                        sp[i] = 0.0f;
                    }
                }
                // output: O[p][d] += sum_i S[p][i] VT[d][i], LS_CPU_WIDE rows of V^T at a time
                for (int64_t d = 0; d < DV;) {
                    float      x[LS_CPU_WIDE][NP];
                    const bool wide = d + LS_CPU_WIDE <= DV;
                    if (wide) {
                        ls_cpu_dots<LS_CPU_WIDE>(x, S, VT + d * CS, n_c);
                    } else {
                        ls_cpu_dots<1>(x, S, VT + d * CS, n_c);
                    }
                    for (int j = 0; j < (wide ? LS_CPU_WIDE : 1); ++j, ++d) {
                        for (int64_t p = 0; p < np; ++p) {
                            O[(p0 + p) * DV + d] += x[j][p];
                        }
                    }
                }
            }
        }

        for (int64_t r = r0; r < r1; ++r) {
            for (int64_t hh = 0; hh < n_gqa; ++hh) {
                const int64_t pr    = (r - r0) * n_gqa + hh;
                const float   l_inv = L[pr] == 0.0f ? 0.0f : 1.0f / L[pr];
                float *       out   = (float *) ((char *) dst->data + (g * n_gqa + hh) * dst->nb[1] + r * dst->nb[2]);
                for (int64_t d = 0; d < DV; ++d) {
                    out[d] = O[pr * DV + d] * l_inv;
                }
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

// f16 values read as f32 vectors (GGML_F32_VEC): AVX-512 converts in AVX512F, AVX needs F16C
#if defined(__AVX512F__)
#    define LS_FA_F16_LOAD(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (p)))
#elif defined(__AVX__) && defined(__F16C__)
#    define LS_FA_F16_LOAD(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (p)))
#endif
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

// sc[i] = sum_d K[cells[i]][d] Q[d] for a group of LS_FA_GROUP cells; DK a multiple of 16
static void ls_fa_dots(float * sc, const int32_t * cells, const char * k, size_t nbk1, const float * Q, int64_t DK) {
    __m512 x[LS_FA_GROUP];
    for (int i = 0; i < LS_FA_GROUP; ++i) {
        const ggml_fp16_t * kr = (const ggml_fp16_t *) (k + cells[i] * nbk1);
        x[i]                   = _mm512_mul_ps(LS_FA_F16_LOAD(kr), _mm512_loadu_ps(Q));
        for (int64_t d = 16; d < DK; d += 16) {
            x[i] = _mm512_fmadd_ps(LS_FA_F16_LOAD(kr + d), _mm512_loadu_ps(Q + d), x[i]);
        }
    }
    _mm512_storeu_ps(sc, ls_fa_hsum16(x));
}
#    else
#        define LS_FA_GROUP 1

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

// VKQ[0 .. ARR vectors) += sum_i sc[i] V[cells[i]] in registers over the whole block: the even
// cells into one set of sums, the odd into another (one chain of FMAs waited on itself)
template <int ARR>
static void ls_fa_v_step(float * VKQ, const float * sc, const int32_t * cells, int n, const char * v, size_t nbv1) {
    GGML_F32_VEC a0[ARR];
    GGML_F32_VEC a1[ARR];
    for (int j = 0; j < ARR; ++j) {
        a0[j] = GGML_F32_VEC_LOAD(VKQ + j * GGML_F32_EPR);
        a1[j] = GGML_F32_VEC_ZERO;
    }
    int i = 0;
    for (; i + 2 <= n; i += 2) {
        const ggml_fp16_t * v0 = (const ggml_fp16_t *) (v + cells[i] * nbv1);
        const ggml_fp16_t * v1 = (const ggml_fp16_t *) (v + cells[i + 1] * nbv1);
        const GGML_F32_VEC  w0 = GGML_F32_VEC_SET1(sc[i]);
        const GGML_F32_VEC  w1 = GGML_F32_VEC_SET1(sc[i + 1]);
        for (int j = 0; j < ARR; ++j) {
            a0[j] = GGML_F32_VEC_FMA(a0[j], LS_FA_F16_LOAD(v0 + j * GGML_F32_EPR), w0);
            a1[j] = GGML_F32_VEC_FMA(a1[j], LS_FA_F16_LOAD(v1 + j * GGML_F32_EPR), w1);
        }
    }
    if (i < n) {
        const ggml_fp16_t * v0 = (const ggml_fp16_t *) (v + cells[i] * nbv1);
        const GGML_F32_VEC  w0 = GGML_F32_VEC_SET1(sc[i]);
        for (int j = 0; j < ARR; ++j) {
            a0[j] = GGML_F32_VEC_FMA(a0[j], LS_FA_F16_LOAD(v0 + j * GGML_F32_EPR), w0);
        }
    }
    for (int j = 0; j < ARR; ++j) {
        GGML_F32_VEC_STORE(VKQ + j * GGML_F32_EPR, GGML_F32_VEC_ADD(a0[j], a1[j]));
    }
}

// a block of n visible cells (their mask values mv) into M, S and VKQ
static void ls_fa_block(float *       sc,
                        int32_t *     cells,
                        const float * mv,
                        int           n,
                        const char *  k,
                        size_t        nbk1,
                        const float * Q,
                        int64_t       DK,
                        float         scale,
                        float         softcap,
                        const char *  v,
                        size_t        nbv1,
                        int64_t       DV,
                        float *       M,
                        float *       S,
                        float *       VKQ) {
    // scores, whole groups: the last one padded with the last cell (its extra scores unused)
    for (int i = n; i % LS_FA_GROUP != 0; ++i) {
        cells[i] = cells[n - 1];
    }
    for (int i = 0; i < n; i += LS_FA_GROUP) {
        ls_fa_dots(sc + i, cells + i, k, nbk1, Q, DK);
    }
    if (softcap != 0.0f) {
        for (int i = 0; i < n; ++i) {
            sc[i] = softcap * tanhf(sc[i] * scale) + mv[i];
        }
    } else {
        for (int i = 0; i < n; ++i) {
            sc[i] = sc[i] * scale + mv[i];
        }
    }
    // the maximum over 8 running maxima (one chain of dependent maxss took longer)
    float m8[8] = { -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY };
    int   i8    = 0;
    for (; i8 + 8 <= n; i8 += 8) {
        for (int e = 0; e < 8; ++e) {
            m8[e] = std::max(m8[e], sc[i8 + e]);
        }
    }
    for (; i8 < n; ++i8) {
        m8[0] = std::max(m8[0], sc[i8]);
    }
    float mx = -INFINITY;
    for (int e = 0; e < 8; ++e) {
        mx = std::max(mx, m8[e]);
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
    // VKQ += sum_i sc[i] V[cell i]: whole steps of GGML_F32_STEP, then one vector at a time (a
    // head dim of 32 on AVX-512, whose step is 64)
    int64_t d0 = 0;
    for (; d0 + GGML_F32_STEP <= DV; d0 += GGML_F32_STEP) {
        ls_fa_v_step<GGML_F32_ARR>(VKQ + d0, sc, cells, n, v + d0 * sizeof(ggml_fp16_t), nbv1);
    }
    for (; d0 < DV; d0 += GGML_F32_EPR) {
        ls_fa_v_step<1>(VKQ + d0, sc, cells, n, v + d0 * sizeof(ggml_fp16_t), nbv1);
    }
}
#endif

bool ggml_cpu_loopserve_fa_row(const ggml_tensor * dst,
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
    const int64_t       DK = k->ne[0];
    const int64_t       DV = v->ne[0];
    if (q->type != GGML_TYPE_F32 || k->type != GGML_TYPE_F16 || v->type != GGML_TYPE_F16 || DK % GGML_F32_EPR != 0 ||
        DV % GGML_F32_EPR != 0 || DK > LS_FA_DK_MAX) {
        return false;
    }
    const float scale0  = ls_param_f(dst, 0);
    const float softcap = ls_param_f(dst, 2);
    const float scale   = softcap != 0.0f ? scale0 / softcap : scale0;

    // Q in f32 (the stock loop rounds it to f16 for ggml_vec_dot_f16)
    float         Q[LS_FA_DK_MAX];
    const float * pq = (const float *) ((const char *) q->data + iq1 * q->nb[1] + iq2 * q->nb[2] + iq3 * q->nb[3]);
    memcpy(Q, pq, DK * sizeof(float));
    const char * kh =
        (const char *) k->data + (iq2 / (q->ne[2] / k->ne[2])) * k->nb[2] + (iq3 / (q->ne[3] / k->ne[3])) * k->nb[3];
    const char * vh =
        (const char *) v->data + (iq2 / (q->ne[2] / v->ne[2])) * v->nb[2] + (iq3 / (q->ne[3] / v->ne[3])) * v->nb[3];

    *M = -INFINITY;
    *S = 0.0f;
    memset(VKQ, 0, DV * sizeof(float));
    float   sc[LS_FA_BLOCK];
    float   mv[LS_FA_BLOCK];
    int32_t cells[LS_FA_BLOCK];
    int     n = 0;
    for (int64_t ic = ic0; ic < ic1; ++ic) {
        const float m = mask ? slope * GGML_CPU_FP16_TO_FP32(mask[ic]) : 0.0f;
        if (m == -INFINITY) {
            ic = ggml_cpu_loopserve_next_visible(mask, ic + 1, ic1) - 1;
            continue;
        }
        mv[n]    = m;
        cells[n] = (int32_t) ic;
        if (++n == LS_FA_BLOCK) {
            ls_fa_block(sc, cells, mv, n, kh, k->nb[1], Q, DK, scale, softcap, vh, v->nb[1], DV, M, S, VKQ);
            n = 0;
        }
    }
    if (n > 0) {
        ls_fa_block(sc, cells, mv, n, kh, k->nb[1], Q, DK, scale, softcap, vh, v->nb[1], DV, M, S, VKQ);
    }
    return true;
#else
    GGML_UNUSED_VARS(dst, iq1, iq2, iq3, mask, slope, ic0, ic1, M, S, VKQ);
    return false;
#endif
}

size_t ggml_cpu_loopserve_work_size(const ggml_tensor * node, int n_tasks) {
    switch ((ggml_loopserve_op) node->op_params[0]) {
        case GGML_LOOPSERVE_OP_VS_SCORES:
            return 0;
        case GGML_LOOPSERVE_OP_VS_ESTIMATE:
            {
                const ggml_tensor * q = node->src[0];
                const ggml_tensor * k = node->src[1];
                return ls_align(sizeof(float) * k->ne[1] * q->ne[1] * q->ne[2]) +
                       ls_align(sizeof(ggml_fp16_t) * k->ne[0]) * n_tasks;
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
