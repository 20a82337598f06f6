"""Rust and C guests, built from source, served by the real daemon."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def guests_daemon(start_daemon, built_guests):
    return start_daemon({
        "rust_echo": {"module": built_guests["rust_echo"]},
        "rust_kv": {"module": built_guests["rust_kv"], "instances": "keyed"},
        "rust_panicky": {"module": built_guests["rust_panicky"], "on_abort": "reinstantiate"},
        "c_echo": {"module": built_guests["c_echo"]},
        "c_aborts": {"module": built_guests["c_aborts"], "on_abort": "reinstantiate"},
    }, supervisor={"workers": 1})


@pytest.mark.parametrize("service", ["rust_echo", "c_echo"])
def test_echo_round_trips_bytes_exactly(guests_daemon, service):
    for body in (b"", b"\xff", os.urandom(1 << 20)):
        reply = guests_daemon.call(service, body, timeout=30)
        assert reply.status == 200
        assert reply.body == body


def test_rust_key_value_store_keeps_its_data_across_requests(guests_daemon):
    client = guests_daemon.client()
    assert client.call("rust_kv", b"set colour blue", key="alice").status == 200
    assert client.call("rust_kv", b"set size 42", key="alice").status == 200
    assert client.call("rust_kv", b"set colour red", key="bob").status == 200
    assert client.call("rust_kv", b"get colour", key="alice").body == b"blue"
    assert client.call("rust_kv", b"get colour", key="bob").body == b"red"
    assert client.call("rust_kv", b"keys", key="alice").body == b"colour\nsize"
    missing = client.call("rust_kv", b"get shape", key="alice")
    assert missing.status == 422 and b"shape" in missing.body


def test_rust_panic_with_panic_abort_is_502_and_the_next_request_gets_a_fresh_instance(guests_daemon):
    client = guests_daemon.client()
    assert [client.call("rust_panicky", b"tick").body for _ in range(3)] == [b"1", b"2", b"3"]
    reply = client.call("rust_panicky", b"panic")
    assert reply.status == 502 and b"unreachable" in reply.body
    assert client.call("rust_panicky", b"tick").body == b"1"


def test_c_abort_is_502(guests_daemon):
    client = guests_daemon.client()
    assert client.call("c_aborts", b"tick").body == b"1"
    reply = client.call("c_aborts", b"abort")
    assert reply.status == 502 and b"unreachable" in reply.body
    assert client.call("c_aborts", b"tick").body == b"1"
    assert client.call("c_aborts", b"div0").status == 502


def test_rust_counter_panic_respawns_the_worker_and_a_fresh_instance_serves(start_daemon, built_guests):
    """The fault model's Rust guest: Debian's rustc is panic=abort, so a panic is an abort."""
    daemon = start_daemon({"counter": {"module": built_guests["rust_counter"]}}, supervisor={"workers": 1})
    client = daemon.client()
    pid = daemon.worker_pids()[0]
    assert [client.call("counter", b"incr").body for _ in range(2)] == [b"1", b"2"]
    reply = client.call("counter", b"panic")
    assert reply.status == 502 and b"unreachable" in reply.body
    assert client.call("counter", b"incr").body == b"1"
    assert daemon.worker_pids() != [pid]
