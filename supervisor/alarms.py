"""Alarms in the arbiter (docs/alarms.md): the schedule, and the runs it hands the broker.

`Alarms` is the schedule; `AlarmRunner` turns its due runs into requests of
the broker core (requests with no client: their outcome comes back to
AlarmRunner.settle) and the workers' reports (W_ALARMS) into updates.

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
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from corral.broker_ledger import is_queued
from corral.wire import protocol
from corral.wire.protocol import Dialect, Status

RETRIES = 6               # runs after the first, at most
BACKOFF_MS = 1000         # before the first retry; doubling
JITTER = 0.25
MAX_RUNNING = 16          # runs of one service out at once
RUN_DEADLINE_S = 30.0     # a run still queued this long is a failed run (504), as a client's request


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
    def __init__(self, retries: int = RETRIES, backoff_ms: int | None = None, jitter: float = JITTER,
                 max_running: int = MAX_RUNNING, rng: random.Random | None = None):
        self.retries = retries
        self.backoff_ms = BACKOFF_MS if backoff_ms is None else backoff_ms   # (read now: tests/hooks may set it)
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


class AlarmRunner:
    """The broker's side of alarms: due runs become requests of the core (routed, timed,
    judged and answered as a client's request of that scope), their outcomes go back to
    the schedule, and the workers' reports of what they committed keep it current.

    The core is duck-typed (services, draining, enqueue(..., owner=)); nothing here
    touches a socket."""

    flags = protocol.ALARM   # what the core marks this owner's requests with, for the worker

    def __init__(self, log, schedule: Alarms | None = None, clock=time.time):
        self.log = log
        self.schedule = schedule or Alarms()
        self.clock = clock
        self.runs: dict[int, Run] = {}     # ticket -> the run it is
        self.requests: dict[int, object] = {}   # ticket -> its request in the core, while open
        # Scopes a dead worker held requests of: it may have committed an alarm change and died
        # before reporting it; re-read from the database once it is reaped (identity -> scopes).
        self.suspects: dict[bytes, set[tuple[bytes, bytes]]] = {}
        self.changed = False               # the schedule changed: the loop's timer may be due sooner

    def wall_ms(self) -> int:
        return int(self.clock() * 1000)

    def load(self, service: str, rows) -> None:
        """A service's pending alarms, read from its database (start-up, reload)."""
        self.schedule.load(service.encode(), rows)
        self.changed = True

    def keep_only(self, services) -> None:
        """After a reload: forget the alarms of services that are gone."""
        names = {name.encode() for name in services}
        for name in [n for n in self.schedule.services if n not in names]:
            self.schedule.forget(name)

    def on_report(self, link, payload: bytes) -> None:
        """W_ALARMS from a worker: what its last commit left of each scope's alarm. A service
        the worker does not serve is a protocol violation (ValueError)."""
        served = {service.name for service in link.services}
        records = list(protocol.iter_alarms(payload))   # checked whole: a bad one spoils all
        for service, _, _ in records:
            if service not in served:
                raise ValueError(f"W_ALARMS for service {service[:64]!r}, which this worker does not serve")
        for service, scope, at_ms in records:
            self.schedule.update(service, scope, at_ms)
        self.changed = True

    def suspect(self, identity: bytes, requests) -> None:
        """A worker is gone holding these requests (not yet answered by it)."""
        scopes = {(r.service.name, r.key or b"") for r in requests}
        if scopes:
            self.suspects.setdefault(identity, set()).update(scopes)

    def recheck(self, identity: bytes, read) -> None:
        """The worker is reaped (it can commit nothing more): read(service, scope) -> at_ms or
        None, for each scope it held, as its database says now."""
        for service, scope in self.suspects.pop(identity, ()):
            if service in self.schedule.services:
                try:
                    at_ms = read(service.decode(), scope)
                except Exception as exc:   # an unreadable database: keep what is known
                    self.log.error("alarms.unreadable", service=service.decode(errors="replace"), error=str(exc))
                    continue
                self.schedule.update(service, scope, at_ms)
                self.changed = True

    def next_due(self) -> float | None:
        """Seconds until the next run is due (0 if it is), None when nothing waits."""
        due = self.schedule.next_due()
        return None if due is None else max(0.0, (due - self.wall_ms()) / 1000)

    def fire(self, core, now: float) -> int:
        """Queue every run that is due; returns how many. Nothing new while draining."""
        if core.draining:
            return 0
        wall = self.wall_ms()
        fired = 0
        for run in self.schedule.due(wall):
            service = core.services.get(run.service)
            body = protocol.alarm_body(-1 if run.drop else run.retries, run.at_ms)
            refusal, probe = None, False
            if service is None:
                refusal = "its service is gone"
            elif service.keyed and not run.scope:
                refusal = "a keyed service's alarm needs a key"
            elif not run.drop:
                # The circuit and quarantine hold as for a client's request; a refusal is a
                # failed run, retried after its backoff.
                if service.health.quarantined(body, now):
                    refusal = "quarantined"
                else:
                    probe, refused = service.health.admit(now)
                    refusal = refused or None
            if refusal is not None:
                self.ended(run, False, f"not run: {refusal}", wall)
                continue
            request = core.enqueue(b"", Dialect.NATIVE, b"alarm", service, run.scope if service.keyed else None,
                                   body, now + RUN_DEADLINE_S, False, now, probe, owner=self)
            self.runs[request.ticket] = run
            self.requests[request.ticket] = request
            fired += 1
        return fired

    def settle(self, request, status: Status, body: bytes, now: float) -> None:
        """The core's word on a run: 200 is done, anything else failed."""
        run = self.runs.pop(request.ticket, None)
        self.requests.pop(request.ticket, None)
        if run is not None:
            self.ended(run, status is Status.OK, f"{int(status)} {body[:200].decode(errors='replace')}",
                       self.wall_ms())

    def ended(self, run: Run, ok: bool, detail: str, wall: int) -> None:
        verdict = self.schedule.finished(run, ok, wall)
        self.changed = True
        fields = {"service": run.service.decode(errors="replace"), "scope": run.scope[:64].hex(),
                  "at_ms": run.at_ms}
        if verdict == "failed":
            self.log.info("alarm.failed", retries=run.retries, detail=detail, **fields)
        elif verdict == "dropped":
            self.log.warning("alarm.dropped", retries=self.schedule.retries, **fields)
        elif verdict == "retry":
            self.log.info("alarm.drop_failed", detail=detail, **fields)

    def counts(self, service: str) -> dict[str, int]:
        return self.schedule.counts(service.encode())

    def queued(self, service) -> int:
        """Runs of this service still in its queue (at most max_running): not the clients'."""
        return sum(1 for r in self.requests.values() if r.service is service and is_queued(r))
