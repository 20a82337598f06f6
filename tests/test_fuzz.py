"""Fuzzing everything that parses untrusted bytes, with hypothesis.

    client dialects    what a client sends to the frontend (native, MDP/0.2 both framings,
                       meta JSON), through a real broker's sockets
    worker protocol    what a worker sends to the backend (READY, REPLY, RETIRING, HEARTBEAT,
                       anything), through the same broker: a worker runs guest code, so the
                       arbiter trusts none of its bytes
    config             corral.config.parse on generated documents

The property is always the same: a clear refusal (a 4xx reply, a logged bad message, a
ConfigError) and never an exception out of the broker or the parser; the broker keeps
serving after each. CI runs a short deterministic pass (profile "ci", derandomized); a
developer runs a long random one with

    CORRAL_FUZZ=long .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

Every crash found is fixed and kept below as an explicit @example.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corral import config as config_module
from corral.broker import Broker
from corral.wire import logs
from corral.wire.protocol import (MDPC, NATIVE, W_HEARTBEAT, W_READY, W_REPLY, W_RETIRING, Malformed, Status,
                                  parse_client, reply_record, retiring_message)

from harness import GUESTS

settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=20_000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("CORRAL_FUZZ", "ci"))

pytestmark = pytest.mark.timeout(300)

SERVICES = [b"echo", b"counter", b"calc", b"mmi.service", b"nope", b""]
HEADERS = [NATIVE, MDPC, b"", b"\x01", b"\x02", b"MDPW02"]
DEEP_JSON = b"[" * 5_000   # past json's recursion limit: a RecursionError, not a ValueError
meta_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
metas = st.one_of(
    st.binary(max_size=64),
    st.dictionaries(st.sampled_from(["deadline_ms", "key", "idempotent", "x"]), meta_values, max_size=4)
      .map(lambda d: json.dumps(d).encode()),
    st.just(DEEP_JSON), st.just(b'{"key": "\\ud800"}'), st.just(b"\xff\xfe"),
)
frame = st.one_of(st.binary(max_size=32), st.sampled_from(HEADERS + SERVICES + [b"\x03", b"\x04"]), metas)
client_messages = st.one_of(
    st.lists(frame, min_size=1, max_size=7),
    st.tuples(st.just(NATIVE), st.binary(max_size=8), st.sampled_from(SERVICES), metas, st.binary(max_size=16))
      .map(list),
    st.tuples(st.just(MDPC), st.sampled_from([b"\x01", b"\x02"]), st.sampled_from(SERVICES),
              st.lists(st.binary(max_size=16), max_size=3)).map(lambda t: [t[0], t[1], t[2], *t[3]]),
    st.tuples(st.just(b""), st.just(MDPC), st.sampled_from([b"\x01", b"\x02"]), st.sampled_from(SERVICES),
              st.lists(st.binary(max_size=16), max_size=3)).map(lambda t: [*t[:4], *t[4]]),
)


@given(client_messages)
@example([NATIVE, b"1", b"echo", DEEP_JSON, b""])
@example([NATIVE, b"1", b"counter", b'{"key": "\\ud800"}', b""])
def test_parse_client_answers_or_refuses_every_message(frames):
    try:
        parsed = parse_client(frames, {b"counter"})
    except Malformed as bad:
        assert 400 <= int(bad.status) < 500 and bad.detail
    else:
        assert isinstance(parsed.service, bytes) and isinstance(parsed.body, bytes)


class Rig:
    """A real broker on inproc sockets, a client DEALER on its frontend and a worker DEALER
    on its backend; nothing else of the daemon."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="crl-fuzz-", dir="/tmp"))
        doc = {"supervisor": {"frontend": f"ipc://{self.dir}/f.sock", "control": f"ipc://{self.dir}/c.sock",
                              "max_message_kib": 64},
               "apps": {"echo": {"module": str(GUESTS / "echo.wat")},
                        "counter": {"module": str(GUESTS / "counter.wat"), "instances": "keyed"}}}
        self.config = config_module.parse(doc, self.dir / "corral.toml")
        self.context = zmq.Context()
        self.broker = Broker(self.context, self.config, f"ipc://{self.dir}/w.sock", logs.get(component="fuzz"))
        self.client = self.context.socket(zmq.DEALER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.connect(f"ipc://{self.dir}/f.sock")
        self.worker = self.context.socket(zmq.DEALER)
        self.worker.setsockopt(zmq.LINGER, 0)
        self.worker.setsockopt(zmq.IDENTITY, b"w0.1")
        self.worker.connect(f"ipc://{self.dir}/w.sock")

    def deliver(self, socket: zmq.Socket, frames: list[bytes], take) -> None:
        """Send `frames` and let the broker take them (`take`: on_frontend or on_backend)."""
        socket.send_multipart(frames)
        end = time.monotonic() + 2
        while not take() and time.monotonic() < end:
            time.sleep(0.0005)

    def close(self) -> None:
        self.client.close()
        self.worker.close()
        self.broker.close()
        self.context.term()
        for path in self.dir.iterdir():
            path.unlink()
        self.dir.rmdir()


@pytest.fixture(scope="module")
def client_rig():
    rig = Rig()
    yield rig
    rig.close()


@pytest.fixture(scope="module")
def worker_rig():   # its own: replies it leaves behind never reach the client test's socket
    rig = Rig()
    yield rig
    rig.close()


def drain_replies(socket: zmq.Socket, wait_ms: int = 0) -> list[list[bytes]]:
    """Every message waiting; with wait_ms, the first may take that long to come, and the
    rest are waited for until 5 ms pass without one (ipc delivers asynchronously)."""
    replies = []
    while socket.poll(wait_ms if not replies else min(wait_ms, 5)):
        replies.append(socket.recv_multipart())
    return replies


@given(client_messages)
@example([NATIVE, b"1", b"echo", DEEP_JSON, b""])
@example([NATIVE, b"1", b"counter", b'{"key": ""}', b""])
@example([NATIVE, b"", b"echo", b'{"key": "\\ud800"}', b""])
def test_the_broker_answers_every_client_message_and_keeps_serving(client_rig, frames):
    rig = client_rig
    broker = rig.broker
    rig.deliver(rig.client, frames, broker.on_frontend)
    broker.dispatch()
    for request in list(broker.core.ledger.values()):   # accepted: queued for a worker; answer it here
        broker.core.finish(request, Status.OK, FINISHED, time.monotonic())
    replies = drain_replies(rig.client, wait_ms=3000)   # the first comes at once, unless the machine is busy
    assert len(replies) == 1, replies                 # one answer per message, whatever it was
    reply = replies[0]
    status, body = (reply[2], reply[3]) if reply[0] == NATIVE else (reply[3], reply[4])
    assert status[:1] == b"4" or body in (FINISHED, b"200"), reply   # refused, served, or mmi's 200


FINISHED = b"finished by the test"


worker_payloads = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from([W_READY, W_REPLY, W_RETIRING, W_HEARTBEAT]), st.binary(max_size=48))
      .map(lambda t: t[0] + t[1]),
    st.builds(lambda info: W_READY + json.dumps(info).encode(),
              st.dictionaries(st.sampled_from(["pid", "capacity", "services", "standby", "heartbeat_ms"]),
                              meta_values | st.lists(st.sampled_from(["echo", "counter", "x"])), max_size=5)),
    st.builds(lambda records: W_REPLY + b"".join(b"".join(reply_record(*r)) for r in records),
              st.lists(st.tuples(st.integers(0, 2**64 - 1) | st.integers(0, 300), st.integers(0, 65535)
                                 | st.sampled_from([200, 422, 500, 502, 504]), st.binary(max_size=4),
                                 st.binary(max_size=8)), max_size=3)),
    st.builds(lambda reason, tickets, cut: retiring_message(reason, tickets)[:cut],
              st.text(max_size=8), st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 300), max_size=3),
              st.integers(0, 64)),
)


