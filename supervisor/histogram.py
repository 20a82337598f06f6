"""A latency histogram: counts per bucket, as Prometheus reads them.

The broker observes every reply's time into its service's Histogram (the
loop's thread); a Snapshot copies the counts (corral.snapshot), and the
metrics exporter renders the copy (corral.metrics). Apart from both so that
the broker's core imports nothing of either.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds from the broker receiving a request to its reply leaving.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("counts", "sum", "count")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1
