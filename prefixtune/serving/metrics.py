"""Prometheus text-format metrics: request counts, generated tokens, batch sizes, queue time, latency."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.total}", f"{name}_count{braces} {self.count}"]
        return out


class ServerMetrics:
    """Counters and histograms, rendered in the Prometheus text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_seconds = Histogram(LATENCY_BUCKETS)
        self.generated_tokens = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def absorb(self, stats) -> None:
        """Take the engine's batch sizes, queue times and token count gathered since last time."""
        sizes, waits = stats.drain()
        with self._lock:
            for s in sizes:
                self.batch_size.observe(s)
            for w in waits:
                self.queue_seconds.observe(w)
            self.generated_tokens = stats.generated_tokens

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP prefixtune_requests_total HTTP requests by endpoint and status.",
                "# TYPE prefixtune_requests_total counter",
            ]
            lines += [
                f'prefixtune_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP prefixtune_generated_tokens_total Tokens generated.",
                "# TYPE prefixtune_generated_tokens_total counter",
                f"prefixtune_generated_tokens_total {self.generated_tokens}",
                "# HELP prefixtune_batch_size Rows in each forward pass of the engine.",
                "# TYPE prefixtune_batch_size histogram",
                *self.batch_size.lines("prefixtune_batch_size"),
                "# HELP prefixtune_queue_seconds Time from arrival to the start of decoding.",
                "# TYPE prefixtune_queue_seconds histogram",
                *self.queue_seconds.lines("prefixtune_queue_seconds"),
                "# HELP prefixtune_request_seconds Request latency by endpoint.",
                "# TYPE prefixtune_request_seconds histogram",
            ]
            for endpoint, hist in sorted(self.latency.items()):
                lines += hist.lines("prefixtune_request_seconds", f'endpoint="{endpoint}"')
            return "\n".join(lines) + "\n"
