"""The daemon's status as one typed snapshot, taken in one place.

`corral status` (its JSON and its table), the Prometheus metrics and
sd_notify's STATUS= line all read a Snapshot, so they cannot disagree on
what a number means. A snapshot is frozen, and only the arbiter's loop takes
one (from the broker's core and the pool): the metrics thread reads the one
the loop last published on a Board, never the live objects.

The JSON of `corral status --json` is `Snapshot.to_json()`; the CLI turns
it back with `Snapshot.from_json()`. What only metrics reads (latency
histograms, the broker's refusals, worker exits) is not in that JSON.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

import psutil

from corral.pool import WorkerState


@dataclass(frozen=True)
class WorkerView:
    slot: int
    identity: str
    generation: int
    pid: int
    state: str                 # a WorkerState's value, or "standby" for a ready standby
    config_generation: int
    requests: int = 0
    in_flight: int = 0
    faults: int = 0
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    uptime_s: float = 0.0
    # What the worker said in READY (docs/confinement.md); None before it is ready.
    seccomp: bool | None = None
    landlock: int | None = None   # the Landlock ABI it applied; 0: none
    uid: int | None = None
    cordon: str = "default"       # whose apps it serves (docs/confinement.md)
    host: str = ""   # "" on the broker's own host; else the remote host's key name (docs/cluster.md)

    def to_json(self) -> dict:
        return {"slot": self.slot, "identity": self.identity, "generation": self.generation, "pid": self.pid,
                "state": self.state, "config_generation": self.config_generation, "requests": self.requests,
                "in_flight": self.in_flight, "faults": self.faults, "rss_bytes": self.rss_bytes,
                "cpu_percent": self.cpu_percent, "uptime_s": self.uptime_s, "seccomp": self.seccomp,
                "landlock": self.landlock, "uid": self.uid, "cordon": self.cordon, "host": self.host or "local"}

    def confined(self) -> str:
        """`corral status`'s column: "seccomp+landlock7", "landlock7", "none", "-" (not ready)."""
        if self.seccomp is None:
            return "-"
        parts = (["seccomp"] if self.seccomp else []) + ([f"landlock{self.landlock}"] if self.landlock else [])
        return "+".join(parts) or "none"


@dataclass(frozen=True)
class StateView:
    """A service's durable state, as its database says."""
    commits: int
    rollbacks: int
    bytes: int
    scopes: int
    extra: tuple[tuple[str, object], ...] = ()   # whatever else the database reports, kept as is

    @classmethod
    def from_stats(cls, stats: dict) -> "StateView":
        known = ("commits", "rollbacks", "bytes", "scopes")
        return cls(*(stats.get(k, 0) for k in known),
                   extra=tuple((k, v) for k, v in stats.items() if k not in known))

    def to_json(self) -> dict:
        return {"commits": self.commits, "rollbacks": self.rollbacks, "bytes": self.bytes,
                "scopes": self.scopes, **dict(self.extra)}


@dataclass(frozen=True)
class Latency:
    counts: tuple[int, ...] = ()   # per bucket of histogram.LATENCY_BUCKETS, the last one +Inf
    sum: float = 0.0
    count: int = 0


