"""corral.wire.frames: both implementations (the C extension and plain pyzmq) move
whole messages, in order, byte for byte, and report refusals the same way."""

from __future__ import annotations

import errno
import importlib.util
import os

import pytest
import zmq

from harness import GUESTS


def load_frames(pure: bool):
    """A fresh copy of corral.wire.frames, bound to the C extension or not."""
    saved = os.environ.pop("CORRAL_PURE_PYZMQ", None)
    if pure:
        os.environ["CORRAL_PURE_PYZMQ"] = "1"
    try:
        spec = importlib.util.find_spec("corral.wire.frames")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        os.environ.pop("CORRAL_PURE_PYZMQ", None)
        if saved is not None:
            os.environ["CORRAL_PURE_PYZMQ"] = saved


@pytest.fixture(params=["c", "pyzmq"])
def frames(request):
    module = load_frames(pure=request.param == "pyzmq")
    assert module.IMPLEMENTATION == request.param
    return module


@pytest.fixture
def pair():
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://frames")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"peer")
    dealer.connect("inproc://frames")
    yield router, dealer
    context.destroy(linger=0)


def test_the_c_extension_is_built_and_bound():
    """./dev test builds it (gcc is on every machine corral supports); without it
    corral still works, on pyzmq alone, at about half the broker throughput."""
    assert load_frames(pure=False).IMPLEMENTATION == "c", \
        "supervisor/wire/_zmqframes.c was not built: pip install -e . with a C compiler"


def test_drain_takes_every_waiting_message_whole_and_in_order(frames, pair):
    router, dealer = pair
    sent = [[b"CORRAL1", b"%d" % i, b"echo", b"", b"body %d" % i] for i in range(50)]
    sent.append([b"", b"x" * (1 << 20)])
    sent.append([b"single"])
    for message in sent:
        dealer.send_multipart(message)
    got = []
    while len(got) < len(sent):
        if not router.poll(5000):
            break
        got += frames.drain(router, 7)
    assert got == [[b"peer"] + m for m in sent]
    assert frames.drain(router, 10) == []


def test_drain_stops_at_its_limit(frames, pair):
    router, dealer = pair
    for i in range(5):
        dealer.send_multipart([b"%d" % i])
    assert router.poll(5000)
    import time
    time.sleep(0.05)
    assert len(frames.drain(router, 3)) == 3
    assert [m[1] for m in frames.drain(router, 10)] == [b"3", b"4"]


def test_send_frames_to_a_gone_peer_is_ehostunreach(frames, pair):
    router, _ = pair
    with pytest.raises(zmq.ZMQError) as caught:
        frames.send_frames(router, [b"nobody", b"x"], frames.NOBLOCK)
    assert caught.value.errno == errno.EHOSTUNREACH


def test_send_frames_at_the_high_water_mark_is_again(frames):
    context = zmq.Context()
    try:
        sender = context.socket(zmq.DEALER)
        sender.setsockopt(zmq.SNDHWM, 1)
        sender.connect("inproc://nowhere-yet")  # no peer: the pipe fills at once
        with pytest.raises(zmq.Again):
            for _ in range(100):
                frames.send_frames(sender, [b"x"], frames.NOBLOCK)
    finally:
        context.destroy(linger=0)


def test_send_frames_delivers_a_whole_message(frames, pair):
    router, dealer = pair
    dealer.send(b"hello")
    assert router.poll(5000)
    router.recv_multipart()
    frames.send_frames(router, [b"peer", b"CORRAL1", b"1", b"200", b""])
    assert dealer.poll(5000)
    assert dealer.recv_multipart() == [b"CORRAL1", b"1", b"200", b""]


def test_recv_payload_drops_stray_frames(frames, pair):
    router, dealer = pair
    router_side = dealer  # a DEALER receiving what a ROUTER sent
    dealer.send(b"hi")
    assert router.poll(5000)
    router.recv_multipart()
    router.send_multipart([b"peer", b"payload", b"stray"])
    router.send_multipart([b"peer", b"next"])
    assert router_side.poll(5000)
    assert frames.recv_payload(router_side) == b"payload"
    assert frames.recv_payload(router_side) == b"next"


@pytest.mark.timeout(60)
def test_the_daemon_serves_on_plain_pyzmq_too(start_daemon):
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}}, env={"CORRAL_PURE_PYZMQ": "1"})
    client = daemon.client()
    ids = {client.send("echo", b"%d" % i): b"%d" % i for i in range(200)}
    replies = client.gather(list(ids), timeout=30)
    assert all(r.status == 200 and r.body == ids[i] for i, r in replies.items())
    assert daemon.call("nope").status == 404
    assert daemon.events("daemon.started")[0]["frames"] == "pyzmq"


def test_send_frames_on_a_closed_socket_is_enotsock(frames):
    context = zmq.Context()
    try:
        socket = context.socket(zmq.DEALER)
        socket.close()
        with pytest.raises(zmq.ZMQError) as caught:
            frames.send_frames(socket, [b"x"], frames.NOBLOCK)
        assert type(caught.value) is zmq.ZMQError and caught.value.errno == errno.ENOTSOCK
    finally:
        context.destroy(linger=0)


def test_drain_on_a_closed_socket_is_enotsock(frames):
    context = zmq.Context()
    try:
        socket = context.socket(zmq.DEALER)
        socket.close()
        with pytest.raises(zmq.ZMQError) as caught:
            frames.drain(socket, 10)
        assert type(caught.value) is zmq.ZMQError and caught.value.errno == errno.ENOTSOCK
    finally:
        context.destroy(linger=0)


def test_the_extension_binds_only_to_a_module_already_loaded():
    """It is bound through pyzmq's own extension module (RTLD_NOLOAD: never a
    second libzmq); a file that is not loaded in this process is refused."""
    import sys
    from corral.wire import _zmqframes
    pyzmq_module = sys.modules[zmq.backend.Socket.__module__].__file__
    with pytest.raises(OSError, match="not loaded"):
        _zmqframes.load(zmq.__file__, lambda error: None)  # a .py file: never dlopen'd
    _zmqframes.load(pyzmq_module, load_frames(pure=False)._raise)
