"""The broker's core: the ledger, admission, client accounts, dispatch and the worker protocol.

No sockets and no clock: the shell (corral.broker) reads frames and hands
them in with the time (`now`), and the core says what to send through its
Transport (to_client, to_worker), which answers whether the bytes left.
So everything here runs, and is tested, without ZeroMQ
(tests/test_broker_core.py).

Every request accepted from a client gets a ticket and a ledger entry that
says who asked (client, dialect, request id), for what (service, key, body),
until when (deadline), and which worker holds it. A request ends in exactly
one reply: from its worker, or from the broker when the request cannot be
served, expires in the queue, or its worker dies (502, or re-dispatch when
the request is idempotent).

Dispatch is credit-based: a worker announces how many requests it can hold
and the broker sends only to workers with free credit. Which request goes to
which worker is the dispatch policy's (corral.dispatch).

The worker protocol (docs/worker-protocol.md), as the core sees it:

    READY       a new identity the daemon expects: a link, parked if standby; Event.READY
    REPLY       per record: the request's one reply; the ticket leaves the link
    RETIRING    the tickets handed back are queued again; Event.RETIRING
    ALARMS      what its last commit left of its services' alarms (docs/alarms.md)
    DISCONNECT  goodbye, its last message: a reaped worker's held work is answered now
    HEARTBEAT   (and every message) the worker is alive

    protocol violation -> logged once, Event.SILENT, worker_gone, never linked again:
      bytes that do not parse; a command workers do not send; anything but READY
      before READY; a second READY; a READY the daemon does not expect; a reply or
      hand-back for a ticket the worker does not hold (another's, answered, unknown);
      ALARMS for a service it does not serve. A whole message is checked before any
      of it is used, so nothing of it reaches a client.
    a gone worker's late messages: ignored (what it held is answered for already)

    silent past its liveness (plus its longest call)   -> Event.SILENT, worker_gone
    worker_gone: what it held is answered 502, its idempotent requests wait for the
    fence (LocalFence: the reap) and go to another worker with REDELIVERED

The core does no process management: it reports what it learns (a worker
ready, retiring, silent) as events, and the daemon's arbiter loop acts.
Two entry points wait for what comes next: host_lost() and a link's `host`
and the Fence for remote workers (issue 18), and enqueue(owner=...) for
requests the broker originates itself (issue 19).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from typing import Callable, Protocol

from corral.circuit import Health
from corral.config import Config
from corral.deadlines import Deadlines
from corral.dispatch import Dispatcher, Rotation
from corral.broker_ledger import (KEY_ACCOUNT, ClientAccount, Event, Fence, LocalFence, Owner, Request, Service,
                                  State, WorkerLink, is_queued)
from corral.wire import protocol
from corral.wire.protocol import (MAX_KEY, MMI_PREFIX, MMI_SERVICE, NATIVE, STATUS_BY_CODE, STATUS_FRAMES,
                                  W_ALARMS, W_DISCONNECT, W_HEARTBEAT, W_READY, W_REPLY, W_REQUEST, W_RETIRING, Dialect,
                                  Malformed, Status, evict_message, iter_replies, reply_frames, request_record)

DEFAULT_DEADLINE_S = 30.0
TYPICAL_WEIGHT = 0.05   # of the newest request, in the moving average of a service's round trips
# A reply held for a slow client costs this much beyond its frames' bytes (the
# list and bytes objects holding it): the budget bounds memory, not payload.
REPLY_OVERHEAD = 200
TOP_CLIENTS = 10        # clients shown in status and metrics, the busiest first
# A worker that exits by itself says goodbye last; reaped before its goodbye is read, its
# last messages are still on the way: wait this long for them before answering what it held.
GOODBYE_WAIT_S = 0.5
SWEEP_EVERY_S = 5.0     # idle client accounts are forgotten this often
GONE_KEPT = 4096        # identities of gone or refused workers remembered (BrokerCore.forget)
VIOLATION_SHOWN = 64    # bytes of a violating message shown in the log

# What Transport.to_client answers.
SENT = 0
FULL = 1    # the client's pipe is at its high-water mark: it is not reading
GONE = 2    # no such client (it disconnected)

# What a worker's malformed message raises while it is read: it is refused, never the broker's end.
WORKER_MESSAGE_FAULTS = (struct.error, ValueError, KeyError, IndexError, TypeError, AttributeError,
                         RecursionError, UnicodeDecodeError, OverflowError)

Authorize = Callable[[str, "Service | None"], "str | None"]   # (key name, service) -> refusal or None


class ProtocolViolation(ValueError):
    """A worker said something the protocol does not allow at this point."""


class Transport(Protocol):
    def to_client(self, frames: list[bytes]) -> int:
        """Send a reply (routing id first) without waiting: SENT, FULL or GONE."""
        ...

    def to_worker(self, identity: bytes, payload: bytes) -> bool:
        """Send a worker one message without waiting; False when it cannot be reached."""
        ...


class BrokerCore:
    def __init__(self, config: Config, log, transport: Transport, authorize: Authorize | None = None,
                 fence: Fence | None = None):
        self.log = log
        self.to_client = transport.to_client
        self.to_worker = transport.to_worker
        self.authorize = authorize   # the shell's CURVE ACL, asked for requests that carry a key name
        self.fence: Fence = fence or LocalFence()
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
        # Gone workers whose idempotent requests (or keys) wait for the fence: re-dispatched
        # only once the old process can no longer commit them (docs/state.md).
        self.fenced: dict[bytes, tuple[WorkerLink, list[Request]]] = {}
        self.departing: dict[bytes, tuple[str, float]] = {}   # reaped, goodbye unread: cause, until
        self.accounts: dict[bytes, ClientAccount] = {}   # clients with something open or held
        self.unsent: set[ClientAccount] = set()          # accounts with replies in their outbox
        self.next_sweep = 0.0
        self.key_of: dict[bytes, bytes] = {}          # routing identity -> CURVE key name
        self.alarms = None   # the daemon's AlarmRunner (docs/alarms.md): hears W_ALARMS and dead workers
        # Set by the daemon: whether a READY (identity, its JSON) is a worker it started: None, or
        # why not. Unset, any identity may link (the core's tests).
        self.expected: Callable[[bytes, dict], str | None] | None = None
        self.gone: dict[bytes, None] = {}   # identities never linked again (forget)
        self.configure(config, 0.0)

    # --- configuration -------------------------------------------------------

    def configure(self, config: Config, now: float) -> None:
        """Take a (re)loaded config: its settings, and its apps (new services appear, removed ones go)."""
        sup = config.supervisor
        self.heartbeat_s = sup.heartbeat_ms / 1000
        self.liveness = sup.liveness
        self.max_queue = sup.max_queue
        self.max_body = sup.max_message_kib * 1024
        self.max_inflight_per_client = sup.max_inflight_per_client
        self.max_client_backlog = sup.max_client_backlog_mib * 1024 * 1024
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
                        self.finish(request, Status.NOT_FOUND, b"service removed by reload", now)
        self.services = services
        self.keyed = {name for name, service in services.items() if service.keyed}
        self.waiting.keep(lambda s: s.name in services)
        for service in services.values():
            service.links = []
        for link in self.links.values():
            # An app a reload moved to another cordon leaves the old cordon's workers at once.
            link.services = [services[s.name] for s in link.services
                             if s.name in services and services[s.name].app.cordon == link.cordon]
            if not link.parked:
                for service in link.services:
                    service.links.append(link)

    # --- clients: intake and admission -------------------------------------

    def on_client(self, frames: list[bytes], now: float, user: str | None = None) -> None:
        """A client's message (its routing id first): queue it, or answer it. `user`: the
        name of its CURVE key (None: no CURVE, or an ipc frontend)."""
        client = frames[0]
        if len(frames) == 6 and frames[1] == NATIVE and not frames[4]:
            # The common case, without a parse: a native request with no meta.
            dialect, request_id, name, key, body, deadline_ms, idempotent = \
                Dialect.NATIVE, frames[2], frames[3], None, frames[5], None, None
        else:
            try:
                parsed = protocol.parse_client(frames[1:], self.keyed)
            except Malformed as bad:
                self.rejected[bad.status] += 1
                self.log.info("request.rejected", status=int(bad.status), detail=bad.detail,
                              dialect=bad.dialect.value if bad.dialect else None)
                self.send_client(reply_frames(bad.dialect or Dialect.NATIVE, client, bad.request_id,
                                              STATUS_FRAMES[bad.status], bad.detail.encode()))
                return
            dialect, request_id, name, key, body, deadline_ms, idempotent = (
                parsed.dialect, parsed.request_id, parsed.service, parsed.key, parsed.body,
                parsed.deadline_ms, parsed.idempotent)
        if user is not None:
            self.key_of[client] = user.encode()
            refusal = self.authorize(user, self.services.get(name)) if self.authorize else None
            if refusal:
                self.rejected[Status.FORBIDDEN] += 1
                self.log.warning("request.forbidden", key=user, service=name[:128].decode(errors="replace"),
                                 request_id=request_id[:64].decode(errors="replace"), detail=refusal)
                self.send_client(reply_frames(dialect, client, request_id, STATUS_FRAMES[Status.FORBIDDEN],
                                              refusal.encode()))
                return
        service, answer, probe = self.admit(name, key, body, now)
        if answer is not None:
            status, detail = answer
            if status is not Status.OK:  # mmi.service answers are not refusals
                self.rejected[status] += 1
                self.log.info("request.rejected", status=int(status), service=name[:128].decode(errors="replace"),
                              request_id=request_id[:64].decode(errors="replace"),
                              detail=detail.decode(errors="replace"))
            self.send_client(reply_frames(dialect, client, request_id, STATUS_FRAMES[status], detail))
            return
        deadline = now + (deadline_ms / 1000 if deadline_ms else DEFAULT_DEADLINE_S)
        self.enqueue(client, dialect, request_id, service, key if service.keyed else None, body, deadline,
                     service.app.idempotent if idempotent is None else idempotent, now, probe)

    def admit(self, name: bytes, key: bytes | None, body: bytes,
              now: float) -> tuple[Service | None, tuple[Status, bytes] | None, bool]:
        """Whether a client's request may be queued: (its service, the broker's own answer
        if it may not, whether it is its circuit's probe). The one place admission is decided."""
        if len(body) > self.max_body:
            return None, (Status.TOO_LARGE, b"body of %d bytes is over max_message_kib" % len(body)), False
        service = self.services.get(name)
        if service is None:
            if name.startswith(MMI_PREFIX):
                return None, self.mmi(name, body), False
            return None, (Status.NOT_FOUND, b"no such service: " + name[:128]), False
        if self.draining:
            return None, (Status.UNAVAILABLE, b"the daemon is draining: no new requests"), False
        if service.open:   # not keyed, circuit closed, nothing quarantined: only the queue's bound
            if len(service.queue) >= self.max_queue and self.queue_full(service):
                return None, (Status.UNAVAILABLE, b"queue full (max_queue)"), False
            return service, None, False
        if service.keyed and not key:
            return None, (Status.BAD_REQUEST, b"keyed service: the request needs a key"), False
        if service.keyed and len(key) > MAX_KEY:
            return None, (Status.BAD_REQUEST, b"key longer than 65535 bytes"), False
        if service.health.quarantined(body, now):
            return None, (Status.ABORT, b"quarantined: this request aborted instances repeatedly"), False
        if len(service.queue) >= self.max_queue and self.queue_full(service):
            return None, (Status.UNAVAILABLE, b"queue full (max_queue)"), False
        probe, refusal = service.health.admit(now)
        if refusal:
            return None, (Status.UNAVAILABLE, refusal.encode()), False
        return service, None, probe

    def queue_full(self, service: Service) -> bool:
        """At max_queue, the clients' requests alone? Alarm runs never count (docs/alarms.md);
        asked only when the queue is at the bound."""
        owned = self.alarms.queued(service) if self.alarms is not None else 0
        return len(service.queue) - owned >= self.max_queue

    def mmi(self, name: bytes, body: bytes) -> tuple[Status, bytes]:
        if name != MMI_SERVICE:
            return Status.NOT_FOUND, b"no such service: " + name[:128]
        status = Status.OK if body in self.services else Status.NOT_FOUND
        return status, STATUS_FRAMES[status]

    def enqueue(self, client: bytes, dialect: Dialect, request_id: bytes, service: Service,
                key: bytes | None, body: bytes, deadline: float, idempotent: bool, now: float,
                probe: bool, owner: Owner | None = None) -> Request | None:
        """Open the request's ledger entry and queue it for a worker (or refuse it: 429).

        With an `owner` (issue 19: a request the broker originates, e.g. an alarm) there
        is no client: nothing counts against a client's limits, and the outcome goes to
        owner.settle. Such requests are not admitted by admit() (max_queue is the clients')."""
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

    # --- clients: replies and backpressure -----------------------------------

    def finish(self, request: Request, status: Status, body: bytes, now: float) -> None:
        """Send a request's one reply (or settle it with its owner) and close its ledger entry."""
        request.state = State.DONE
        self.ledger.pop(request.ticket, None)
        service = request.service
        service.latency.observe(now - request.received)
        service.statuses[status] += 1
        if request.owner is not None:
            request.owner.settle(request, status, body, now)
            return
        account = request.account
        if account is not None:
            account.inflight -= 1
        self.send_client(reply_frames(request.dialect, request.client, request.request_id,
                                      STATUS_FRAMES[status], body), account, service)

    def send_client(self, frames: list[bytes], account: ClientAccount | None = None,
                    service: Service | None = None) -> None:
        """Send a reply now, or hold it in its client's outbox while the transport will not take it."""
        if account is None:
            account = self.accounts.get(self.client_key(frames[0]))
        if account is not None and account.outbox:
            self.hold(account, frames, service)  # behind the replies already waiting, in order
            return
        sent = self.to_client(frames)
        if sent == SENT:
            return
        if sent == FULL:
            if account is None:
                name = self.client_key(frames[0])
                account = self.accounts[name] = ClientAccount(name)
            self.hold(account, frames, service)
        else:
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
        """Send what the slow clients' outboxes hold, as far as the transport takes it."""
        for account in list(self.unsent):
            outbox = account.outbox
            while outbox:
                frames, cost = outbox[0]
                sent = self.to_client(frames)
                if sent == FULL:
                    break
                if sent == GONE:
                    self.drop(account, None)  # gone while its replies waited
                outbox.popleft()
                account.unsent -= cost
            if not outbox:
                self.unsent.discard(account)
                if account.over:
                    account.over = False
                    self.log.info("client.reading", client=account.label, dropped=account.dropped)

    # --- dispatch ------------------------------------------------------------

    def dispatch(self, now: float) -> None:
        """Hand queued requests to workers with free credit (where: the dispatch policy), then
        send the batches."""
        if self.unsent:
            self.flush_clients()
        if not self.waiting and not self.backlogged:
            return
        for request, link in self.dispatcher.plan(now, is_queued):
            self.assign(link, request, now)
        if self.dispatcher.evictions:
            evictions, self.dispatcher.evictions = self.dispatcher.evictions, []
            for link, service, key in evictions:
                # Sent before any later request for the key, on the same ordered pipe.
                self.send_worker(link, evict_message(service.name, key), now)
        if self.outbox:
            self.send_outbox(now)

    def assign(self, link: WorkerLink, request: Request, now: float) -> None:
        left_ms = int((request.deadline - now) * 1000)
        if left_ms <= 0:
            if not request.redelivered:
                self.expire(request, now)
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
                                (getattr(request.owner, "flags", 0) if request.owner is not None else 0))

    def send_outbox(self, now: float) -> None:
        outbox, self.outbox = self.outbox, {}
        for link, pieces in outbox.items():
            payload = b"".join(pieces)
            if self.send_worker(link, payload, now):
                continue
            # Never delivered: these requests never started, so they go back
            # to the queue whatever their idempotency; the worker is gone.
            undelivered = [ticket for ticket, *_ in protocol.iter_requests(payload)]
            for ticket in reversed(undelivered):
                request = link.inflight.pop(ticket, None)
                if request is not None:
                    self.requeue(request)
            self.events.append((Event.SILENT, link, "unreachable"))
            self.worker_gone(link.identity, "unreachable", now)

    def send_worker(self, link: WorkerLink, payload: bytes, now: float) -> bool:
        if not self.to_worker(link.identity, payload):
            return False
        link.last_sent = now
        return True

    def requeue(self, request: Request) -> None:
        """Put a request that never started back at the head of its queue."""
        request.state = State.QUEUED
        if not request.redelivered:
            self.deadlines.push(request.deadline, request.ticket)  # its entry may be gone already
        request.service.queue.appendleft(request)
        self.waiting.add(request.service)

    def expire(self, request: Request, now: float) -> None:
        if request.probe:
            request.service.health.probe_lost()
        self.finish(request, Status.DEADLINE, b"deadline exceeded while queued", now)

    # --- workers: the protocol -----------------------------------------------

    def on_worker(self, identity: bytes, payload: bytes, now: float) -> None:
        """One message from a worker (corral's workers send one frame). Untrusted: it hosts
        guest code, and with remote hosts the backend is a network boundary
        (docs/worker-protocol.md, "Protocol violations")."""
        command = payload[:1]
        link = self.links.get(identity)
        try:
            if link is None:
                if identity in self.gone:
                    return   # a gone or refused worker's late words: already answered for
                if command != W_READY:
                    raise ProtocolViolation("a message before READY")
                self.on_ready(identity, payload, now)
                return
            link.last_seen = now
            if command == W_REPLY:
                self.on_replies(link, payload, now)
            elif command == W_HEARTBEAT:
                pass
            elif command == W_RETIRING:
                self.on_retiring(link, payload, now)
            elif command == W_DISCONNECT:
                self.on_goodbye(link, now)
            elif command == W_ALARMS:
                if self.alarms is not None:
                    self.alarms.on_report(link, payload)
            elif command == W_READY:
                # Its link holds requests and keys; a second link would leave them unanswered.
                raise ProtocolViolation("READY from a worker already linked")
            else:
                raise ProtocolViolation("no such command from a worker")
        except WORKER_MESSAGE_FAULTS as exc:   # (ProtocolViolation is a ValueError)
            self.reject_worker(identity, payload, exc, now)

    def reject_worker(self, identity: bytes, payload: bytes, exc: Exception, now: float) -> None:
        """A worker broke the protocol: it hosts guest code, so it may be subverted. Logged
        once; it is dropped like a silent one (the daemon kills it if it is ours), what it
        held answered 502 or held for the fence, and it is never linked again."""
        self.log.error("worker.protocol_violation", worker=identity[:64].decode(errors="replace"),
                       command=payload[:1].hex(), length=len(payload), message=payload[:VIOLATION_SHOWN].hex(),
                       error=f"{type(exc).__name__}: {str(exc)[:200]}")
        link = self.links.get(identity)
        if link is None:   # never linked: nothing it holds; a stand-in tells the daemon who it was
            self.forget(identity)
            self.events.append((Event.SILENT, WorkerLink(identity, 0, 0, [], now, 0.0), "protocol violation"))
            return
        self.events.append((Event.SILENT, link, "protocol violation"))
        self.worker_gone(identity, "protocol violation", now)

    def forget(self, identity: bytes) -> None:
        """An identity gone or refused: never linked again, its late messages ignored (the
        newest GONE_KEPT are kept: identities are never reused within a run)."""
        self.gone[identity] = None
        if len(self.gone) > GONE_KEPT:
            del self.gone[next(iter(self.gone))]

    def on_ready(self, identity: bytes, payload: bytes, now: float) -> None:
        info = json.loads(payload[1:])
        if not isinstance(info, dict):
            raise ProtocolViolation("READY's payload is not a JSON object")
        heartbeat_s = int(info.get("heartbeat_ms") or 0) / 1000 or self.heartbeat_s
        services = info["services"]
        if not isinstance(services, list) or not all(isinstance(n, str) for n in services):
            raise ProtocolViolation("READY's services is not a list of names")
        cordon = str(info.get("cordon", "default"))
        link = WorkerLink(identity, int(info["pid"]), int(info["capacity"]),
                          [self.services[n.encode()] for n in services
                           if n.encode() in self.services and self.services[n.encode()].app.cordon == cordon],
                          now, self.liveness * heartbeat_s, parked=bool(info.get("standby")), cordon=cordon)
        if link.capacity < 1 or heartbeat_s <= 0:
            raise ProtocolViolation("READY's capacity or heartbeat_ms is out of range")
        refusal = self.expected(identity, info) if self.expected is not None else None
        if refusal:
            raise ProtocolViolation(f"READY refused: {refusal}")
        confinement = info.get("confinement")
        link.confinement = confinement if isinstance(confinement, dict) else {}
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
        """A batch of replies, checked whole before any is used: each for a ticket this
        worker holds, once, with a known status; else nothing of it reaches a client."""
        records = list(iter_replies(payload))
        inflight = link.inflight
        if len({ticket for ticket, *_ in records}) != len(records):
            raise ProtocolViolation("two replies for one ticket")
        for ticket, status, _, _ in records:
            if ticket not in inflight:
                raise ProtocolViolation(f"a reply for ticket {ticket}, which this worker does not hold")
            if status not in STATUS_BY_CODE:
                raise ProtocolViolation(f"a reply with status {status}, which the protocol does not have")
        ledger = self.ledger
        for ticket, status, fault, body in records:
            request = inflight.pop(ticket)
            if ledger.get(ticket) is not request:
                continue  # answered by the broker meanwhile (the end of a drain)
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

    def on_retiring(self, link: WorkerLink, payload: bytes, now: float) -> None:
        reason, tickets = protocol.parse_retiring(payload)
        if len(set(tickets)) != len(tickets) or not all(ticket in link.inflight for ticket in tickets):
            raise ProtocolViolation("RETIRING hands back a ticket this worker does not hold")
        for ticket in reversed(tickets):  # handed back, never started: re-dispatch
            request = link.inflight.pop(ticket, None)
            if request is not None and self.ledger.get(ticket) is request:
                self.requeue(request)
        if not link.retiring:
            self.retire(link, now)
            self.events.append((Event.RETIRING, link, reason))

    def on_goodbye(self, link: WorkerLink, now: float) -> None:
        """The worker's last message: everything it sent has been read."""
        link.said_goodbye = True
        departing = self.departing.pop(link.identity, None)
        if departing is not None:
            self.worker_gone(link.identity, departing[0], now, reaped=True)

    # --- workers: lifetime ---------------------------------------------------

    def retire(self, link: WorkerLink, now: float) -> None:
        """Send the worker nothing more; ask it to finish what it holds and leave."""
        link.retiring = True
        self.release(link)
        self.outbox.pop(link, None)
        self.send_worker(link, W_DISCONNECT, now)

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

    def worker_gone(self, identity: bytes, cause: str, now: float, reaped: bool = False,
                    clean: bool = False) -> None:
        """A worker died or was killed: answer everything it held now, and let its idempotent
        requests (and keys) move on as the fence allows: for local workers, once it is
        `reaped` (this call again, from the arbiter's reap).

        A worker reaped after a `clean` exit said goodbye as its last message; until that
        is read, replies and hand-backs it sent before may still be on the way, and what
        it held is left alone (GOODBYE_WAIT_S at most)."""
        link = self.links.get(identity)
        if reaped and clean and link is not None and not link.said_goodbye:
            self.departing[identity] = (cause, now + GOODBYE_WAIT_S)
            return
        self.departing.pop(identity, None)
        if reaped:
            for known in (link, self.fenced.get(identity, (None,))[0]):
                if known is not None:
                    known.reaped = True
        link = self.links.pop(identity, None)
        if link is not None:
            self.forget(identity)
            self.cut(link, cause, now)
        if self.fenced:
            self.unfence()

    def host_lost(self, host: str, now: float) -> None:
        """Every worker of `host` is gone (issue 18: its host stopped answering): what they
        held is answered as a dead worker's, and moves on as the fence allows."""
        for link in [link for link in self.links.values() if link.host == host]:
            self.worker_gone(link.identity, f"host {host} lost", now)

    def cut(self, link: WorkerLink, cause: str, now: float) -> None:
        """A gone worker's link: nothing more goes to it; what it held is answered 502 or,
        if idempotent, held for the fence."""
        link.retiring = True
        for service in link.services:
            if link in service.links:
                service.links.remove(link)
        if self.fence.keys_free(link):
            self.release(link)
        self.outbox.pop(link, None)
        if self.alarms is not None:   # it may have committed an alarm it never reported
            self.alarms.suspect(link.identity, link.inflight.values())
        detail = f"worker {link.identity.decode()} (pid {link.pid}) {cause}".encode()
        held = []
        # Killed by its seccomp filter (docs/confinement.md): an abort of the request it was running.
        running = min(link.inflight.values(), key=lambda r: r.sent, default=None) if "SIGSYS" in cause else None
        for request in sorted(link.inflight.values(), key=lambda r: r.ticket, reverse=True):
            if self.ledger.get(request.ticket) is not request:
                continue
            if request is running:
                request.service.health.record_abort(request.body, now, request.probe)
            if request.idempotent:
                request.redelivered = True
                held.append(request)
            else:
                if request.probe and request is not running:
                    request.service.health.probe_lost()
                self.log.warning("request.failed", request_id=request.request_id[:64].decode(errors="replace"),
                                 service=request.service.name.decode(), status=502, fault="crash",
                                 worker=link.identity.decode(), pid=link.pid, detail=detail.decode())
                self.finish(request, Status.ABORT, detail, now)
        link.inflight.clear()
        if held or link.keys or link.backlog:
            self.fenced[link.identity] = (link, held)

    def unfence(self) -> None:
        """Move on what gone workers held, as far as the fence allows now."""
        for identity, (link, held) in list(self.fenced.items()):
            if (link.keys or link.backlog) and self.fence.keys_free(link):
                self.release(link)
            if held and self.fence.requests_free(link):
                for request in held:   # highest ticket first: they end up in ticket order
                    if self.ledger.get(request.ticket) is request:
                        self.requeue(request)
                held.clear()
            if not held and not link.keys and not link.backlog:
                del self.fenced[identity]

    # --- timers --------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Heartbeats to workers, silent workers, requests expired in the queue."""
        for identity, (cause, until) in list(self.departing.items()):
            if now >= until:
                self.worker_gone(identity, cause, now, reaped=True)
        for link in list(self.links.values()):
            if link.identity in self.departing:
                continue   # exited; its goodbye is awaited above
            if now - link.last_sent >= self.heartbeat_s:
                self.send_worker(link, W_HEARTBEAT, now)
            allowed = link.last_seen + link.liveness_s
            if link.inflight:
                # A worker inside a guest call cannot answer; it runs one request at
                # a time and sends each reply when the call ends, so it may be
                # silent for as long as the longest guest call it holds may run.
                allowed += max(r.budget_s for r in link.inflight.values())
            if now > allowed:
                cause = f"host lost: {link.host}" if link.host else "heartbeat lost"   # docs/cluster.md
                self.events.append((Event.SILENT, link, cause))
                self.worker_gone(link.identity, cause, now)
        if self.fenced:
            self.unfence()   # a remote fence may clear with time
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
                self.expire(request, now)
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

    @property
    def busy(self) -> bool:
        """Work waits for a worker or for a client: the loop ticks often."""
        return bool(self.waiting or self.backlogged or self.unsent)

    # --- drain and status ------------------------------------------------------

    def drain(self) -> None:
        self.draining = True

    def abandon(self, detail: bytes, now: float) -> None:
        """At the end of a drain: every request still open gets 503."""
        for request in list(self.ledger.values()):
            self.finish(request, Status.UNAVAILABLE, detail, now)

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

    def totals(self) -> Counter:
        """Every reply sent, by status: the services' and the broker's own refusals."""
        totals = Counter(self.rejected)
        for service in self.services.values():
            totals.update(service.statuses)
        return totals
