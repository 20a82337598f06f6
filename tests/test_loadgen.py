"""The load generator (supervisor/client/loadgen.py) against a ROUTER played by the test.

The server answers in bursts, so the client takes several replies per wake-up
(the drain path), or answers with replies of the wrong shape.
"""

from __future__ import annotations

import threading

import pytest
import zmq

from corral.client import loadgen


class BurstServer(threading.Thread):
    """Answers native requests a burst at a time; `shape` makes each reply's frames."""

    def __init__(self, context: zmq.Context, endpoint: str, burst: int, shape):
        super().__init__(daemon=True)
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.burst, self.shape = burst, shape
        self.stopped = False

    def run(self) -> None:
        held = []
        while not self.stopped:
            if not self.socket.poll(20):
                held = self.answer(held)   # a partial burst is answered when things go quiet
                continue
            held.append(self.socket.recv_multipart())
            if len(held) >= self.burst:
                held = self.answer(held)
        self.socket.close()

    def answer(self, held: list) -> list:
        for client, _, request_id, _, _, body in held:
            self.socket.send_multipart([client, *self.shape(request_id, body)])
        return []


@pytest.fixture
def serve(tmp_path):
    context = zmq.Context()
    servers = []

    def start(burst: int, shape=lambda request_id, body: [loadgen.NATIVE, request_id, b"200", body]):
        server = BurstServer(context, f"ipc://{tmp_path}/front.sock", burst, shape)
        server.start()
        servers.append(server)
        return f"ipc://{tmp_path}/front.sock"
    yield start
    for server in servers:
        server.stopped = True
        server.join(timeout=5)
    context.destroy(linger=0)


@pytest.mark.parametrize("rate", [None, 5000.0], ids=["closed loop", "open loop"])
def test_every_reply_of_a_burst_is_counted_once(serve, rate):
    endpoint = serve(burst=8)
    result = loadgen.run(endpoint, b"echo", b"hi", requests=400, concurrency=16, rate=rate, warmup=0)
    assert result.received == 400 and result.failed == 0 and result.stray == 0, result.report()
    assert result.statuses == {200: 400}
    assert len(result.latencies_ms) == 400


def test_a_reply_of_the_wrong_shape_is_reported_not_misread(serve):
    endpoint = serve(burst=1, shape=lambda request_id, body: [loadgen.NATIVE, request_id, b"200"])
    result = loadgen.run(endpoint, b"echo", b"hi", requests=10, concurrency=2, timeout_s=2.0, warmup=0)
    assert result.errors and "4 frames" in result.errors[0], result.errors
    assert result.failed == 10
