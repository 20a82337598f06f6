"""The worker's socket loop: take requests from the broker, run them, reply, heartbeat.

The worker runs one request at a time, in the order the broker sent them
(which keeps requests for one key in arrival order). It takes new messages
only when it has run everything it holds: the broker never sends more than
the worker's capacity, so nothing waits on the socket that could run sooner.

Replies go back in batches, one message for several requests, as long as
the guests are fast: before a request whose guest took longer than
SLOW_CALL_S within its last CAUTIOUS_CALLS calls, and whenever nothing is
left to run, the pending replies are sent first, so a reply is not held
behind a slow call (except once, the first time a fast guest turns slow).
Counting calls rather than seconds lets a fast guest that was merely
descheduled during one call (wall time, on a busy machine) batch again soon.

Durable state (docs/state.md): the write set of a request that ends 200 or 422
is staged on its service's store; every flush first commits what is staged
(one transaction per store: group commit), and only then sends the replies
(the output gate). A commit that fails turns its requests' replies into 503.
The alarms a commit changed are told to the broker (W_ALARMS) just before
those replies, so the broker's schedule never runs ahead of the database
(docs/alarms.md).

While a guest runs the worker cannot answer; the broker judges a busy
worker by the longest call it may be running (docs/worker-protocol.md). When idle, it
heartbeats every heartbeat_ms, whatever the broker sends meanwhile.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import zmq

from corral.wire.frames import drain, recv_payload, send_frames
from corral.wire.protocol import (ALARM, REDELIVERED, W_DISCONNECT, W_EVICT, W_HEARTBEAT, W_READY, W_REPLY, W_REQUEST,
                                 RetireReason, Status, alarms_message, encode_json, iter_request_records,
                                 parse_alarm_body, parse_evict, reply_record, retiring_message,
                                 worker_identity)
from corral.workers import outcome, state
from corral.workers.host import Guest, Host
from corral.workers.state import StagedStore, WriteSet, fence_name

LINGER_MS = 2000       # long enough for the last replies to leave; the broker is local
SLOW_CALL_S = 0.001    # a guest call this long (wall time) makes the worker cautious
CAUTIOUS_CALLS = 64    # ... for this many calls of that guest: replies go out before each
MAX_BATCH = 64         # replies per message at most
MAX_DRAIN = 256        # messages taken from the socket per wake-up at most


@dataclass(slots=True)
class Job:
    ticket: int
    deadline: float  # monotonic
    service: bytes
    key: bytes | None
    body: bytes
    token: int = 0      # idempotent: recorded with its commit (docs/state.md)
    flags: int = 0


class WorkerLoop:
    def __init__(self, spec, slot: int, generation: int, host: Host, log,
                 max_requests: int = 0, standby: bool = False, confinement: dict | None = None):
        self.spec = spec
        self.host = host
        self.log = log
        self.identity = spec.identity_prefix.encode() + worker_identity(slot, generation)
        for store in host.stores.values():
            store.worker = fence_name(spec.run_id, self.identity)
        self.heartbeat_s = spec.heartbeat_ms / 1000
        self.max_requests = max_requests
        self.standby = standby  # the broker sends nothing until the daemon promotes it
        self.confinement = confinement or {}   # told in READY: seccomp, landlock ABI, uid
        self.parent = os.getppid()
        self.jobs: deque[Job] = deque()
        self.replies: list[bytes] = [W_REPLY]
        self.pending = 0
        self.last_sent = 0.0
        self.handled = 0
        self.leaving = False  # the broker said DISCONNECT: finish what we hold, then exit
        self.cautious: dict[bytes, int] = {}   # service -> calls left before batching again
        self.gated: list[tuple[slice, WriteSet]] = []  # (its record's pieces in replies, write set) of staged requests
        self.staged: dict[StagedStore, None] = {}    # stores with write sets to commit before the flush
        self.alarm_reports: list[tuple[bytes, bytes, int | None]] = []   # (service, scope, at_ms) to tell
        self.store_names = {store: name for name, store in host.stores.items()}
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, self.identity)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, max(1, spec.heartbeat_ms // 2))
        if spec.curve_server_key:   # a remote host's worker: tcp+CURVE to the cluster endpoint
            self.socket.setsockopt(zmq.CURVE_SERVERKEY, spec.curve_server_key.encode())
            self.socket.setsockopt(zmq.CURVE_PUBLICKEY, spec.curve_public_key.encode())
            self.socket.setsockopt(zmq.CURVE_SECRETKEY, spec.curve_secret_key.encode())
        self.socket.connect(spec.backend)

    def run(self) -> int:
        self.send(W_READY + encode_json({"pid": os.getpid(), "capacity": self.spec.capacity,
                                         "services": [g.decode() for g in self.host.guests],
                                         "standby": self.standby, "heartbeat_ms": self.spec.heartbeat_ms,
                                         "confinement": self.confinement, "cordon": self.spec.cordon,
                                         **({"host": self.spec.host} if self.spec.host else {})}))
        while True:
            if not self.jobs:
                self.flush()
                if self.leaving:
                    return self.exit()
                self.wait_for_work()
                continue
            retire = self.run_one(self.jobs.popleft())
            if retire is not None:
                return self.retire(retire)
            if self.max_requests and self.handled >= self.max_requests:
                self.flush()
                return self.retire(RetireReason.MAX_REQUESTS)

    def wait_for_work(self) -> None:
        """Block until a message comes (or half a heartbeat passes); take every message waiting.

        The receive timeout stays at half the heartbeat interval rather than
        being set to the exact time left on each wait: one system call fewer
        per wake-up, and a heartbeat is never more than half an interval late."""
        try:
            self.handle(recv_payload(self.socket))
        except zmq.Again:
            pass
        for message in drain(self.socket, MAX_DRAIN):
            self.handle(message[-1])
        if time.monotonic() - self.last_sent >= self.heartbeat_s and not self.jobs:
            if os.getppid() != self.parent:
                self.log.error("worker.orphaned")
                os._exit(1)
            self.send(W_HEARTBEAT)

    def handle(self, payload: bytes) -> None:
        command = payload[:1]
        if command == W_REQUEST:
            now = time.monotonic()
            jobs = self.jobs
            for ticket, left_ms, service, key, body, token, flags in iter_request_records(payload):
                jobs.append(Job(ticket, now + left_ms / 1000, service, key, body, token, flags))
        elif command == W_DISCONNECT:
            self.leaving = True
        elif command == W_EVICT:
            service, key = parse_evict(payload)
            guest = self.host.guests.get(service)
            if guest is not None:
                guest.instances.pop(key, None)
        elif command != W_HEARTBEAT:
            self.log.warning("worker.unknown_command", command=command.hex())

    def run_one(self, job: Job) -> RetireReason | None:
        guest = self.host.guests.get(job.service)
        cautious = self.cautious.get(job.service)
        if cautious:
            self.cautious[job.service] = cautious - 1
        if self.pending and (cautious or self.pending >= MAX_BATCH):
            self.flush()
        started = time.monotonic()
        left_ms = int((job.deadline - started) * 1000)
        writes = None
        if job.flags & REDELIVERED and guest is not None and guest.state is not None and \
                guest.state.store is not None and \
                (recorded := guest.state.store.recorded_reply(job.token)) is not None:
            # Its first attempt committed, and its worker died before the reply left.
            self.handled += 1
            self.replies += reply_record(job.ticket, *recorded)
            self.pending += 1
            return None
        if job.flags & ALARM:
            result, writes = self.run_alarm(job, guest, left_ms)
        elif guest is None:
            result = outcome.Outcome(Status.NOT_FOUND, b"this worker does not serve " + job.service)
        elif left_ms <= 0:
            result = outcome.expired()
        else:
            store_s = 0.0
            if guest.state is not None and guest.state.store is not None:
                writes = WriteSet(guest.state.store, job.key or b"", job.token, job.ticket)
                store_s = writes.store.read_s
            # Time spent waiting here counts against the request's deadline,
            # never against the guest's own timeout_ms.
            result = guest.run(job.key, job.body, min(left_ms, guest.app.timeout_ms), writes)
            if writes is not None:
                # A networked store's reads (docs/cluster.md) do not make the guest slow: counted,
                # every request would flush alone and group commit would be lost (5.8x fewer
                # req/s on PostgreSQL in bench --cluster).
                store_s = writes.store.read_s - store_s
            if time.monotonic() - started - store_s > SLOW_CALL_S:
                self.cautious[job.service] = CAUTIOUS_CALLS
        self.handled += 1
        if result.status is Status.OK or result.status is Status.GUEST_ERROR and not job.flags & ALARM:
            if writes is not None and writes.changed:
                writes.store.stage(writes, result.status, result.fault, result.body)
                self.staged[writes.store] = None
            record = reply_record(job.ticket, result.status, result.fault, result.body)
            # saw_staged: it read what others staged, so it is 503 too if that is not kept.
            if writes is not None and (writes.changed or writes.saw_staged):
                self.gated.append((slice(len(self.replies), len(self.replies) + len(record)), writes))
            self.replies += record
            self.pending += 1
            return None
        if writes is not None and writes.changed:
            writes.store.discard(writes)
            self.staged[writes.store] = None   # its count is saved with the flush below
        self.replies += reply_record(job.ticket, result.status, result.fault, result.body)
        self.pending += 1
        self.flush()  # a fault is news: send it now
        return self.fault(job, guest, result)

    def run_alarm(self, job: Job, guest: Guest | None, left_ms: int) -> tuple[outcome.Outcome, WriteSet | None]:
        """A due alarm, or one to give up (retries -1), docs/alarms.md: the outcome, and
        the write set that deletes the alarm of that at_ms if it is kept (only a 200 is).

        The alarm is looked up first: one replaced or deleted since the broker learned of it
        (a report lost with a killed worker) is not run; the broker is told what is there."""
        store = guest.state.store if guest is not None and guest.state is not None else None
        if store is None:
            return outcome.Outcome(Status.NOT_FOUND, b"this worker keeps no state for " + job.service), None
        retries, at_ms = parse_alarm_body(job.body)
        scope = job.key or b""
        try:
            current = store.visible_alarm(scope)
        except sqlite3.Error as exc:
            return outcome.Outcome(Status.UNAVAILABLE, f"storage unavailable: {exc}".encode(), b"state"), None
        if current != at_ms:
            self.alarm_reports.append((job.service, scope, current))
            return outcome.Outcome(Status.OK, b"stale"), None
        writes = WriteSet(store, scope, 0, job.ticket)
        writes.fired = at_ms
        if retries < 0:
            return outcome.Outcome(Status.OK, b"dropped"), writes
        if left_ms <= 0:
            return outcome.expired(), writes
        return guest.run(job.key, b"", min(left_ms, guest.app.timeout_ms), writes, alarm_retries=retries), writes

    def fault(self, job: Job, guest: Guest | None, result: outcome.Outcome) -> RetireReason | None:
        # Not logged here: the broker logs the fault once (request.failed), with the
        # request id and the client's service, which this process never sees.
        if result.poisoned and guest is not None:
            return guest.abort_escalates(time.monotonic())
        return None

    def flush(self) -> None:
        if self.staged:
            self.commit()
        if self.alarm_reports:
            self.send(alarms_message(self.alarm_reports))
            self.alarm_reports = []
        if self.pending:
            self.send(b"".join(self.replies))
            self.replies = [W_REPLY]
            self.pending = 0

    def commit(self) -> None:
        """The output gate: commit the staged write sets of each store in one transaction;
        the replies of those that could not commit become 503."""
        failed: dict[int, bytes] = {}   # ticket -> why its reply is 503
        for store in self.staged:
            try:
                store.commit(waiting=self.heartbeat_if_due)
                if store.alarm_changes:
                    name = self.store_names[store]
                    self.alarm_reports += [(name, scope, at) for scope, at in store.alarm_changes]
            except state.ERRORS as exc:
                tickets = [w.ticket for _, w in self.gated if w.store is store]
                # A fenced worker's commits all fail: the broker has given its work to another.
                why = b"fenced" if isinstance(exc, state.Fenced) else \
                    b"state unavailable" if isinstance(exc, state.Unreachable) else b"state commit failed"
                failed.update(dict.fromkeys(tickets, why))
                self.log.error("state.commit_failed", file=str(store), error=str(exc), requests=len(tickets))
        if failed:
            # Last first: a record replaced by one of another length leaves the earlier slices right.
            for pieces, writes in reversed(self.gated):
                why = failed.get(writes.ticket)
                if why is not None:
                    self.replies[pieces] = reply_record(writes.ticket, Status.UNAVAILABLE, b"state", why)
        self.staged.clear()
        self.gated.clear()

    def heartbeat_if_due(self) -> None:
        """While a commit waits for another writer: the broker must still hear from us."""
        if time.monotonic() - self.last_sent >= self.heartbeat_s:
            self.send(W_HEARTBEAT)

    def send(self, payload: bytes) -> None:
        send_frames(self.socket, (payload,))
        self.last_sent = time.monotonic()

    def retire(self, reason: RetireReason) -> int:
        """Leave after a fault: hand back what has not started, wait for the broker's word."""
        self.hand_back(reason)
        deadline = time.monotonic() + max(10 * self.heartbeat_s, 5.0)
        while not self.leaving and time.monotonic() < deadline:
            try:
                self.handle(recv_payload(self.socket))
            except zmq.Again:
                continue
            if self.jobs:  # sent before the broker saw RETIRING
                self.hand_back(reason)
        return self.exit()

    def hand_back(self, reason: RetireReason) -> None:
        tickets = [job.ticket for job in self.jobs]
        self.jobs.clear()
        self.send(retiring_message(reason.value, tickets))

    def exit(self) -> int:
        for store in self.host.stores.values():
            store.close()
        # Last on the pipe: once the broker reads it, it has read every reply and
        # hand-back before it, however soon it sees this process reaped.
        self.send(W_DISCONNECT)
        self.socket.close(linger=LINGER_MS)
        self.context.term()
        return 0
