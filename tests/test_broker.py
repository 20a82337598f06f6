"""The broker on its own: real sockets, with the worker played by hand over the worker protocol.

For what is hard to stage through a whole daemon: which key's instance goes
when keys are over max_keys while some have requests in flight.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import zmq

from harness import GUESTS
from supervisor import config as config_module, logs
from supervisor.broker import Broker
from supervisor.config import to_toml
from supervisor.protocol import (W_EVICT, W_READY, W_REPLY, W_REQUEST, Dialect, iter_requests, parse_evict,
                                 reply_record)


class HandWorker:
    """A DEALER speaking the worker protocol, driven by the test."""

    def __init__(self, context: zmq.Context, broker: Broker, backend: str, capacity: int):
        self.broker = broker
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, b"w0.1")
        self.socket.connect(backend)
        self.socket.send(W_READY + json.dumps({"pid": os.getpid(), "capacity": capacity,
                                               "services": ["counter"], "standby": False}).encode())
        self.pump(lambda: b"w0.1" in broker.links)
        self.tickets: dict[bytes, int] = {}    # key -> ticket of its request on this worker
        self.evicted: list[bytes] = []

    def pump(self, done, timeout: float = 5.0) -> None:
        """Let the broker take its messages until done() holds."""
        end = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < end, "the broker did not get there"
            if self.broker.backend.poll(50):
                self.broker.on_backend()
                self.broker.dispatch()

    def take(self) -> None:
        """Read what the broker sent: requests (by key) and evictions."""
        while self.socket.poll(200):
            payload = self.socket.recv()
            if payload[:1] == W_REQUEST:
                for ticket, _, _, key, _ in iter_requests(payload):
                    self.tickets[key] = ticket
            elif payload[:1] == W_EVICT:
                service, key = parse_evict(payload)
                assert service == b"counter"
                self.evicted.append(key)

    def reply(self, key: bytes) -> None:
        ticket = self.tickets.pop(key)
        self.socket.send(W_REPLY + b"".join(reply_record(ticket, 200, b"", b"1")))
        self.pump(lambda: ticket not in self.broker.ledger)


@pytest.fixture
def keyed_broker(tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text(to_toml({
        "supervisor": {"frontend": f"ipc://{tmp_path}/front.sock", "control": f"ipc://{tmp_path}/control.sock"},
        "apps": {"counter": {"module": GUESTS / "counter.wat", "instances": "keyed", "max_keys": 2}}}))
    context = zmq.Context()
    backend = f"ipc://{tmp_path}/back.sock"
    broker = Broker(context, config_module.load(path), backend, logs.get())
    try:
        yield broker, HandWorker(context, broker, backend, capacity=2)
    finally:
        broker.close()
        context.destroy(linger=0)


def test_over_max_keys_the_least_recent_key_with_nothing_in_flight_goes(keyed_broker):
    broker, worker = keyed_broker
    service = broker.services[b"counter"]

    def submit(key: bytes) -> None:
        now = time.monotonic()
        broker.enqueue(b"client", Dialect.NATIVE, key, service, key, b"incr", now + 30, False, now, False)
        broker.dispatch()
        worker.take()

    submit(b"a")
    submit(b"b")
    submit(b"c")        # a third key while a and b are running: nothing may go
    assert worker.evicted == [] and set(service.affinity) == {b"a", b"b", b"c"}
    assert set(worker.tickets) == {b"a", b"b"}   # c waits for the worker's credit
    worker.reply(b"a")  # a is done, c is sent in its place
    worker.take()
    assert set(worker.tickets) == {b"b", b"c"}
    submit(b"d")        # now a, the least recently used key, has nothing in flight
    assert worker.evicted == [b"a"]
    assert set(service.affinity) == {b"b", b"c", b"d"} and service.evicted == 1
    worker.reply(b"b")  # d is sent in b's place
    worker.take()
    worker.reply(b"d")  # c is the one still running
    submit(b"b")        # b is used again: least recent first, the keys are c, d, b
    submit(b"e")        # c is running, so it is passed over, and d goes
    assert worker.evicted == [b"a", b"d"]
    assert set(service.affinity) == {b"b", b"c", b"e"}
