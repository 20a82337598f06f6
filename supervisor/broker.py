"""The broker: client sockets, worker links, dispatch and the in-flight ledger.

Every request accepted from a client gets a ticket and a ledger entry that
says who asked (client, dialect, request id), for what (service, key, body),
until when (deadline), and which worker holds it. A request ends in exactly
one reply: from its worker, or from the broker when the request cannot be
served, expires in the queue, or its worker dies (502, or re-dispatch when
the request is idempotent).

Dispatch is credit-based: a worker announces how many requests it can hold
and the broker sends only to workers with free credit. Which request goes to
which worker is the dispatch policy's (corral.dispatch): services with queued
work take turns, and the clients of one service take turns; among workers with
credit it packs (a worker already at work and keeping up gets the next request
before an idle one is woken). Requests for a key of a keyed app always go to
the worker that holds the key's instance, in arrival order.

The broker does no process management: it reports what it learns (a worker
ready, retiring, silent) as events, and the daemon's arbiter loop acts.
"""

from __future__ import annotations

import errno
import json
import struct
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import zmq

from corral.wire import protocol
from corral.circuit import Circuit, Health
from corral.config import AppSettings, Config
from corral.deadlines import Deadlines
from corral.dispatch import PACK, PACK_AGE_S, ClientQueue, Dispatcher, Rotation  # noqa: F401 (PACK*: tests)
from corral.metrics import Histogram
from corral.paths import ipc_in_use, remove_ipc_file
from corral.wire.frames import NOBLOCK, drain, drain_with_user, send_frames
from corral import security
from corral.wire.protocol import (MAX_KEY, MMI_PREFIX, MMI_SERVICE, NATIVE, STATUS_BY_CODE, STATUS_FRAMES,
                                 W_ALARMS, W_DISCONNECT, W_HEARTBEAT, W_READY, W_REPLY, W_REQUEST, W_RETIRING,
                                 Dialect, Malformed, Status, evict_message, iter_replies, reply_frames,
                                 request_record)

# Drain at most this many messages from one socket per loop turn, so that
# neither side can starve the other (or the timers).
BATCH = 256
DEFAULT_DEADLINE_S = 30.0
TYPICAL_WEIGHT = 0.05   # of the newest request, in the moving average of a service's round trips
# A reply held for a slow client costs this much beyond its frames' bytes (the
# list and bytes objects holding it): the budget bounds memory, not payload.
REPLY_OVERHEAD = 200
# Messages a worker has not read, at most (requests are bounded by its credit;
# the rest are heartbeats and evictions): past it, the worker is unreachable.
WORKER_HWM = 1000
TOP_CLIENTS = 10        # clients shown in status and metrics, the busiest first
# A worker that exits by itself says goodbye last; reaped before its goodbye is read, its
# last messages are still on the way: wait this long for them before answering what it held.
GOODBYE_WAIT_S = 0.5
KEY_ACCOUNT = b"\x00key:"   # Broker.client_key: the account of a CURVE key name
SWEEP_EVERY_S = 5.0     # idle client accounts are forgotten this often


class State(Enum):
    QUEUED = 1
    SENT = 2
    DONE = 3


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
        self.owner = None   # a request the broker originates (an alarm run): its outcome goes here


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
    """One client's share of the broker: requests open, and replies ZeroMQ would not take yet.

    A client is a connection (routing identity) or, once CURVE names
    clients, a key name (Broker.client_key). Its replies go straight to the
    frontend while its pipe is under the high-water mark (SNDHWM, set to
    max_inflight_per_client: a client that reads never has more replies
    outstanding than requests in flight). At the mark ZeroMQ answers EAGAIN
    (ROUTER_MANDATORY) and the replies wait here, in order, their bytes
    counted; past max_client_backlog_mib they are dropped and the client is
    `over`: refused with 429 until its outbox has drained, that is until it
    has read."""

    __slots__ = ("name", "inflight", "outbox", "unsent", "dropped", "refused", "over")

    def __init__(self, name: bytes):
        self.name = name
        self.inflight = 0              # accepted and not yet answered, queued or running
        self.outbox: deque[tuple[list[bytes], int]] = deque()  # (frames, cost) ZeroMQ would not take
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
        return name.decode() if name.isascii() and name.isprintable() and name[:1] != b"\x00" else name.hex()


@dataclass(eq=False)
class WorkerLink:
    """The broker's view of one worker: credit, what it holds, when it was last heard."""
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

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)

    @property
    def key_count(self) -> int:
        return sum(len(held) for held in self.keys.values())


