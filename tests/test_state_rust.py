"""The Rust durable counter (guests/rust/examples/counter_durable.rs, corral_guest::kv),
built from source both ways, through the real daemon: its count lives in durable
state, so a panic (an unwind under panic=unwind, an abort under panic=abort), a
SIGKILLed worker and a SIGKILLed daemon lose nothing that was answered 200, and
the panicking request's own add is never kept; on each state backend."""

from __future__ import annotations

import os
import signal

import pytest


@pytest.mark.timeout(120)
@pytest.mark.parametrize("build, panic_status", [("rust_counter_durable_unwind", 500),
                                                 ("rust_counter_durable", 502)])
def test_the_rust_durable_counter_goes_on_after_panic_kill_and_daemon_restart(
        start_daemon, built_guests, build, panic_status, state_backend):
    daemon = start_daemon({"counter": {"module": built_guests[build], "instances": "keyed"}},
                          restart={"intensity": 1000}, extra=state_backend.extra)
    client = daemon.client()
    answered = {"alice": 0, "bob": 0}
    for _ in range(3):
        for key in answered:
            reply = client.call("counter", b"incr", key=key)
            answered[key] += 1
            assert reply.status == 200 and int(reply.body) == answered[key], (key, reply)
    panicked = client.call("counter", b"panic", key="alice")
    assert panicked.status == panic_status, panicked
    if panic_status == 500:
        assert b"counter_durable: asked to panic at count 4" in panicked.body, panicked.body
    assert int(client.call("counter", b"get", key="alice").body) == answered["alice"]   # the add was not kept
    old = set(daemon.worker_pids())
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    daemon.wait_for(lambda: len(set(daemon.worker_pids()) - old) == len(old), what="new workers")
    reply = daemon.call("counter", b"incr", key="bob")
    answered["bob"] += 1
    assert reply.status == 200 and int(reply.body) == answered["bob"]
    daemon.stop(signal.SIGKILL)
    daemon.start()
    for key, count in answered.items():
        reply = daemon.call("counter", b"get", key=key)
        assert reply.status == 200 and int(reply.body) == count, (key, reply)
