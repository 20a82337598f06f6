"""What the broker's core keeps: ledger entries, services, client accounts, worker links.

Plain records, no behaviour beyond a few derived numbers: the core
(corral.broker_core) changes them, the dispatch policy (corral.dispatch)
reads them, a Snapshot copies them (corral.snapshot). Who owns which worker
fact, the link here or the pool's process, is in docs/internals.md.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from corral.circuit import Circuit, Health
from corral.config import AppSettings
from corral.dispatch import ClientQueue
from corral.histogram import Histogram
from corral.wire.protocol import Dialect, Status

KEY_ACCOUNT = b"\x00key:"   # BrokerCore.client_key: the account of a CURVE key name


class State(Enum):
    QUEUED = 1
    SENT = 2
    DONE = 3


class Owner(Protocol):
    """Who hears a request's outcome when no client asked for it (issue 19: the broker's own
    requests, e.g. alarms). BrokerCore.finish calls settle() instead of replying on a socket."""

    flags: int   # optional: worker-protocol flags its requests carry (protocol.ALARM for alarm runs)

    def settle(self, request: "Request", status: Status, body: bytes, now: float) -> None: ...


class Request:
    """A ledger entry."""

    __slots__ = ("ticket", "client", "dialect", "request_id", "service", "key", "body", "deadline",
                 "idempotent", "received", "state", "probe", "budget_s", "sent", "redelivered",
                 "account", "owner")

    def __init__(self, ticket: int, client: bytes, dialect: Dialect, request_id: bytes,
                 service: Service, key: bytes | None, body: bytes, deadline: float,
                 idempotent: bool, received: float, probe: bool):
        self.ticket = ticket
        self.client = client
        self.dialect = dialect
        self.request_id = request_id
        self.service = service
        self.key = key
        self.body = body
        self.deadline = deadline
        self.idempotent = idempotent
        self.received = received
        self.state = State.QUEUED
        self.probe = probe
        self.budget_s = 0.0  # the longest the guest may run it, set when it is sent
        self.sent = 0.0      # when it was last sent to a worker
        self.redelivered = False  # re-dispatched after its worker died: it may have committed
        self.account: ClientAccount | None = None  # whose limits it counts against
        self.owner: Owner | None = None   # set: the outcome goes to it, not to a client socket


def is_queued(request: Request) -> bool:
    return request.state is State.QUEUED


@dataclass(eq=False)
class Service:
    name: bytes
    app: AppSettings
    health: Health
    queue: ClientQueue = field(default_factory=ClientQueue)  # fair across clients (keyed: arrival order)
    affinity: dict[bytes, "WorkerLink"] = field(default_factory=dict)  # key -> its worker
    links: list["WorkerLink"] = field(default_factory=list)  # the workers that serve it
    statuses: Counter = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    evicted: int = 0   # keyed: instances dropped over max_keys
    dropped: int = 0   # replies that could not be delivered (client gone, or over its budget)
    typical_s: float = 0.0  # moving average of the time from sent to a worker to its reply

    def __post_init__(self):
        self.queue.fair = not self.keyed

    @property
    def keyed(self) -> bool:
        return self.app.instances == "keyed"

    @property
    def open(self) -> bool:
        """Takes requests without a look at its circuit, quarantine or key (the fast path)."""
        return not self.keyed and self.health.circuit is Circuit.CLOSED and not self.health.quarantined_until


class ClientAccount:
    """One client's share of the broker: requests open, and replies the transport would not take yet.

    A client is a connection (routing identity) or, once CURVE names
    clients, a key name (BrokerCore.client_key). Its replies go straight to
    the frontend while its pipe is under the high-water mark (SNDHWM, set to
    max_inflight_per_client: a client that reads never has more replies
    outstanding than requests in flight). At the mark the transport says
    FULL and the replies wait here, in order, their bytes counted; past
    max_client_backlog_mib they are dropped and the client is `over`:
    refused with 429 until its outbox has drained, that is until it has read."""

    __slots__ = ("name", "inflight", "outbox", "unsent", "dropped", "refused", "over")

    def __init__(self, name: bytes):
        self.name = name
        self.inflight = 0              # accepted and not yet answered, queued or running
        self.outbox: deque[tuple[list[bytes], int]] = deque()  # (frames, cost) the transport would not take
        self.unsent = 0                # bytes in the outbox, REPLY_OVERHEAD each included
        self.dropped = 0               # replies dropped: over the budget, or the client was gone
        self.refused = 0               # requests answered 429
        self.over = False              # dropped a reply over the budget; refused until it reads

    @property
    def label(self) -> str:
        """For status and metrics: a key name as it is, a routing identity in hex."""
        name = self.name
        if name.startswith(KEY_ACCOUNT):
            return name[len(KEY_ACCOUNT):].decode(errors="replace")
        # (bytes have no isprintable(): the text's is asked. Reached only by a client over its
        # budget, inside a worker's reply, where an exception would cost the worker its life)
        if name.isascii() and name[:1] != b"\x00" and name.decode().isprintable():
            return name.decode()
        return name.hex()


@dataclass(eq=False)
class WorkerLink:
    """The broker's view of one worker: credit, what it holds, when it was last heard.

    The pool's WorkerProcess owns the process (pid, slot, state, exit); this
    owns the conversation (docs/internals.md)."""
    identity: bytes
    pid: int
    capacity: int
    services: list[Service]
    last_seen: float
    liveness_s: float      # silent this long (beyond its longest call) and it is dead
    last_sent: float = 0.0
    retiring: bool = False
    said_goodbye: bool = False   # its last message has been read
    inflight: dict[int, Request] = field(default_factory=dict)
    backlog: deque[Request] = field(default_factory=deque)  # keyed requests waiting for this worker
    # keyed: service name -> the keys whose instance lives here, least recently used first
    keys: dict[bytes, dict[bytes, None]] = field(default_factory=dict)
    last_assigned: float = 0.0
    parked: bool = False   # a standby worker: serves nothing until unparked
    handled: int = 0
    faults: int = 0
    confinement: dict = field(default_factory=dict)   # its READY's word: seccomp, landlock, uid
    host: str = ""         # "" on this host; issue 18's remote workers name theirs
    cordon: str = "default"   # its READY's word; it serves only its cordon's apps (docs/confinement.md)
    reaped: bool = False   # its process is known to be gone: it can commit nothing more

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)

    @property
    def key_count(self) -> int:
        return sum(len(held) for held in self.keys.values())


class Event(Enum):
    READY = "ready"          # (link,)
    RETIRING = "retiring"    # (link, reason)
    SILENT = "silent"        # (link, cause): missed heartbeats, a protocol violation: the daemon kills it


class Fence(Protocol):
    """Whether what a gone worker held may move on (BrokerCore.worker_gone). "Not yet" keeps
    it where it is, and the core asks again on each tick and each reap."""

    def requests_free(self, link: WorkerLink) -> bool:
        """May its idempotent requests go to another worker (its process commits nothing more)?"""
        ...

    def keys_free(self, link: WorkerLink) -> bool:
        """May its keys' instances start on another worker?"""
        ...


class LocalFence:
    """Workers on this host: a process is fenced once it is reaped (a dead pid commits
    nothing); its keys move at once, as a retiring worker's do. Issue 18's remote workers
    plug a fence of their own in here (e.g. a lease that must lapse first)."""

    def requests_free(self, link: WorkerLink) -> bool:
        return link.reaped

    def keys_free(self, link: WorkerLink) -> bool:
        return True
