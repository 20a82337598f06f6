"""The worker's socket loop: take requests from the broker, run them, reply, heartbeat.

The worker runs one request at a time, in the order the broker sent them
(which keeps requests for one key in arrival order), and sends each reply as
soon as its call returns: a reply is never held behind a slower request.
While a guest runs, the worker cannot answer; the broker knows that and
judges a busy worker by the longest call it may be running (DESIGN 4b).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import zmq

from supervisor.protocol import (W_DISCONNECT, W_HEARTBEAT, W_READY, W_REPLY, W_REQUEST, W_RETIRING,
                                 RetireReason, Status, decode_request_header, encode_json,
                                 encode_reply_header, encode_tickets, readable, recv_frames, send_frames,
                                 worker_identity)
from workers import outcome
from workers.host import Host
from workers.spec import WorkerSpec

LINGER_MS = 2000  # long enough for the last replies to leave; the broker is local


@dataclass(slots=True)
class Job:
    ticket: int
    deadline: float  # monotonic
    service: bytes
    key: bytes | None
    body: bytes


class WorkerLoop:
    def __init__(self, spec: WorkerSpec, slot: int, generation: int, host: Host, log,
                 max_requests: int = 0, standby: bool = False):
        self.spec = spec
        self.host = host
        self.log = log
        self.identity = worker_identity(slot, generation)
        self.heartbeat_s = spec.heartbeat_ms / 1000
        self.max_requests = max_requests
        self.standby = standby  # the broker sends nothing until the daemon promotes it
        self.parent = os.getppid()
        self.jobs: deque[Job] = deque()
        self.last_sent = 0.0
        self.handled = 0
        self.leaving = False  # the broker said DISCONNECT: finish what we hold, then exit
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, self.identity)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.connect(spec.backend)

    def run(self) -> int:
        socket = self.socket
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        self.send([W_READY, encode_json({"pid": os.getpid(), "capacity": self.spec.capacity,
                                         "services": [g.decode() for g in self.host.guests],
                                         "standby": self.standby})])
        self.log.info("worker.ready", services=len(self.host.guests))
        idle_timeout_ms = self.spec.heartbeat_ms
        while True:
            if not self.jobs:
                if self.leaving:
                    return self.exit("disconnect")
                if not poller.poll(idle_timeout_ms):
                    self.idle()
                    continue
            self.receive()
            if self.jobs:
                retire = self.run_one()
                if retire is not None:
                    return self.retire(retire)
                if self.max_requests and self.handled >= self.max_requests:
                    return self.retire(RetireReason.MAX_REQUESTS)

    def receive(self) -> None:
        """Take every message waiting on the socket, without blocking."""
        socket = self.socket
        while readable(socket):
            frames = recv_frames(socket)
            command = frames[0]
            if command == W_REQUEST:
                now = time.monotonic()
                for i in range(1, len(frames) - 1, 2):
                    ticket, left_ms, service, key = decode_request_header(frames[i])
                    self.jobs.append(Job(ticket, now + left_ms / 1000, service, key, frames[i + 1]))
            elif command == W_DISCONNECT:
                self.leaving = True
            elif command != W_HEARTBEAT:
                self.log.warning("worker.unknown_command", command=command.hex())

    def run_one(self) -> RetireReason | None:
        job = self.jobs.popleft()
        now = time.monotonic()
        left_ms = int((job.deadline - now) * 1000)
        guest = self.host.guests.get(job.service)
        if guest is None:
            result = outcome.Outcome(Status.NOT_FOUND, b"this worker does not serve " + job.service)
        elif left_ms <= 0:
            result = outcome.expired()
        else:
            # Time spent waiting here counts against the request's deadline,
            # never against the guest's own timeout_ms.
            result = guest.run(job.key, job.body, min(left_ms, guest.app.timeout_ms))
        self.handled += 1
        self.send([W_REPLY, encode_reply_header(job.ticket, result.status, result.fault), result.body])
        if result.status is Status.OK or result.status is Status.GUEST_ERROR:
            return None
        self.log.warning("request.fault", ticket=job.ticket, service=job.service.decode(),
                         status=int(result.status), fault=result.fault.decode(),
                         detail=result.body[:200].decode(errors="replace"),
                         instance="discarded" if result.poisoned else "kept")
        if result.poisoned and guest is not None:
            return guest.abort_escalates(time.monotonic())
        return None

    def send(self, frames: list[bytes]) -> None:
        send_frames(self.socket, frames)
        self.last_sent = time.monotonic()

    def idle(self) -> None:
        if os.getppid() != self.parent:
            self.log.error("worker.orphaned")
            os._exit(1)
        if time.monotonic() - self.last_sent >= self.heartbeat_s:
            self.send([W_HEARTBEAT])

    def retire(self, reason: RetireReason) -> int:
        """Leave after a fault: hand back what has not started, wait for the broker's word."""
        self.log.warning("worker.retiring", reason=reason.value, handed_back=len(self.jobs))
        self.hand_back(reason)
        deadline = time.monotonic() + max(10 * self.heartbeat_s, 5.0)
        while not self.leaving and time.monotonic() < deadline:
            if self.socket.poll(int(self.heartbeat_s * 1000)):
                self.receive()
                if self.jobs:  # sent before the broker saw RETIRING
                    self.hand_back(reason)
        return self.exit(reason.value)

    def hand_back(self, reason: RetireReason) -> None:
        tickets = [job.ticket for job in self.jobs]
        self.jobs.clear()
        self.send([W_RETIRING, encode_json({"reason": reason.value}), encode_tickets(tickets)])

    def exit(self, reason: str) -> int:
        self.socket.close(linger=LINGER_MS)
        self.context.term()
        self.log.info("worker.exit", reason=reason, handled=self.handled)
        return 0
