"""The same Rust keyed counter built twice (guests/rust/examples/counter.rs),
served by the real daemon: with panic=unwind a panic fails only its request
(500 with the panic message) and the count survives; with panic=abort the
same request is 502 and the count starts again. Both built from source in
the test run (guests/build.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from corral.workers import modules
from corral.workers.host import Guest
from corral.workers.spec import AppSpec

PANIC = re.compile(rb"^unwind: panicked at examples/counter\.rs:\d+:\d+: counter: asked to panic at count (\d+)$")
ESCAPES = 10_000


@pytest.fixture
def counters(start_daemon, built_guests):
    return start_daemon({
        "counter_unwind": {"module": built_guests["rust_counter_unwind"], "instances": "keyed"},
        "counter_abort": {"module": built_guests["rust_counter"], "instances": "keyed"},
    }, supervisor={"workers": 1})


@pytest.mark.timeout(90)
def test_panic_unwind_is_500_with_the_panic_message_and_the_count_survives(counters):
    client = counters.client()
    pid = counters.worker_pids()
    assert [client.call("counter_unwind", b"", key="alice").body for _ in range(3)] == [b"1", b"2", b"3"]
    reply = client.call("counter_unwind", b"panic", key="alice")
    assert reply.status == 500, reply
    assert PANIC.match(reply.body).group(1) == b"4", reply.body
    # the increment made before the panic is part of the state that survived
    assert client.call("counter_unwind", b"get", key="alice").body == b"4"
    assert client.call("counter_unwind", b"", key="alice").body == b"5"
    assert client.call("counter_unwind", b"get", key="bob").body == b"0"
    assert counters.worker_pids() == pid


@pytest.mark.timeout(90)
def test_after_an_unwound_panic_the_guest_is_no_longer_panicking(start_daemon, built_guests):
    # corral_exception_message rethrows the exception inside catch_unwind, which lowers
    # std's panic count; without that call thread::panicking() stays true for good
    daemon = start_daemon({"panicky": {"module": built_guests["rust_panicky_unwind"]}},
                          supervisor={"workers": 1})
    client = daemon.client()
    assert client.call("panicky", b"panicking").body == b"false"
    for _ in range(3):
        reply = client.call("panicky", b"panic")
        assert reply.status == 500 and reply.body.endswith(b": panicky: asked to panic"), reply
        assert client.call("panicky", b"panicking").body == b"false"
    assert client.call("panicky", b"tick").body == b"1"


@pytest.mark.timeout(90)
def test_panic_abort_is_502_and_the_count_starts_again(counters):
    client = counters.client()
    assert [client.call("counter_abort", b"", key="alice").body for _ in range(3)] == [b"1", b"2", b"3"]
    reply = client.call("counter_abort", b"panic", key="alice")
    assert reply.status == 502 and b"unreachable" in reply.body, reply
    assert client.call("counter_abort", b"get", key="alice").body == b"0"   # a fresh instance


@pytest.mark.timeout(120)
def test_ten_thousand_escaped_panics_through_the_daemon_all_answer_500_and_keep_the_count(counters):
    client = counters.client()
    assert client.call("counter_unwind", b"", key="k").body == b"1"
    window, sent, answered = 64, 0, 0
    pending: dict[bytes, int] = {}
    while answered < ESCAPES:
        while sent < ESCAPES and len(pending) < window:
            pending[client.send("counter_unwind", b"panic", key="k")] = sent
            sent += 1
        reply = client.recv(timeout=30)
        n = pending.pop(reply.request_id)
        match = PANIC.match(reply.body)
        assert reply.status == 500 and match, (n, reply)
        answered += 1
    # a keyed instance runs its requests one at a time in order: each panic saw its own count
    assert client.call("counter_unwind", b"get", key="k").body == str(1 + ESCAPES).encode()


@pytest.fixture(scope="module")
def engine(worker_engine):
    return worker_engine


@pytest.mark.timeout(120)
def test_ten_thousand_escaped_panics_leave_memory_size_and_stack_pointer_unchanged(engine, built_guests, tmp_path):
    path = built_guests["rust_counter_unwind"]
    module, artifact = modules.compile_cached(engine, path, tmp_path)
    app = AppSpec(name="counter", module=str(path), artifact=str(artifact), instances="keyed",
                  timeout_ms=1000, max_memory_mib=16, on_abort="reinstantiate")
    guest = Guest(engine, app, tmp_path, restart_intensity=0, restart_period_s=1.0, bounded=False,
                  module=module)

    def state():
        entry = guest.instances[b"k"]
        return entry.memory_view()[1], entry.instance.exports(entry.store)["__stack_pointer"].value(entry.store)

    assert guest.run(b"k", b"", 1000).body == b"1"
    first = guest.run(b"k", b"panic", 1000)
    assert first.status == 500 and PANIC.match(first.body), first
    before = state()
    for n in range(ESCAPES - 1):
        result = guest.run(b"k", b"panic", 1000)
        assert result.status == 500 and PANIC.match(result.body).group(1) == str(n + 3).encode(), result
    assert state() == before
    assert guest.run(b"k", b"get", 1000).body == str(1 + ESCAPES).encode()


def test_the_languages_example_config_checks(built_guests, tmp_path):
    from test_config import corral_check
    run = corral_check(Path(__file__).resolve().parent.parent / "config" / "languages.toml", tmp_path)
    assert run.returncode == 0, run.stderr
    assert "ok, 2 apps" in run.stdout
