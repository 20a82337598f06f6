"""The alarm schedule (docs/alarms.md): which alarms are due, their retries, and drops.

A plain object, in the arbiter: no sockets, no database, `now` passed in
(wall-clock milliseconds, the alarms' own clock). The broker feeds it what
it learns and asks it what to run:

  load(service, rows)        the pending alarms read from a service's database
                             (at start-up, and on a reload)
  update(service, scope, at) a committed change a worker reported (None: deleted)
  due(now)                   the runs due now, the earliest first; each is then
                             running until finished(run, ok, now) says how it ended
  next_due()                 when the next run is due (None: nothing waits)

One heap per service of (due, sequence, scope), with an index by scope: an
entry changed since it was pushed is skipped when it comes up (its sequence
no longer matches), so nothing is ever scanned and no timer is kept per
alarm. A scope has at most one run at a time; at most `max_running` runs of
one service are out at once, so that ten thousand alarms due in the same
second are not queued ahead of the service's clients all at once.

A failed run is retried after a backoff measured from its end: 1 s, doubling
per retry, within 25% jitter; the run after the sixth retry failing (seven
runs in all), the alarm is dropped: a DROP run deletes it (only if it is
still the same alarm), and it is counted and logged by the broker.
"""

from __future__ import annotations

import heapq
import os
import random
from collections import Counter
from dataclasses import dataclass, field

RETRIES = 6               # runs after the first, at most
BACKOFF_MS = 1000         # before the first retry; doubling
JITTER = 0.25
MAX_RUNNING = 64          # runs of one service out at once
# Tests only: the first backoff, so that seven runs take seconds rather than a minute.
TEST_BACKOFF_MS = int(os.environ.get("CORRAL_TEST_ALARM_BACKOFF_MS", "0") or 0)


@dataclass(slots=True)
class Run:
    """One run of an alarm: `drop` deletes it without calling the guest."""
    service: bytes
    scope: bytes
    at_ms: int
    retries: int
    drop: bool = False


@dataclass(slots=True)
class Entry:
    at_ms: int            # the alarm's time, as committed
    due_ms: int           # when it runs next (later than at_ms after a failure)
    retries: int = 0
    seq: int = 0          # of its newest heap item; older items are stale
    running: Run | None = None
    dropping: bool = False   # failed every retry: the next run deletes it


@dataclass
class ServiceAlarms:
    entries: dict[bytes, Entry] = field(default_factory=dict)
    heap: list[tuple[int, int, bytes]] = field(default_factory=list)
    running: int = 0
    counts: Counter = field(default_factory=Counter)   # fired, failed, dropped


