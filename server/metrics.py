"""Request counters, batch sizes and latencies, kept in the HTTP process and served at ``/metrics``."""

from __future__ import annotations

import threading
from collections import Counter, deque


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


class ServerMetrics:
    """Thread-safe counters; latencies keep the most recent ``window`` requests."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.status_counts: Counter[int] = Counter()
        self.error_counts: Counter[str] = Counter()
        self.batch_size_counts: Counter[int] = Counter()
        self.budget_counts: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=window)

    def record(self, status: int, latency_s: float, batch_size: int | None = None, budget: str | None = None,
               error: str | None = None) -> None:
        with self._lock:
            self.requests += 1
            self.status_counts[status] += 1
            self.latencies_ms.append(1000 * latency_s)
            if batch_size is not None:
                self.batch_size_counts[batch_size] += 1
            if budget is not None:
                self.budget_counts[budget] += 1
            if error is not None:
                self.error_counts[error] += 1

    def snapshot(self) -> dict:
        with self._lock:
            latencies = list(self.latencies_ms)
            served = sum(self.batch_size_counts.values())
            return {
                "requests": self.requests,
                "status_counts": {str(code): count for code, count in sorted(self.status_counts.items())},
                "errors": dict(self.error_counts),
                # requests answered from a forward pass of that many requests
                "batch_size_counts": {str(size): count for size, count in sorted(self.batch_size_counts.items())},
                "max_batch_size_seen": max(self.batch_size_counts, default=0),
                "mean_batch_size": (sum(size * count for size, count in self.batch_size_counts.items()) / served
                                    if served else None),
                "budget_counts": dict(self.budget_counts),
                "latency_ms": {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
                               "count": len(latencies)},
            }
