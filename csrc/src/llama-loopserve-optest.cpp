// loopserve-edge: llama_loopserve_op_test_run, which runs one sparse prefill op (or stock
// flash attention, for comparison) on host arrays on the CPU or GPU backend. For the
// tests (CPU reference against numpy, CUDA against CPU) and the device benchmarks.

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-loopserve.h"
#include "ggml.h"
#include "llama-loopserve.h"

#include <cmath>
#include <cstring>
#include <vector>

static void set_rows_f32(ggml_tensor * t, const float * src, int64_t nrows, int64_t n_per_row) {
    // f32 rows -> the tensor's type (quantized, f16 or f32), then upload
    const size_t         row = ggml_row_size(t->type, n_per_row);
    std::vector<uint8_t> buf(row * nrows);
    if (t->type == GGML_TYPE_F32) {
        memcpy(buf.data(), src, sizeof(float) * nrows * n_per_row);
    } else {
        ggml_quantize_chunk(t->type, src, buf.data(), 0, nrows, n_per_row, nullptr);
    }
    ggml_backend_tensor_set(t, buf.data(), 0, buf.size());
}

int32_t llama_loopserve_op_test_run(llama_loopserve_op_test * t) {
    ggml_backend_t backend =
        ggml_backend_init_by_type(t->gpu ? GGML_BACKEND_DEVICE_TYPE_GPU : GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (backend == nullptr) {
        return -1;
    }
    if (!t->gpu) {
        ggml_backend_dev_t dev = ggml_backend_get_device(backend);
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        auto *             set_n_threads =
            (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
        if (set_n_threads) {
            set_n_threads(backend, t->n_threads > 0 ? t->n_threads : 4);
        }
    }

    ggml_init_params ip  = { 64 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context *   ctx = ggml_init(ip);

    const int64_t   dk = t->dk, dv = t->dv, n_kv = t->n_kv, n_tok = t->n_tokens;
    const int64_t   n_head = t->n_head, n_head_kv = t->n_head_kv;
    const bool      attn      = t->op >= 2 && t->op <= 5;
    const bool      estimate  = t->op == 4 || t->op == 5;
    const ggml_type mask_type = (t->op == 3 || t->mask_f16) ? GGML_TYPE_F16 : GGML_TYPE_F32;

    ggml_tensor *q = nullptr, *k = nullptr, *v = nullptr, *v_store = nullptr, *mask = nullptr;
    ggml_tensor *p = nullptr, *sc = nullptr, *cells = nullptr, *sel = nullptr, *out = nullptr;
    if (attn) {
        q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, dk, n_tok, n_head);
        k = ggml_new_tensor_3d(ctx, (ggml_type) t->type_k, dk, n_kv, n_head_kv);
        if (estimate) {
            // no V
        } else if (t->v_trans && t->op == 2) {
            v_store = ggml_new_tensor_3d(ctx, (ggml_type) t->type_v, n_kv, dv, n_head_kv);
            v       = ggml_transpose(ctx, v_store);
        } else {
            v_store = v = ggml_new_tensor_3d(ctx, (ggml_type) t->type_v, dv, n_kv, n_head_kv);
        }
        if (t->mask) {
            mask = ggml_new_tensor_2d(ctx, mask_type, n_kv, GGML_PAD(n_tok, 64));
        }
    }
    if (t->op == 0) {
        p     = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_kv, t->n_rows, n_head);
        cells = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, t->n_rows);
        out   = ggml_loopserve_vs_scores(ctx, p, cells, (int) n_head_kv, t->cell_mod);
    } else if (t->op == 1) {
        sc  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_kv, 2, n_head_kv);
        out = ggml_loopserve_select(ctx, sc, t->alpha, t->n_min_v, t->n_max_v, t->n_min_s, t->n_max_s, t->n_sink,
                                    t->n_local);
    } else if (t->op == 2) {
        cells = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tok);
        sel   = ggml_new_tensor_3d(ctx, GGML_TYPE_I32, (t->n_sel > 0 ? t->n_sel : n_kv) + 1, 2, n_head_kv);
        out = ggml_loopserve_sparse_attn(ctx, q, k, v, mask, cells, sel, t->scale, t->softcap, t->block_q, t->cell_mod);
    } else if (estimate) {
        cells = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tok);
        if (t->op == 4) {
            out = ggml_loopserve_vs_estimate(ctx, q, k, mask, cells, t->scale, t->softcap, t->cell_mod);
        } else {  // the unfused chain the fused op replaces (as in llama-loopserve-prefill.cpp)
            ggml_tensor * kq = ggml_mul_mat(ctx, k, q);
            ggml_prec_set_acc(kq, GGML_PREC_F32);
            float scale = t->scale;
            if (t->softcap != 0.0f) {
                kq    = ggml_scale(ctx, ggml_tanh(ctx, ggml_scale(ctx, kq, t->scale / t->softcap)), t->softcap);
                scale = 1.0f;
            }
            ggml_tensor * mw = mask ? ggml_view_2d(ctx, mask, n_kv, n_tok, mask->nb[1], 0) : nullptr;
            out = ggml_loopserve_vs_scores(ctx, ggml_soft_max_ext(ctx, kq, mw, scale, 0.0f), cells, (int) n_head_kv,
                                           t->cell_mod);
        }
    } else if (t->op == 3) {
        out = ggml_flash_attn_ext(ctx, q, k, v, mask, t->scale, 0.0f, t->softcap);
        ggml_prec_set_acc(out, GGML_PREC_F32);
    } else {
        ggml_free(ctx);
        ggml_backend_free(backend);
        return -1;
    }

    int32_t               rc  = 0;
    ggml_backend_buffer_t buf = nullptr;
    if (!ggml_backend_supports_op(backend, out)) {
        rc = -1;
    } else {
        buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
        if (attn) {
            ggml_backend_tensor_set(q, t->q, 0, ggml_nbytes(q));
            set_rows_f32(k, t->k, n_kv * n_head_kv, dk);
            if (v_store == nullptr) {
                // estimation: no V
            } else if (v_store != v) {  // transposed: rows of n_kv per dim
                std::vector<float> vt((size_t) n_kv * dv * n_head_kv);
                for (int64_t h = 0; h < n_head_kv; ++h) {
                    for (int64_t j = 0; j < n_kv; ++j) {
                        for (int64_t d = 0; d < dv; ++d) {
                            vt[(h * dv + d) * n_kv + j] = t->v[(h * n_kv + j) * dv + d];
                        }
                    }
                }
                set_rows_f32(v_store, vt.data(), dv * n_head_kv, n_kv);
            } else {
                set_rows_f32(v_store, t->v, n_kv * n_head_kv, dv);
            }
            if (mask) {
                std::vector<float> m((size_t) n_kv * mask->ne[1], -INFINITY);
                memcpy(m.data(), t->mask, sizeof(float) * n_kv * n_tok);
                set_rows_f32(mask, m.data(), mask->ne[1], n_kv);
            }
        }
        if (p) {
            ggml_backend_tensor_set(p, t->p, 0, ggml_nbytes(p));
        }
        if (sc) {
            ggml_backend_tensor_set(sc, t->scores, 0, ggml_nbytes(sc));
        }
        if (cells) {
            ggml_backend_tensor_set(cells, t->cells, 0, ggml_nbytes(cells));
        }
        if (sel) {
            ggml_backend_tensor_set(sel, t->sel, 0, ggml_nbytes(sel));
        }

        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, out);
        if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
            rc = -1;
        }
        t->t_ms = 0.0;
        if (rc == 0 && t->n_iter > 0) {
            const int64_t t0 = ggml_time_us();
            for (int i = 0; i < t->n_iter; ++i) {
                ggml_backend_graph_compute(backend, gf);
            }
            ggml_backend_synchronize(backend);
            t->t_ms = (ggml_time_us() - t0) / 1000.0 / t->n_iter;
        }
        if (rc == 0) {
            ggml_backend_tensor_get(out, t->out, 0, ggml_nbytes(out));
        }
    }
    if (buf) {
        ggml_backend_buffer_free(buf);
    }
    ggml_free(ctx);
    ggml_backend_free(backend);
    return rc;
}
