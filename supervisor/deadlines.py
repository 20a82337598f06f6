"""When queued requests expire: a heap of (deadline, ticket), earliest first.

The broker pushes every request it queues and asks, on each tick, for the
tickets whose deadline has passed; it looks only at the heap's first entry
while nothing is due, however long the queues. A request that left the
queue (sent to a worker, answered) keeps its entry: it is skipped when its
deadline comes (lazy deletion), and the heap is rebuilt from what is still
queued when such leftovers outnumber the live entries, so it never grows
past a bounded multiple of the ledger.
"""

from __future__ import annotations

import heapq
from typing import Callable, Iterable, Iterator

SLACK = 1024   # leftovers tolerated beyond twice the live entries before a rebuild


class Deadlines:
    __slots__ = ("heap",)

    def __init__(self) -> None:
        self.heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self.heap)

    def push(self, deadline: float, ticket: int) -> None:
        heapq.heappush(self.heap, (deadline, ticket))

    def due(self, now: float) -> Iterator[int]:
        """The tickets whose deadline is `now` or earlier, earliest first, each taken off the heap."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[1]

    def next_due(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def compact(self, live: int, entries: Callable[[], Iterable[tuple[float, int]]]) -> bool:
        """Rebuild from `entries()` (the requests still queued) when leftovers outnumber the
        `live` ones; True when it did."""
        if len(self.heap) <= 2 * live + SLACK:
            return False
        self.heap = list(entries())
        heapq.heapify(self.heap)
        return True