@dataclass(frozen=True)
class ServiceView:
    name: str
    instances: str
    circuit: str
    circuit_opened: int = 0
    queued: int = 0
    running: int = 0
    dropped: int = 0
    quarantined: int = 0
    statuses: tuple[tuple[int, int], ...] = ()   # (status, replies), by status
    keys: int | None = None        # keyed services only
    evicted: int | None = None     # keyed services only
    state: StateView | None = None
    latency: Latency = field(default_factory=Latency)
    alarms: tuple[tuple[str, int], ...] | None = None   # pending, fired, failed, dropped (docs/alarms.md)

    @property
    def keyed(self) -> bool:
        return self.keys is not None

    @property
    def served(self) -> int:
        return dict(self.statuses).get(200, 0)

    def to_json(self) -> dict:
        return {"name": self.name, "instances": self.instances, "circuit": self.circuit,
                "circuit_opened": self.circuit_opened, "queued": self.queued, "running": self.running,
                "dropped": self.dropped, "quarantined": self.quarantined,
                **({"keys": self.keys, "evicted": self.evicted} if self.keyed else {}),
                "statuses": {str(k): v for k, v in self.statuses},
                **({"state": self.state.to_json()} if self.state is not None else {}),
                **({"alarms": dict(self.alarms)} if self.alarms is not None else {})}

    @classmethod
    def from_json(cls, data: dict) -> "ServiceView":
        state = data.get("state")
        return cls(data["name"], data["instances"], data["circuit"], data.get("circuit_opened", 0),
                   data.get("queued", 0), data.get("running", 0), data.get("dropped", 0),
                   data.get("quarantined", 0), _statuses(data.get("statuses", {})),
                   data.get("keys"), data.get("evicted"),
                   StateView.from_stats(state) if state else None,
                   alarms=tuple(data["alarms"].items()) if data.get("alarms") else None)


@dataclass(frozen=True)
class ClientView:
    client: str
    queued: int
    running: int
    unread_bytes: int
    dropped: int
    refused: int
    over_budget: bool

    def to_json(self) -> dict:
        return {"client": self.client, "queued": self.queued, "running": self.running,
                "unread_bytes": self.unread_bytes, "dropped": self.dropped, "refused": self.refused,
                "over_budget": self.over_budget}


