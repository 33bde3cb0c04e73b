"""Counters, gauges and histograms in Prometheus' text exposition format (GET /metrics)."""
from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        acc += self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {acc}', f"{name}_sum {self.sum:.6f}", f"{name}_count {acc}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}   # (endpoint, status) -> count
        self.tokens = {"prefilled": 0, "reused": 0, "generated": 0}
        self.kv_evicted = 0
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.per_token = _Histogram(TOKEN_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def turn(self, stats, evicted_before: int) -> None:
        with self._lock:
            self.tokens["prefilled"] += stats.prefilled_tokens
            self.tokens["reused"] += stats.reused_tokens
            self.tokens["generated"] += stats.decode_tokens
            self.kv_evicted += max(0, stats.kv_evicted - evicted_before)
            self.ttft.observe(stats.ttft_s)
            if stats.decode_tokens:
                self.per_token.observe(stats.decode_s / stats.decode_tokens)

    def render(self, gauges: dict[str, tuple]) -> str:
        """The exposition text; `gauges`: name -> (help, value) or (help, value, type), read
        by the caller (type "counter" for totals it keeps)."""
        with self._lock:
            lines = ["# HELP loopserve_requests_total HTTP requests by endpoint and status",
                     "# TYPE loopserve_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'loopserve_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            lines += ["# HELP loopserve_tokens_total prompt tokens prefilled or reused from a dialogue's KV, "
                      "and tokens generated", "# TYPE loopserve_tokens_total counter"]
            for kind, n in self.tokens.items():
                lines.append(f'loopserve_tokens_total{{kind="{kind}"}} {n}')
            lines += ["# HELP loopserve_kv_cells_evicted_total KV cells removed by the eviction policy",
                      "# TYPE loopserve_kv_cells_evicted_total counter",
                      f"loopserve_kv_cells_evicted_total {self.kv_evicted}",
                      "# HELP loopserve_ttft_seconds time from the request to the first token",
                      "# TYPE loopserve_ttft_seconds histogram", *self.ttft.lines("loopserve_ttft_seconds"),
                      "# HELP loopserve_decode_seconds_per_token decode time per generated token, per request",
                      "# TYPE loopserve_decode_seconds_per_token histogram",
                      *self.per_token.lines("loopserve_decode_seconds_per_token")]
        for name, (help_, value, *kind) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind[0] if kind else 'gauge'}", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
