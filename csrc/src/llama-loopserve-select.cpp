// The choice of a head-wise cut on the host: for each row of scores, its `budget` best
// cells (llama_loopserve_select_rows in include/llama-loopserve.h). The controller's numpy
// version (eviction.choose_keep_rows) is the reference: the same pooling, rounded the same
// way, and the same tie rule, so both keep the same cells. This one runs each row once
// through its own buffer and spreads the rows over threads: numpy makes several passes and
// temporaries of the whole block, and a periodic cut at budget 2048 then costs ~10 ms of
// the decoding it interrupts (benchmarks/results/decode.md).

#include "llama-loopserve.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

// The pooling of a window of K: d[i] + d[i+1] + ... + d[i+K-1], added in that order, over K.
template <int K> static void loopserve_pool_fixed(const double * d, double * s, int32_t n) {
    for (int32_t i = 0; i < n; ++i) {
        double acc = d[i];
        for (int j = 1; j < K; ++j) {
            acc += d[i + j];
        }
        s[i] = acc / K;
    }
}

// The k-th highest of s[0..n). A search over the whole row costs most of a cut's choice after
// a long input (one row of 64K cells: nth_element over 64K values, against a budget of 2048).
// Where k is a small share of n, a sample of the row gives a value v that about 2k cells
// reach; if at least k do, the k-th highest is among them (every cell at or above it is at or
// above v), so the search runs over those alone and finds the same value. Else (a sample that
// missed the row's shape) the whole row is searched, as before.
static double loopserve_kth_highest(const double * s, int32_t n, int32_t k, std::vector<double> & tmp) {
    tmp.resize((size_t) n);
    if (n >= 4096 && n >= 8 * (int64_t) k) {
        const int32_t step = n / 2048;
        int32_t       m    = 0;
        for (int32_t i = 0; i < n; i += step) {
            tmp[m++] = s[i];
        }
        // the sample's rank of the k-th highest is about k*m/n: twice that, and some, for margin
        const int32_t r = (int32_t) std::min<int64_t>(m - 1, 2 * (int64_t) k * m / n + 16);
        std::nth_element(tmp.begin(), tmp.begin() + r, tmp.begin() + m, std::greater<double>());
        const double v = tmp[r];
        int32_t      c = 0;
        for (int32_t i = 0; i < n; ++i) {  // branch-free: each value written, kept if >= v
            tmp[c] = s[i];
            c += s[i] >= v;
        }
        if (c >= k) {
            std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.begin() + c, std::greater<double>());
            return tmp[k - 1];
        }
    }
    std::copy(s, s + n, tmp.begin());
    std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), std::greater<double>());
    return tmp[k - 1];
}

// One row: pooled scores into s (n), then the kept indices, ascending, into out (budget).
// d and tmp are the caller's buffers, reused from row to row. False if the row holds a NaN
// (no order to choose by).
static bool loopserve_select_row(const float *         row,
                                 int32_t               n,
                                 int32_t               kernel,
                                 int32_t               lo,
                                 int32_t               hi,
                                 int32_t               budget,
                                 std::vector<double> & d,
                                 std::vector<double> & s,
                                 std::vector<double> & tmp,
                                 int32_t *             out) {
    // the mean over a window of `kernel` positions, edges repeated: the row padded, then the
    // window's elements added in order from its first and divided once, as eviction.pool does
    // (its shifted copies add them in the same order, so each mean rounds alike)
    const int32_t pad = kernel / 2;
    d.resize((size_t) n + kernel);
    bool nan = false;
    for (int32_t i = 0; i < pad; ++i) {
        d[i] = row[0];
    }
    for (int32_t i = 0; i < n; ++i) {  // vectorizes: no clamp or early exit inside
        d[pad + i] = row[i];
        nan |= std::isnan(row[i]);
    }
    for (int32_t i = pad + n; i < n + kernel - 1; ++i) {
        d[i] = row[n - 1];
    }
    if (nan) {
        return false;
    }
    switch (kernel) {
        case 1:
            std::copy(d.begin(), d.begin() + n, s.begin());
            break;
        case 7:  // the default: one pass, each window summed in registers
            loopserve_pool_fixed<7>(d.data(), s.data(), n);
            break;
        default:
            for (int32_t i = 0; i < n; ++i) {
                s[i] = d[i];
            }
            for (int32_t j = 1; j < kernel; ++j) {
                const double * dj = d.data() + j;
                for (int32_t i = 0; i < n; ++i) {
                    s[i] += dj[i];
                }
            }
            for (int32_t i = 0; i < n; ++i) {
                s[i] /= kernel;
            }
    }
    // the sinks and the recent cells are always kept
    const double inf = std::numeric_limits<double>::infinity();
    for (int32_t i = 0; i < lo; ++i) {
        s[i] = inf;
    }
    for (int32_t i = hi; i < n; ++i) {
        s[i] = inf;
    }

    // t: the budget-th highest; all above it are kept, and of those equal to it the latest
    const double t     = loopserve_kth_highest(s.data(), n, budget, tmp);
    int32_t      above = 0;
    for (int32_t i = 0; i < n; ++i) {
        above += s[i] > t;
    }
    int32_t need = budget - above;
    int32_t from = n;  // the tied cells kept are those at from..n-1
    for (int32_t i = n - 1; i >= 0 && need > 0; --i) {
        if (s[i] == t) {
            --need;
            from = i;
        }
    }
    int32_t k = 0;
    for (int32_t i = 0; i < n; ++i) {
        if (s[i] > t || (s[i] == t && i >= from)) {
            out[k++] = i;
        }
    }
    return true;
}

int32_t llama_loopserve_select_rows(const float * scores,
                                    int32_t       n_rows,
                                    int32_t       n,
                                    int32_t       kernel,
                                    int32_t       lo,
                                    int32_t       hi,
                                    int32_t       budget,
                                    int32_t       n_threads,
                                    int32_t *     out) {
    if (scores == nullptr || out == nullptr || n_rows < 0 || n < 1 || kernel < 1 || budget < 1 || budget > n ||
        lo < 0 || hi < lo || hi > n || lo + (n - hi) > budget) {
        return -1;
    }
    // threads from 2^16 scores on: below that starting them costs about what they save
    const int64_t     total = (int64_t) n_rows * n;
    int32_t           nt    = total < (1 << 16) ? 1 : std::max(1, std::min(n_threads, n_rows));
    std::atomic<bool> ok{ true };
    const auto        work = [&](int32_t r0, int32_t r1) {
        std::vector<double> d;
        std::vector<double> s((size_t) n);
        std::vector<double> tmp((size_t) n);
        for (int32_t r = r0; r < r1; ++r) {
            if (!loopserve_select_row(scores + (size_t) r * n, n, kernel, lo, hi, budget, d, s, tmp,
                                             out + (size_t) r * budget)) {
                ok = false;
                return;
            }
        }
    };
    if (nt <= 1) {
        work(0, n_rows);
        return ok ? 0 : -1;
    }
    std::vector<std::thread> threads;
    const int32_t            per = (n_rows + nt - 1) / nt;
    for (int32_t r0 = per; r0 < n_rows; r0 += per) {
        threads.emplace_back(work, r0, std::min(n_rows, r0 + per));
    }
    work(0, std::min(n_rows, per));
    for (auto & th : threads) {
        th.join();
    }
    return ok ? 0 : -1;
}