@dataclass(frozen=True)
class Snapshot:
    pid: int
    uptime_s: float
    config: str
    config_generation: int
    state: str                     # running, reloading or stopping
    workers_target: int
    workers: tuple[WorkerView, ...] = ()
    services: tuple[ServiceView, ...] = ()
    in_flight: int = 0
    statuses: tuple[tuple[int, int], ...] = ()   # every reply sent, the broker's refusals included
    dropped_replies: int = 0
    clients: tuple[ClientView, ...] = ()
    rejected: tuple[tuple[int, int], ...] = ()   # refused before a service queue, by status
    exits: tuple[tuple[str, int], ...] = ()      # worker exits, by kind

    @property
    def served(self) -> int:
        return sum(s.served for s in self.services)

    @property
    def ready(self) -> int:
        """Worker processes that finished starting, standbys included."""
        return sum(1 for w in self.workers if w.state in ("ready", "standby"))

    def worker_states(self) -> dict[str, int]:
        """Worker processes by state, a ready standby counted as ready."""
        counts: dict[str, int] = {}
        for w in self.workers:
            state = "ready" if w.state == "standby" else w.state
            counts[state] = counts.get(state, 0) + 1
        return dict(sorted(counts.items()))

    def status_line(self) -> str:
        """sd_notify's STATUS=: one line for `systemctl status`."""
        return (f"{self.ready}/{self.workers_target} workers ready, "
                f"{self.in_flight} requests open, {self.served} served")

    def to_json(self) -> dict:
        """The reply of the control verb `status` (without its "ok")."""
        return {"pid": self.pid, "uptime_s": self.uptime_s, "config": self.config,
                "config_generation": self.config_generation, "state": self.state,
                "workers_target": self.workers_target, "workers": [w.to_json() for w in self.workers],
                "services": [s.to_json() for s in self.services], "in_flight": self.in_flight,
                "statuses": {str(k): v for k, v in self.statuses}, "dropped_replies": self.dropped_replies,
                "clients": [c.to_json() for c in self.clients]}

    @classmethod
    def from_json(cls, data: dict) -> "Snapshot":
        return cls(data["pid"], data["uptime_s"], data["config"], data["config_generation"], data["state"],
                   data["workers_target"], tuple(WorkerView(**w) for w in data.get("workers", [])),
                   tuple(ServiceView.from_json(s) for s in data.get("services", [])),
                   data.get("in_flight", 0), _statuses(data.get("statuses", {})),
                   data.get("dropped_replies", 0), tuple(ClientView(**c) for c in data.get("clients", [])))

    def table(self) -> str:
        """`corral status` for a person."""
        out = [f"corral pid {self.pid}, {self.state}, up {self.uptime_s:.0f} s, "
               f"config {self.config} (generation {self.config_generation})",
               f"requests: {self.in_flight} in flight; by status "
               + (", ".join(f"{k}: {v}" for k, v in self.statuses) or "none yet"),
               f"\nworkers ({len(self.workers)} of {self.workers_target} wanted):",
               f"  {'slot':>4} {'gen':>4} {'pid':>8} {'state':<9} {'requests':>9} {'faults':>6} {'rss MiB':>8}"
               f" {'cpu %':>6} {'uid':>5} {'cordon':<12} {'confined':<20} host"]
        for w in self.workers:
            rss = f"{w.rss_bytes / 1048576:.1f}" if w.rss_bytes else "-"
            cpu = f"{w.cpu_percent:.0f}" if w.cpu_percent is not None else "-"
            out.append(f"  {w.slot:>4} {w.generation:>4} {w.pid:>8} {w.state:<9} {w.requests:>9} "
                       f"{w.faults:>6} {rss:>8} {cpu:>6} {'-' if w.uid is None else w.uid:>5} {w.cordon:<12} "
                       f"{w.confined():<20} {w.host or 'local'}")
        out.append("\nservices:")
        out.append(f"  {'name':<20} {'instances':<12} {'circuit':<10} {'queued':>6} {'running':>7} "
                   f"{'dropped':>7}  statuses")
        for s in self.services:
            counts = ", ".join(f"{k}: {v}" for k, v in s.statuses) or "-"
            keys = f"  ({s.keys} keys live, {s.evicted} evicted)" if s.keyed else ""
            out.append(f"  {s.name:<20} {s.instances:<12} {s.circuit:<10} {s.queued:>6} "
                       f"{s.running:>7} {s.dropped:>7}  {counts}{keys}")
            if s.state is not None:
                st = s.state
                out.append(f"  {'':<20} state: {st.commits} commits, {st.rollbacks} rollbacks, "
                           f"{st.bytes} bytes in {st.scopes} scopes")
            if s.alarms is not None:
                out.append(f"  {'':<20} alarms: " + ", ".join(f"{v} {k}" for k, v in s.alarms))
        if self.clients:
            out.append("\nclients (the busiest first):")
            out.append(f"  {'client':<24} {'queued':>7} {'running':>7} {'unread KiB':>10} {'dropped':>8} "
                       f"{'refused':>8}")
            for c in self.clients:
                over = "  over budget" if c.over_budget else ""
                out.append(f"  {c.client[:24]:<24} {c.queued:>7} {c.running:>7} {c.unread_bytes / 1024:>10.0f} "
                           f"{c.dropped:>8} {c.refused:>8}{over}")
        return "\n".join(out)


def _statuses(data: dict) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((int(k), v) for k, v in data.items()))


def _counts(counter) -> tuple:
    return tuple(sorted((int(k) if not isinstance(k, str) else k, v) for k, v in dict(counter).items()))


def _confinement(said: dict) -> tuple:
    """(seccomp, landlock, uid) from a worker's READY, None where it said nothing."""
    return bool(said["seccomp"]) if "seccomp" in said else None, said.get("landlock"), said.get("uid")


@dataclass(frozen=True)
class Facts:
    """What the arbiter tells a snapshot about itself."""
    started: float                 # time.monotonic() at start
    config: str
    config_generation: int
    state: str                     # running, reloading or stopping
    workers_target: int


StateStats = Callable[[str], "dict | None"]   # service name -> its durable state's counters
AlarmCounts = Callable[[str], "dict[str, int]"]   # service name -> its alarms' counts (docs/alarms.md)