class Alarms:
    def __init__(self, retries: int = RETRIES, backoff_ms: int = BACKOFF_MS, jitter: float = JITTER,
                 max_running: int = MAX_RUNNING, rng: random.Random | None = None):
        self.retries = retries
        self.backoff_ms = TEST_BACKOFF_MS or backoff_ms
        self.jitter = jitter
        self.max_running = max_running
        self.rng = rng or random.Random()
        self.services: dict[bytes, ServiceAlarms] = {}
        self.seq = 0

    # --- what the broker learns ------------------------------------------------

    def load(self, service: bytes, rows) -> None:
        """A service's pending alarms as its database holds them: (scope, at_ms) rows. A scope
        with a run out keeps it; everything else is taken as read."""
        alarms = self.services.setdefault(service, ServiceAlarms())
        seen = set()
        for scope, at_ms in rows:
            seen.add(scope)
            entry = alarms.entries.get(scope)
            if entry is None or entry.at_ms != at_ms:
                self.update(service, scope, at_ms)
        for scope in [s for s in alarms.entries if s not in seen]:
            self.update(service, scope, None)

    def forget(self, service: bytes) -> None:
        """A service removed by a reload."""
        self.services.pop(service, None)

    def update(self, service: bytes, scope: bytes, at_ms: int | None) -> None:
        """A committed change: the scope's alarm is now at `at_ms` (None: it has none). A new
        time starts again at retries 0."""
        alarms = self.services.setdefault(service, ServiceAlarms())
        entry = alarms.entries.get(scope)
        if at_ms is None:
            if entry is not None:
                if entry.running is None:
                    del alarms.entries[scope]
                else:
                    entry.at_ms = -1   # gone once its run is over
            return
        if entry is None:
            entry = alarms.entries[scope] = Entry(at_ms, at_ms)
        elif entry.at_ms == at_ms:
            return   # already known (a report repeating what was loaded)
        else:
            entry.at_ms, entry.due_ms, entry.retries, entry.dropping = at_ms, at_ms, 0, False
        if entry.running is None:
            self.push(alarms, scope, entry)

    def push(self, alarms: ServiceAlarms, scope: bytes, entry: Entry) -> None:
        self.seq += 1
        entry.seq = self.seq
        heapq.heappush(alarms.heap, (entry.due_ms, self.seq, scope))

    # --- what is due ---------------------------------------------------------

    def due(self, now_ms: int) -> list[Run]:
        """The runs due at `now_ms`, earliest first within each service; each is running
        until finished() is called for it."""
        runs = []
        for service, alarms in self.services.items():
            heap, entries = alarms.heap, alarms.entries
            while heap and heap[0][0] <= now_ms and alarms.running < self.max_running:
                _, seq, scope = heapq.heappop(heap)
                entry = entries.get(scope)
                if entry is None or entry.seq != seq or entry.running is not None:
                    continue   # stale: changed, deleted or running since it was pushed
                entry.running = Run(service, scope, entry.at_ms, entry.retries, entry.dropping)
                alarms.running += 1
                runs.append(entry.running)
        return runs

    def next_due(self) -> int | None:
        """When the earliest waiting run is due (ms), stale heap items aside; None if none."""
        earliest = None
        for alarms in self.services.values():
            heap, entries = alarms.heap, alarms.entries
            while heap:
                _, seq, scope = heap[0]
                entry = entries.get(scope)
                if entry is not None and entry.seq == seq and entry.running is None:
                    break
                heapq.heappop(heap)
            if heap and alarms.running < self.max_running and (earliest is None or heap[0][0] < earliest):
                earliest = heap[0][0]
        return earliest

    def finished(self, run: Run, ok: bool, now_ms: int) -> str:
        """A run is over: "fired" (a run that succeeded), "failed" (to be retried), "dropped"
        (a DROP run that deleted it), "retry" (a DROP run that failed: it is tried again),
        or "stale" (the alarm was replaced or deleted meanwhile; that stands)."""
        alarms = self.services.get(run.service)
        entry = alarms.entries.get(run.scope) if alarms is not None else None
        if entry is None or entry.running is not run:
            return "stale"   # its service was removed (and perhaps added again) meanwhile
        alarms.running -= 1
        entry.running = None
        if run.drop:
            verdict = "dropped" if ok else "retry"
        else:
            verdict = "fired" if ok else "failed"
        if verdict != "retry":
            alarms.counts[verdict] += 1
        if entry.at_ms != run.at_ms:
            # Replaced or deleted while it ran: the new alarm stands, at retries 0.
            if entry.at_ms < 0:
                del alarms.entries[run.scope]
            else:
                self.push(alarms, run.scope, entry)
            return verdict
        if ok:
            # Its commit deleted it; the worker's report (read before this reply) normally
            # has already; a stale answer ("not that alarm") lands here too.
            del alarms.entries[run.scope]
            return verdict
        if not run.drop:
            entry.retries += 1
            entry.dropping = entry.retries > self.retries
        entry.due_ms = now_ms + (self.backoff(entry.retries) if not entry.dropping else
                                 (0 if not run.drop else self.backoff_ms))
        self.push(alarms, run.scope, entry)
        return verdict

    def backoff(self, retries: int) -> int:
        """Before retry number `retries` (1 = the first): 1 s, doubling, within 25%."""
        base = self.backoff_ms * (1 << (retries - 1))
        return int(base * (1 + self.jitter * (2 * self.rng.random() - 1)))

    # --- what status shows -------------------------------------------------------

    def pending(self, service: bytes) -> int:
        alarms = self.services.get(service)
        return len(alarms.entries) if alarms else 0

    def counts(self, service: bytes) -> dict[str, int]:
        alarms = self.services.get(service)
        counts = alarms.counts if alarms else Counter()
        return {"pending": self.pending(service), "fired": counts["fired"], "failed": counts["failed"],
                "dropped": counts["dropped"]}
