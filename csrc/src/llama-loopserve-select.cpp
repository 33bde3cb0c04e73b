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
    // window's elements added one shifted copy at a time from its first, and divided once, as
    // eviction.pool does (so each mean rounds alike; the loops over i vectorize)
    const int32_t pad = kernel / 2;
    d.resize((size_t) n + kernel);
    for (int32_t i = 0; i < n + kernel - 1; ++i) {
        d[i] = row[std::clamp(i - pad, 0, n - 1)];
        if (std::isnan(d[i])) {
            return false;
        }
    }
    for (int32_t i = 0; i < n; ++i) {
        s[i] = d[i];
    }
    for (int32_t j = 1; j < kernel; ++j) {
        const double * dj = d.data() + j;
        for (int32_t i = 0; i < n; ++i) {
            s[i] += dj[i];
        }
    }
    if (kernel > 1) {
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
    tmp.assign(s.begin(), s.begin() + n);
    std::nth_element(tmp.begin(), tmp.begin() + (budget - 1), tmp.end(), std::greater<double>());
    const double t     = tmp[budget - 1];
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