@given(st.lists(worker_payloads, min_size=1, max_size=4))
@example([W_READY + b"[]"])
@example([W_READY + b'{"pid": 1, "capacity": 1, "services": [1]}'])
@example([W_READY + DEEP_JSON])
@example([W_READY + b'{"pid": Infinity, "capacity": 1, "services": []}'])   # the long run found it
@example([W_REPLY + b"\x00\x01"])
@example([W_REPLY + struct.pack("!QHBI", 1, 999, 0, 0)])
@example([W_REPLY + struct.pack("!QHBI", 1, 200, 1, 0) + b"\xff"])
def test_the_broker_survives_every_worker_message(worker_rig, payloads):
    rig = worker_rig
    broker = rig.broker
    # A worker that announced itself and holds a request (ticket 1 and up), then says anything.
    rig.deliver(rig.worker, [W_READY + b'{"pid": 1, "capacity": 4, "services": ["echo", "counter"]}'],
                broker.on_backend)
    rig.deliver(rig.client, [NATIVE, b"r", b"echo", b"", b"body"], broker.on_frontend)
    broker.dispatch()
    for payload in payloads:
        rig.deliver(rig.worker, [payload], broker.on_backend)
    broker.dispatch()
    broker.tick(time.monotonic())
    broker.core.events.clear()
    for identity in list(broker.core.links):
        broker.worker_gone(identity, "fuzz: next example")
    drain_replies(rig.worker)
    for reply in drain_replies(rig.client, wait_ms=5):
        assert reply[0] == NATIVE and reply[2][:1] in b"2345", reply   # each request answered once, well formed
    for request in list(broker.core.ledger.values()):   # still queued: its READY may come late over ipc
        broker.core.finish(request, Status.OK, FINISHED, time.monotonic())
    drain_replies(rig.client)
    broker.core.events.clear()
    broker.core.gone.clear()   # the next example's worker is a new one (the rig reuses one identity)