def _is_queued(request: Request) -> bool:
    return request.state is State.QUEUED


class Event(Enum):
    READY = "ready"          # (link,)
    RETIRING = "retiring"    # (link, reason)
    SILENT = "silent"        # (link, cause): missed heartbeats, the daemon should kill it


# What a worker's malformed message raises while it is read: it is refused, never the broker's end.
WORKER_MESSAGE_FAULTS = (struct.error, ValueError, KeyError, IndexError, TypeError, AttributeError,
                         RecursionError, UnicodeDecodeError, OverflowError)


class Broker:
    def __init__(self, context: zmq.Context, config: Config, backend: str, log):
        self.log = log
        self.frontend = context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.LINGER, 1000)  # so the last replies of a drain leave
        self.use_settings(config)
        self.frontend_bound: dict[str, str] = {}   # endpoint as configured -> as bound (wildcards resolved)
        self.authenticator: security.KeyAuthenticator | None = None
        if config.security.curve:
            self.start_curve(context, config.security)
        self.bind_frontend(config.supervisor.frontend)
        self.backend = context.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.SNDHWM, WORKER_HWM)
        self.backend.setsockopt(zmq.RCVHWM, 0)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.bind(backend)
        self.services: dict[bytes, Service] = {}
        self.links: dict[bytes, WorkerLink] = {}
        self.ledger: dict[int, Request] = {}
        self.deadlines = Deadlines()            # when queued requests expire
        self.next_ticket = 1
        self.waiting = Rotation()              # services with a non-empty queue, in turn
        self.dispatcher = Dispatcher(self.waiting)
        self.backlogged = self.dispatcher.backlogged  # links holding keyed requests not yet sent
        self.outbox: dict[WorkerLink, list[bytes]] = {}
        self.events: list[tuple] = []
        self.draining = False
        self.rejected: Counter = Counter()     # refused before reaching a queue, by status
        self.dropped_replies = 0
        # Idempotent requests of a worker declared gone but not yet reaped: re-dispatched only
        # once it is, so that the old process can no longer commit them (DESIGN 3b).
        self.unreaped: dict[bytes, list[Request]] = {}
        self.departing: dict[bytes, tuple[str, float]] = {}   # reaped, goodbye unread: cause, until
        self.accounts: dict[bytes, ClientAccount] = {}   # clients with something open or held
        self.unsent: set[ClientAccount] = set()          # accounts with replies in their outbox
        self.next_sweep = 0.0
        self.key_of: dict[bytes, bytes] = {}          # routing identity -> CURVE key name
        self.alarms = None   # the daemon's AlarmRunner (docs/alarms.md): told of W_ALARMS
        self.configure(config)

    # --- configuration -------------------------------------------------------

    def use_settings(self, config: Config) -> None:
        sup = config.supervisor
        self.heartbeat_s = sup.heartbeat_ms / 1000
        self.liveness = sup.liveness
        self.max_queue = sup.max_queue
        self.max_body = sup.max_message_kib * 1024
        self.max_inflight_per_client = sup.max_inflight_per_client
        self.max_client_backlog = sup.max_client_backlog_mib * 1024 * 1024
        # Per peer, for connections made from now on (README, "Fairness and memory"): a client
        # that reads never has more replies in its pipe than requests in flight.
        self.frontend.setsockopt(zmq.SNDHWM, sup.max_inflight_per_client)
        self.frontend.setsockopt(zmq.RCVHWM, sup.max_inflight_per_client)
        # A frame far over the limit disconnects its sender in libzmq; up to
        # twice the limit is read, so that it can be answered 413. (Connections
        # made before a reload keep the limit they were made with.)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_body + 65536)

    def configure(self, config: Config) -> None:
        """Take a (re)loaded config: its settings, and its apps (new services appear, removed ones go)."""
        self.use_settings(config)
        if self.authenticator is not None:
            self.authenticator.use(self.load_keys(config.security))  # a key removed is refused from now on
        services: dict[bytes, Service] = {}
        for name, app in config.apps.items():
            key = name.encode()
            old = self.services.get(key)
            if old is not None:
                old.app = app
                old.health.use_restart(config.restart)
                services[key] = old
            else:
                services[key] = Service(key, app, Health(name, config.restart, self.log))
        for key, old in self.services.items():
            if key not in services:
                for request in old.queue:
                    if request.state is State.QUEUED:
                        self.finish(request, Status.NOT_FOUND, b"service removed by reload")
        self.services = services
        self.keyed = {name for name, service in services.items() if service.keyed}
        self.waiting.keep(lambda s: s.name in services)
        for service in services.values():
            service.links = []
        for link in self.links.values():
            link.services = [services[s.name] for s in link.services if s.name in services]
            if not link.parked:
                for service in link.services:
                    service.links.append(link)

    def start_curve(self, context: zmq.Context, settings) -> None:
        """CURVE on every tcp frontend from now on, its clients judged by ZAP (KeyAuthenticator)."""
        _, secret = security.server_keys(settings.curve_secret_key)
        self.frontend.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self.authenticator = security.KeyAuthenticator(context, self.load_keys(settings))
        self.authenticator.start()

    def load_keys(self, settings) -> security.KeyNames:
        keys = security.KeyNames(settings.client_keys)
        for problem in keys.problems:
            self.log.warning("security.key_ignored", directory=str(settings.client_keys), problem=problem)
        self.key_names = set(keys.names.values())
        return keys

    def bind_frontend(self, endpoints: Sequence[str]) -> None:
        """Listen on `endpoints` as well: on all of them, or (zmq.ZMQError) on none."""
        bound = []
        try:
            for endpoint in endpoints:
                if ipc_in_use(endpoint):
                    raise zmq.ZMQError(zmq.EADDRINUSE, f"frontend endpoint {endpoint} is in use")
                if self.authenticator is not None:
                    # Each listener keeps the security options it was bound with.
                    self.frontend.setsockopt(zmq.CURVE_SERVER, int(endpoint.startswith("tcp://")))
                try:
                    self.frontend.bind(endpoint)
                except zmq.ZMQError as exc:
                    raise zmq.ZMQError(exc.errno, f"frontend endpoint {endpoint}: {exc.strerror}") from None
                self.frontend_bound[endpoint] = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
                bound.append(endpoint)
        except zmq.ZMQError:
            self.unbind_frontend(bound)
            raise

    def unbind_frontend(self, endpoints: Sequence[str]) -> None:
        for endpoint in endpoints:
            self.frontend.unbind(self.frontend_bound.pop(endpoint))
            remove_ipc_file(endpoint)

    def rebind_frontend(self, endpoints: Sequence[str]) -> None:
        """A reload's frontend: listen on the new endpoints first, then stop listening on
        those gone (their clients are cut off). If a new one cannot be bound, nothing
        changes and zmq.ZMQError says why."""
        self.bind_frontend([e for e in endpoints if e not in self.frontend_bound])
        self.unbind_frontend([e for e in self.frontend_bound if e not in endpoints])

    # --- frontend ------------------------------------------------------------

    def on_frontend(self) -> int:
        """Take the client requests waiting; returns how many messages came."""
        if self.authenticator is not None:
            return self.on_frontend_authenticated()
        now = time.monotonic()
        messages = drain(self.frontend, BATCH)
        for frames in messages:
            if len(frames) < 2:
                continue  # nothing after the routing id: nothing to answer
            # The common case first: a native request without meta, for a
            # healthy service that is not keyed, queued at once.
            if len(frames) == 6 and frames[1] == NATIVE and not frames[4]:
                service = self.services.get(frames[3])
                if (service is not None and service.open and not self.draining
                        and len(frames[5]) <= self.max_body and len(service.queue) < self.max_queue):
                    self.enqueue(frames[0], Dialect.NATIVE, frames[2], service, None, frames[5],
                                 now + DEFAULT_DEADLINE_S, service.app.idempotent, now, False)
                    continue
            self.intake(frames[0], frames[1:], now)
        return len(messages)

    def on_frontend_authenticated(self) -> int:
        """on_frontend with CURVE on: every request with its key's name (None from ipc)."""
        now = time.monotonic()
        messages = drain_with_user(self.frontend, BATCH)
        for frames, user in messages:
            if len(frames) >= 2:
                self.intake(frames[0], frames[1:], now, user)
        return len(messages)

    def intake(self, client: bytes, frames: list[bytes], now: float, user: str | None = None) -> None:
        """Any request: parse it, admit it or answer it. `user`: the client's CURVE key name."""
        try:
            parsed = protocol.parse_client(frames, self.keyed)
        except Malformed as bad:
            self.rejected[bad.status] += 1
            self.log.info("request.rejected", status=int(bad.status), detail=bad.detail,
                          dialect=bad.dialect.value if bad.dialect else None)
            self.send_client(reply_frames(bad.dialect or Dialect.NATIVE, client, bad.request_id,
                                          STATUS_FRAMES[bad.status], bad.detail.encode()))
            return
        if user is not None:
            self.key_of[client] = user.encode()
        if user is not None and (refusal := self.forbidden(parsed, user)):
            self.rejected[Status.FORBIDDEN] += 1
            self.log.warning("request.forbidden", key=user, service=parsed.service[:128].decode(errors="replace"),
                             request_id=parsed.request_id[:64].decode(errors="replace"), detail=refusal)
            self.send_client(reply_frames(parsed.dialect, client, parsed.request_id,
                                          STATUS_FRAMES[Status.FORBIDDEN], refusal.encode()))
            return
        reject, probe = self.admit(parsed, now)
        if reject is not None:
            status, detail = reject
            if status is not Status.OK:  # mmi.service answers are not refusals
                self.rejected[status] += 1
                self.log.info("request.rejected", status=int(status),
                              service=parsed.service[:128].decode(errors="replace"),
                              request_id=parsed.request_id[:64].decode(errors="replace"),
                              detail=detail.decode(errors="replace"))
            self.send_client(reply_frames(parsed.dialect, client, parsed.request_id,
                                          STATUS_FRAMES[status], detail))
            return
        service = self.services[parsed.service]
        deadline = now + (parsed.deadline_ms / 1000 if parsed.deadline_ms else DEFAULT_DEADLINE_S)
        idempotent = service.app.idempotent if parsed.idempotent is None else parsed.idempotent
        key = parsed.key if service.keyed else None  # other modes have one instance per worker
        self.enqueue(client, parsed.dialect, parsed.request_id, service, key, parsed.body, deadline,
                     idempotent, now, probe)

    def enqueue(self, client: bytes, dialect: Dialect, request_id: bytes, service: Service,
                key: bytes | None, body: bytes, deadline: float, idempotent: bool, now: float,
                probe: bool, owner=None) -> Request | None:
        """Open the request's ledger entry and queue it for a worker (or refuse it: 429).
        With an `owner` (an alarm run, docs/alarms.md) there is no client: nothing counts
        against a client's limits, and owner.settle hears the outcome."""
        account = None
        if owner is None:
            name = self.client_key(client)
            account = self.accounts.get(name)
            if account is None:
                account = self.accounts[name] = ClientAccount(name)
            if account.over or account.inflight >= self.max_inflight_per_client:
                self.refuse(account, client, dialect, request_id)
                return None
            account.inflight += 1
        ticket = self.next_ticket
        self.next_ticket = ticket + 1
        request = Request(ticket, client, dialect, request_id, service, key, body, deadline,
                          idempotent, now, probe)
        request.account = account
        request.owner = owner
        self.ledger[ticket] = request
        self.deadlines.push(deadline, ticket)
        service.queue.append(request)
        self.waiting.add(service)
        return request

    def admit(self, request: protocol.ClientRequest,
              now: float) -> tuple[tuple[Status, bytes] | None, bool]:
        """The broker's own answer to a request it will not queue (or None), and
        whether the request is its circuit's probe."""
        if len(request.body) > self.max_body:
            return (Status.TOO_LARGE, b"body of %d bytes is over max_message_kib" % len(request.body)), False
        if request.service.startswith(MMI_PREFIX):
            return self.mmi(request), False
        service = self.services.get(request.service)
        if service is None:
            return (Status.NOT_FOUND, b"no such service: " + request.service[:128]), False
        if self.draining:
            return (Status.UNAVAILABLE, b"the daemon is draining: no new requests"), False
        if service.keyed and not request.key:
            return (Status.BAD_REQUEST, b"keyed service: the request needs a key"), False
        if service.keyed and len(request.key) > MAX_KEY:
            return (Status.BAD_REQUEST, b"key longer than 65535 bytes"), False
        if service.health.quarantined(request.body, now):
            return (Status.ABORT, b"quarantined: this request aborted instances repeatedly"), False
        if len(service.queue) >= self.max_queue:
            return (Status.UNAVAILABLE, b"queue full (max_queue)"), False
        probe, refusal = service.health.admit(now)
        if refusal:
            return (Status.UNAVAILABLE, refusal.encode()), False
        return None, probe

    def forbidden(self, request: protocol.ClientRequest, user: str) -> str | None:
        """Why the client with key `user` may not make this request (its service's `allow`), or None."""
        if user not in self.key_names:
            return f"key {user!r} is no longer allowed (removed from client_keys)"
        service = self.services.get(request.service)
        return security.forbidden(service.app.allow, user) if service is not None else None

    def mmi(self, request: protocol.ClientRequest) -> tuple[Status, bytes]:
        if request.service != MMI_SERVICE:
            return Status.NOT_FOUND, b"no such service: " + request.service[:128]
        status = Status.OK if request.body in self.services else Status.NOT_FOUND
        return status, STATUS_FRAMES[status]

    def client_key(self, identity: bytes) -> bytes:
        """Whose limits a connection counts against: its routing identity, or with CURVE
        its key's name, so that every connection of one key counts as one client.

        Key names are prefixed with a zero byte, which no client-set routing id may
        start with (libzmq reserves it) and no generated one (5 bytes) can equal."""
        name = self.key_of.get(identity)
        return identity if name is None else KEY_ACCOUNT + name

    def refuse(self, account: ClientAccount, client: bytes, dialect: Dialect, request_id: bytes) -> None:
        account.refused += 1
        self.rejected[Status.TOO_MANY_REQUESTS] += 1
        if account.over:
            detail = b"unread replies over max_client_backlog_mib: read them first"
        else:
            detail = b"%d requests open: over max_inflight_per_client" % account.inflight
        self.send_client(reply_frames(dialect, client, request_id,
                                      STATUS_FRAMES[Status.TOO_MANY_REQUESTS], detail), account)

    def send_client(self, frames: list[bytes], account: ClientAccount | None = None,
                    service: Service | None = None) -> None:
        """Send a reply now, or hold it in its client's outbox while ZeroMQ will not take it."""
        if account is None:
            account = self.accounts.get(self.client_key(frames[0]))
        if account is not None and account.outbox:
            self.hold(account, frames, service)  # behind the replies already waiting, in order
            return
        try:
            send_frames(self.frontend, frames, NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EAGAIN:  # the client's pipe is full: it is not reading
                if account is None:
                    name = self.client_key(frames[0])
                    account = self.accounts[name] = ClientAccount(name)
                self.hold(account, frames, service)
                return
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self.drop(account, service)  # the client is gone

    def hold(self, account: ClientAccount, frames: list[bytes], service: Service | None) -> None:
        cost = REPLY_OVERHEAD + sum(map(len, frames))
        if account.unsent + cost > self.max_client_backlog:
            self.drop(account, service)
            if not account.over:
                account.over = True
                self.log.warning("client.over_backlog", client=account.label, held_bytes=account.unsent,
                                 in_flight=account.inflight)
                # (with nothing else held, one reply alone was over the budget: the next
                # flush finds the outbox empty and lets the client in again)
                self.unsent.add(account)
            return
        account.outbox.append((frames, cost))
        account.unsent += cost
        self.unsent.add(account)

    def drop(self, account: ClientAccount | None, service: Service | None) -> None:
        self.dropped_replies += 1
        if account is not None:
            account.dropped += 1
        if service is not None:
            service.dropped += 1

    def flush_clients(self) -> None:
        """Send what the slow clients' outboxes hold, as far as ZeroMQ takes it."""
        for account in list(self.unsent):
            outbox = account.outbox
            while outbox:
                frames, cost = outbox[0]
                try:
                    send_frames(self.frontend, frames, NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EAGAIN:
                        break
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    self.drop(account, None)  # gone while its replies waited
                outbox.popleft()
                account.unsent -= cost
            if not outbox:
                self.unsent.discard(account)
                if account.over:
                    account.over = False
                    self.log.info("client.reading", client=account.label, dropped=account.dropped)

    def finish(self, request: Request, status: Status, body: bytes, now: float | None = None) -> None:
        """Send a request's one reply and close its ledger entry."""
        request.state = State.DONE
        self.ledger.pop(request.ticket, None)
        service = request.service
        service.latency.observe((now or time.monotonic()) - request.received)
        service.statuses[status] += 1
        if request.owner is not None:
            request.owner.settle(request, status, body, now or time.monotonic())
            return
        account = request.account
        if account is not None:
            account.inflight -= 1
        self.send_client(reply_frames(request.dialect, request.client, request.request_id,
                                      STATUS_FRAMES[status], body), account, service)

    # --- dispatch ------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued requests to workers with free credit (where: the dispatch policy), then
        send the batches."""
        if self.unsent:
            self.flush_clients()
        if not self.waiting and not self.backlogged:
            return
        now = time.monotonic()
        for request, link in self.dispatcher.plan(now, _is_queued):
            self.assign(link, request, now)
        if self.dispatcher.evictions:
            evictions, self.dispatcher.evictions = self.dispatcher.evictions, []
            for link, service, key in evictions:
                # Sent before any later request for the key, on the same ordered pipe.
                self.send_worker(link, evict_message(service.name, key))
        if self.outbox:
            self.send_outbox()

    def assign(self, link: WorkerLink, request: Request, now: float) -> None:
        left_ms = int((request.deadline - now) * 1000)
        if left_ms <= 0:
            if not request.redelivered:
                self.expire(request)
                return
            # Its first attempt may have committed: only a worker can tell, from its token
            # (it answers the recorded reply, or 504 without running the guest).
            left_ms = 1
        budget_ms = min(left_ms, request.service.app.timeout_ms)
        request.state = State.SENT
        request.budget_s = budget_ms / 1000
        request.sent = now
        link.inflight[request.ticket] = request
        link.last_assigned = now
        batch = self.outbox.get(link)
        if batch is None:
            batch = self.outbox[link] = [W_REQUEST]
        batch += request_record(request.ticket, left_ms, request.service.name, request.key, request.body,
                                request.ticket if request.idempotent else 0,
                                (protocol.REDELIVERED if request.redelivered else 0) |
                                (request.owner.flags if request.owner is not None else 0))

    def send_outbox(self) -> None:
        outbox, self.outbox = self.outbox, {}
        for link, pieces in outbox.items():
            payload = b"".join(pieces)
            if self.send_worker(link, payload):
                continue
            # Never delivered: these requests never started, so they go back
            # to the queue whatever their idempotency; the worker is gone.
            undelivered = [ticket for ticket, *_ in protocol.iter_requests(payload)]
            for ticket in reversed(undelivered):
                request = link.inflight.pop(ticket, None)
                if request is not None:
                    self.requeue(request)
            self.worker_gone(link.identity, "unreachable")
            self.events.append((Event.SILENT, link, "unreachable"))

    def requeue(self, request: Request) -> None:
        """Put a request that never started back at the head of its queue."""
        request.state = State.QUEUED
        if not request.redelivered:
            self.deadlines.push(request.deadline, request.ticket)  # its entry may be gone already
        request.service.queue.appendleft(request)
        self.waiting.add(request.service)

    def expire(self, request: Request) -> None:
        if request.probe:
            request.service.health.probe_lost()
        self.finish(request, Status.DEADLINE, b"deadline exceeded while queued")

    # --- backend -------------------------------------------------------------

    def on_backend(self) -> int:
        """Take the workers' messages waiting; returns how many came."""
        now = time.monotonic()
        messages = drain(self.backend, BATCH)
        for message in messages:
            identity, payload = message[0], message[-1]  # corral's workers send one frame
            command = payload[:1]
            link = self.links.get(identity)
            if link is not None:
                link.last_seen = now
            try:
                if command == W_REPLY and link is not None:
                    self.on_replies(link, payload, now)
                elif command == W_READY:
                    self.on_ready(identity, payload, now)
                elif command == W_RETIRING and link is not None:
                    self.on_retiring(link, payload)
                elif command == W_DISCONNECT and link is not None:
                    self.on_goodbye(link)
                elif command == W_ALARMS and link is not None and self.alarms is not None:
                    self.alarms.on_report(link, payload)
                elif command != W_HEARTBEAT:
                    self.log.warning("worker.unexpected_message", worker=identity.decode(errors="replace"),
                                     command=command.hex())
            except WORKER_MESSAGE_FAULTS as exc:
                self.reject_worker(identity, command, exc)
        return len(messages)

    def reject_worker(self, identity: bytes, command: bytes, exc: Exception) -> None:
        """A worker sent bytes that do not parse: it hosts guest code, so it may be subverted;
        it is killed like a silent one and what it held answered 502, never trusted again."""
        self.log.error("worker.protocol_violation", worker=identity.decode(errors="replace"), command=command.hex(),
                       error=f"{type(exc).__name__}: {str(exc)[:200]}")
        link = self.links.get(identity)
        if link is not None:
            self.events.append((Event.SILENT, link, "protocol violation"))
            self.worker_gone(identity, "protocol violation")

    def on_ready(self, identity: bytes, payload: bytes, now: float) -> None:
        try:
            info = json.loads(payload[1:])
            heartbeat_s = int(info.get("heartbeat_ms") or 0) / 1000 or self.heartbeat_s
            link = WorkerLink(identity, int(info["pid"]), int(info["capacity"]),
                              [self.services[n.encode()] for n in info["services"]
                               if n.encode() in self.services], now, self.liveness * heartbeat_s,
                              parked=bool(info.get("standby")))
        except (IndexError, ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
            self.log.error("worker.bad_ready", worker=identity.decode(errors="replace"), error=str(exc))
            return
        self.links[identity] = link
        if not link.parked:
            self.unpark(link)
        self.events.append((Event.READY, link))

    def unpark(self, link: WorkerLink) -> None:
        """Let a worker take requests (a standby worker when it is promoted)."""
        link.parked = False
        for service in link.services:
            if link not in service.links:
                service.links.append(link)

    def on_replies(self, link: WorkerLink, payload: bytes, now: float) -> None:
        ledger = self.ledger
        for ticket, status, fault, body in iter_replies(payload):
            request = link.inflight.pop(ticket, None)
            if request is None or ledger.get(ticket) is not request:
                continue  # already answered (its worker was declared dead)
            link.handled += 1
            status = STATUS_BY_CODE[status]
            service = request.service
            service.typical_s += (now - request.sent - service.typical_s) * TYPICAL_WEIGHT
            if fault:
                link.faults += 1
                self.log.warning("request.failed", request_id=request.request_id[:64].decode(errors="replace"),
                                 ticket=ticket, service=service.name.decode(), status=int(status),
                                 fault=fault.decode(), worker=link.identity.decode(), pid=link.pid,
                                 instance="discarded" if status in protocol.FAULTS else "kept",
                                 detail=body[:200].decode(errors="replace"))
                if status in protocol.FAULTS:
                    service.health.record_abort(request.body, now, request.probe)
                elif request.probe:
                    service.health.record_verdict(now)
            elif status is not Status.OK:
                if request.probe:
                    service.health.record_verdict(now)
                self.log.info("request.failed", request_id=request.request_id[:64].decode(errors="replace"),
                              service=service.name.decode(), status=int(status), worker=link.identity.decode(),
                              detail=body[:200].decode(errors="replace"))
            elif request.probe:
                service.health.record_verdict(now)
            self.finish(request, status, body, now)

    def on_retiring(self, link: WorkerLink, payload: bytes) -> None:
        try:
            reason, tickets = protocol.parse_retiring(payload)
        except (IndexError, struct.error):
            reason, tickets = "?", []
        for ticket in reversed(tickets):  # handed back, never started: re-dispatch
            request = link.inflight.pop(ticket, None)
            if request is not None and self.ledger.get(ticket) is request:
                self.requeue(request)
        if not link.retiring:
            self.retire(link)
            self.events.append((Event.RETIRING, link, reason))

    def on_goodbye(self, link: WorkerLink) -> None:
        """The worker's last message: everything it sent has been read."""
        link.said_goodbye = True
        departing = self.departing.pop(link.identity, None)
        if departing is not None:
            self.worker_gone(link.identity, departing[0], reaped=True)

    def retire(self, link: WorkerLink) -> None:
        """Send the worker nothing more; ask it to finish what it holds and leave."""
        link.retiring = True
        self.release(link)
        self.outbox.pop(link, None)
        self.send_worker(link, W_DISCONNECT)

    def release(self, link: WorkerLink) -> None:
        """Let go of a worker's keys and its backlog (they find other workers)."""
        for service_name, held in link.keys.items():
            service = self.services.get(service_name)
            if service is None:
                continue
            for key in held:
                if service.affinity.get(key) is link:
                    del service.affinity[key]
        link.keys.clear()
        while link.backlog:
            request = link.backlog.pop()
            if request.state is State.QUEUED:
                self.requeue(request)
        self.backlogged.discard(link)

    def send_worker(self, link: WorkerLink, payload: bytes) -> bool:
        try:
            send_frames(self.backend, [link.identity, payload], NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            return False
        link.last_sent = time.monotonic()
        return True

    def worker_gone(self, identity: bytes, cause: str, reaped: bool = False, clean: bool = False) -> None:
        """A worker died or was killed: answer everything it held now, and re-dispatch its
        idempotent requests once it is `reaped` (this call again, from the arbiter's reap).

        A worker reaped after a `clean` exit said goodbye as its last message; until that
        is read, replies and hand-backs it sent before may still be on the way, and what
        it held is left alone (GOODBYE_WAIT_S at most)."""
        link = self.links.get(identity)
        if reaped and clean and link is not None and not link.said_goodbye:
            self.departing[identity] = (cause, time.monotonic() + GOODBYE_WAIT_S)
            return
        self.departing.pop(identity, None)
        if reaped:
            for request in self.unreaped.pop(identity, ()):
                if self.ledger.get(request.ticket) is request:
                    self.requeue(request)
        link = self.links.pop(identity, None)
        if link is None:
            return
        for service in link.services:
            if link in service.links:
                service.links.remove(link)
        self.release(link)
        self.outbox.pop(link, None)
        if self.alarms is not None:
            self.alarms.suspect(identity, link.inflight.values())
        detail = f"worker {identity.decode()} (pid {link.pid}) {cause}".encode()
        for request in sorted(link.inflight.values(), key=lambda r: r.ticket, reverse=True):
            if self.ledger.get(request.ticket) is not request:
                continue
            if request.idempotent:
                request.redelivered = True
                if reaped:
                    self.requeue(request)
                else:
                    self.unreaped.setdefault(identity, []).append(request)
            else:
                if request.probe:
                    request.service.health.probe_lost()
                self.log.warning("request.failed", request_id=request.request_id[:64].decode(errors="replace"),
                                 service=request.service.name.decode(), status=502, fault="crash",
                                 worker=identity.decode(), pid=link.pid, detail=detail.decode())
                self.finish(request, Status.ABORT, detail)
        link.inflight.clear()

    # --- timers --------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Heartbeats to workers, silent workers, requests expired in the queue."""
        for identity, (cause, until) in list(self.departing.items()):
            if now >= until:
                self.worker_gone(identity, cause, reaped=True)
        for link in list(self.links.values()):
            if link.identity in self.departing:
                continue   # exited; its goodbye is awaited above
            if now - link.last_sent >= self.heartbeat_s:
                self.send_worker(link, W_HEARTBEAT)
            allowed = link.last_seen + link.liveness_s
            if link.inflight:
                # A worker inside a guest call cannot answer; it runs one request at
                # a time and sends each reply when the call ends, so it may be
                # silent for as long as the longest guest call it holds may run.
                allowed += max(r.budget_s for r in link.inflight.values())
            if now > allowed:
                self.events.append((Event.SILENT, link, "heartbeat lost"))
                self.worker_gone(link.identity, "heartbeat lost")
        self.expire_due(now)
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_EVERY_S
            self.forget_idle_clients()

    def expire_due(self, now: float) -> None:
        """Answer 504 to the queued requests whose deadline has passed (a redelivered one
        goes to a worker all the same: only its token can tell whether it committed)."""
        ledger = self.ledger
        for ticket in self.deadlines.due(now):
            request = ledger.get(ticket)
            if request is not None and request.state is State.QUEUED and not request.redelivered:
                self.expire(request)
        self.deadlines.compact(len(ledger), lambda: [(r.deadline, r.ticket) for r in ledger.values()
                                                     if r.state is State.QUEUED and not r.redelivered])

    def forget_idle_clients(self) -> None:
        """Let go of the accounts of clients with nothing open or held (connections come
        and go; their counts live on in the totals)."""
        for name, account in list(self.accounts.items()):
            if not account.inflight and not account.outbox and not account.over:
                del self.accounts[name]
        self.key_of = {identity: name for identity, name in self.key_of.items()
                          if KEY_ACCOUNT + name in self.accounts}

    def clients(self, top: int = TOP_CLIENTS) -> list[dict]:
        """The busiest clients (most open, then most held, dropped, refused): what each has
        queued, running, held unread and dropped."""
        queued: Counter = Counter()
        for request in list(self.ledger.values()):
            if request.state is State.QUEUED and request.account is not None:
                queued[request.account] += 1
        accounts = sorted(list(self.accounts.values()),
                          key=lambda a: (a.inflight, a.unsent, a.dropped, a.refused), reverse=True)
        return [{"client": a.label, "queued": queued[a], "running": a.inflight - queued[a],
                 "unread_bytes": a.unsent, "dropped": a.dropped, "refused": a.refused, "over_budget": a.over}
                for a in accounts[:top]]

    def drain(self) -> None:
        self.draining = True

    def abandon(self, detail: bytes) -> None:
        """At the end of a drain: every request still open gets 503."""
        for request in list(self.ledger.values()):
            self.finish(request, Status.UNAVAILABLE, detail)

    def totals(self) -> Counter:
        """Every reply sent, by status: the services' and the broker's own refusals."""
        totals = Counter(self.rejected)
        for service in self.services.values():
            totals.update(service.statuses)
        return totals

    def close(self) -> None:
        self.frontend.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.backend.close(linger=0)
        for endpoint in self.frontend_bound:
            remove_ipc_file(endpoint)