def take(broker, pool, facts: Facts, *, measure: bool = True, state_stats: StateStats | None = None,
         alarm_counts: AlarmCounts | None = None) -> Snapshot:
    """The daemon as it is now, from the broker's core and the pool (in the loop's thread).
    `measure` asks psutil for each worker's rss and cpu (cpu is since the last measure:
    only `corral status` asks); `state_stats` reads each service's durable state counters;
    `alarm_counts` gives each service's alarms pending, fired, failed and dropped."""
    now = time.monotonic()
    links = broker.links
    workers = []
    for worker in sorted(pool.processes.values(), key=lambda w: (w.slot, w.generation)):
        link = links.get(worker.identity)
        rss = cpu = None
        if measure and worker.psutil is not None:
            try:
                rss = worker.psutil.memory_info().rss
                cpu = worker.psutil.cpu_percent(None)
            except psutil.Error:
                pass
        state = "standby" if worker.standby and worker.state is WorkerState.READY else worker.state.value
        workers.append(WorkerView(worker.slot, worker.identity.decode(), worker.generation, worker.pid, state,
                                  worker.config_generation, link.handled if link else 0,
                                  len(link.inflight) if link else 0, link.faults if link else 0,
                                  rss, cpu, round(now - worker.started, 3),
                                  *_confinement(link.confinement if link else {}), worker.cordon))
    for link in links.values():   # remote workers (docs/cluster.md): their host owns the process
        if getattr(link, "host", ""):
            workers.append(WorkerView(-1, link.identity.decode(errors="replace"), 0, link.pid,
                                      "retiring" if link.retiring else "ready", facts.config_generation,
                                      link.handled, len(link.inflight), link.faults, None, None, 0.0,
                                      *_confinement(link.confinement), host=link.host))
    running: dict = {}
    for link in links.values():
        for request in link.inflight.values():
            running[id(request.service)] = running.get(id(request.service), 0) + 1
    services = []
    for name, service in broker.services.items():
        stats = state_stats(name.decode()) if state_stats is not None else None
        latency = service.latency
        alarms = alarm_counts(name.decode()) if alarm_counts is not None else {}
        services.append(ServiceView(
            name.decode(), service.app.instances, service.health.circuit.value, service.health.opened,
            len(service.queue), running.get(id(service), 0), service.dropped,
            len(service.health.quarantined_until), _counts(service.statuses),
            len(service.affinity) if service.keyed else None, service.evicted if service.keyed else None,
            StateView.from_stats(stats) if stats else None,
            Latency(tuple(latency.counts), latency.sum, latency.count),
            tuple(alarms.items()) if alarms and (stats or any(alarms.values())) else None))
    clients = tuple(ClientView(c["client"], c["queued"], c["running"], c["unread_bytes"], c["dropped"],
                               c["refused"], c["over_budget"]) for c in broker.clients())
    return Snapshot(os.getpid(), round(now - facts.started, 3), facts.config, facts.config_generation,
                    facts.state, facts.workers_target, tuple(workers), tuple(services),
                    len(broker.ledger), _counts(broker.totals()), broker.dropped_replies, clients,
                    _counts(broker.rejected), _counts(pool.exits))


def with_state(snapshot: Snapshot, state_stats: StateStats) -> Snapshot:
    """The snapshot with each service's durable state counters, read from its database (on
    the reader's thread: the loop never waits for SQLite on a scrape's behalf)."""
    services = []
    for service in snapshot.services:
        stats = state_stats(service.name)
        services.append(replace(service, state=StateView.from_stats(stats) if stats else None))
    return replace(snapshot, services=tuple(services))


class Board:
    """The latest Snapshot the loop published, for readers on other threads (the metrics exporter).

    A reader asks for a fresh one: the loop is woken (`wake`), sees `wanted`, and
    publishes at the end of its turn; the reader waits for it at most `timeout`."""

    def __init__(self, wake: Callable[[], None]):
        self.wake = wake
        self.latest: Snapshot | None = None
        self.wanted = False
        self.changed = threading.Condition()

    def read(self, timeout: float = 2.0) -> Snapshot | None:
        with self.changed:
            seen = self.latest
            self.wanted = True
            self.wake()
            self.changed.wait_for(lambda: self.latest is not seen, timeout)
            return self.latest

    def publish(self, snapshot: Snapshot) -> None:
        with self.changed:
            self.latest = snapshot
            self.wanted = False
            self.changed.notify_all()