# --- config -------------------------------------------------------------------------------

scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["tcp://0.0.0.0:1", "ipc:///tmp/x", "tcp://*:0",
                                                           "echo.wat", "reuse", "keyed", "json", "", "9100"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
KEYS = {
    "supervisor": list(config_module._SUPERVISOR_KEYS), "restart": list(config_module._RESTART_KEYS),
    "logging": list(config_module._LOGGING_KEYS), "metrics": list(config_module._METRICS_KEYS),
    "security": list(config_module._SECURITY_KEYS),
}
sections = st.fixed_dictionaries({}, optional={
    **{name: st.dictionaries(st.sampled_from(keys + ["bogus"]), values, max_size=4) for name, keys in KEYS.items()},
    "apps": st.dictionaries(st.sampled_from(["echo", "mmi.x", "", "a.b", "-x"]),
                            st.dictionaries(st.sampled_from(list(config_module._APP_KEYS) + ["bogus"]),
                                            values | st.just("echo.wat"), max_size=4) | values, max_size=3),
    "extra": values,
})


@given(sections)
@example({"apps": {"echo": {"module": "echo.wat", "allow": [[]]}}})
@example({"security": {"curve_secret_key": "", "client_keys": ""}, "apps": {"echo": {"module": "echo.wat"}}})
@example({"metrics": {"listen": "0"}, "apps": {"echo": {"module": "echo.wat"}}})
@example({"security": {"curve_secret_key": "\x00"}})
@example({"apps": {"echo": {"module": "e\x00.wat"}}})
@example({"supervisor": {"cache_dir": "\x00", "user": "a\x00b"}, "apps": {"echo": {"module": "echo.wat"}}})
def test_config_parse_accepts_or_names_the_problems(tmp_path_factory, doc):
    where = tmp_path_factory.getbasetemp() / "fuzz-config"
    where.mkdir(exist_ok=True)
    (where / "echo.wat").write_text("(module)")
    try:
        config = config_module.parse(doc, where / "corral.toml")
    except config_module.ConfigError as exc:
        assert exc.problems and all(p.startswith(str(where / "corral.toml")) for p in exc.problems), exc.problems
    else:
        assert config.apps


# --- the worker protocol's records: what is written is what is read -------------------------

from corral.wire.protocol import iter_replies, iter_requests, request_record  # noqa: E402

u16_bytes = st.binary(max_size=40)


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), u16_bytes,
                          st.none() | st.binary(min_size=1, max_size=40), st.binary(max_size=64)), max_size=5))
def test_request_records_round_trip(records):
    payload = b"\x02" + b"".join(b"".join(request_record(*r)) for r in records)
    assert list(iter_requests(payload)) == records


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 65535), st.binary(max_size=255),
                          st.binary(max_size=64)), max_size=5))
def test_reply_records_round_trip(records):
    payload = W_REPLY + b"".join(b"".join(reply_record(*r)) for r in records)
    assert list(iter_replies(payload)) == records


@given(st.binary(max_size=80))
def test_worker_record_readers_refuse_garbage_with_struct_error_only(payload):
    for reader in (iter_requests, iter_replies):
        try:
            for record in reader(payload):
                assert isinstance(record, tuple)
        except struct.error:
            pass   # what the broker catches (WORKER_MESSAGE_FAULTS)
        except ValueError as exc:   # iter_replies: a record cut short
            assert reader is iter_replies and "truncated" in str(exc)
