"""Durable state (docs/state.md): the write sets and commits of workers/state.py, and the real
daemon serving guests that use kv_get/kv_put/kv_delete/kv_list over real SQLite files.

guests/kv_ops.wat runs the operations a request body spells out (the builders
below); guests/counter_durable.wat is the durable keyed counter.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from base64 import b64decode, b64encode
from pathlib import Path

import pytest

from harness import GUESTS, Daemon
from corral.client import NoReply
from corral.workers import state

KV_OPS = GUESTS / "kv_ops.wat"
COUNTER = GUESTS / "counter_durable.wat"
UNAVAILABLE_503 = 503


# --- request bodies for kv_ops.wat ---------------------------------------------

def put(key: bytes, value: bytes) -> bytes:
    return b"P" + struct.pack("<H", len(key)) + key + struct.pack("<I", len(value)) + value


def get(key: bytes, cap: int = 256) -> bytes:
    return b"G" + struct.pack("<H", len(key)) + key + struct.pack("<I", cap)


def delete(key: bytes) -> bytes:
    return b"D" + struct.pack("<H", len(key)) + key


def list_keys(prefix: bytes = b"", after: bytes = b"", cap: int = 4096) -> bytes:
    return (b"L" + struct.pack("<H", len(prefix)) + prefix + struct.pack("<H", len(after)) + after
            + struct.pack("<I", cap))


def incr(key: bytes) -> bytes:
    return b"I" + struct.pack("<H", len(key)) + key


def raw(which: int, *args: int) -> bytes:
    return b"R" + bytes([which]) + struct.pack("<6I", *(list(args) + [0] * (6 - len(args))))


def end(status: int) -> bytes:
    return b"E" + bytes([status])


TRAP, SPIN, THROW = b"T", b"W", b"X"


def i32(body: bytes, at: int = 0) -> int:
    return struct.unpack_from("<i", body, at)[0]


def i64(body: bytes, at: int = 0) -> int:
    return struct.unpack_from("<q", body, at)[0]


def value_of(reply_body: bytes) -> bytes | None:
    """The reply to a lone get(): the value, or None when absent."""
    n = i64(reply_body)
    assert n >= -1, f"kv_get returned {n}"
    return None if n == -1 else reply_body[8:8 + n]


def decode_list(data: bytes) -> list[bytes]:
    keys, at = [], 0
    while at < len(data):
        (n,) = struct.unpack_from("<I", data, at)
        keys.append(data[at + 4:at + 4 + n])
        at += 4 + n
    return keys


def corral(*args: str, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral", *args], input=stdin, capture_output=True,
                          timeout=60, env={**os.environ, **(env or {})})


# --- unit: write sets, staging, commits -----------------------------------------

def test_a_write_set_reads_committed_data_under_its_own_writes(state_backend):
    store = state_backend.make_store()
    first = state.WriteSet(store, b"s", ticket=1)
    assert first.get(b"k") == state.ABSENT
    assert first.put(b"k", b"one") == 0 and first.put(b"gone", b"x") == 0
    assert first.get(b"k") == b"one"
    assert first.delete(b"gone") == 1 and first.get(b"gone") == state.ABSENT
    store.stage(first, 200, b"", b"ok")
    # A later request of the same worker sees what is staged, before it is committed.
    second = state.WriteSet(store, b"s", ticket=2)
    assert second.get(b"k") == b"one"
    assert second.put(b"k", b"two") == 0
    assert state_backend.rows(None, "svc") == {}           # nothing committed yet
    store.stage(second, 200, b"", b"ok")
    assert len(store.commit()) == 2                        # one transaction for both
    assert state_backend.rows(None, "svc") == {(b"s", b"k"): b"two"}
    assert state_backend.stats(None, "svc") == {"commits": 2, "rollbacks": 0, "bytes": 4, "scopes": 1}
    dropped = state.WriteSet(store, b"s", ticket=3)
    assert dropped.put(b"k", b"three") == 0
    store.discard(dropped)
    assert state_backend.rows(None, "svc") == {(b"s", b"k"): b"two"}
    store.close()
    assert state_backend.stats(None, "svc")["rollbacks"] == 1


def test_list_merges_committed_staged_and_own_keys_bytewise(state_backend):
    store = state_backend.make_store()
    committed = state.WriteSet(store, b"s")
    for key in (b"a", b"a\x00", b"ab", b"b", b"a\xff", b"a\xff\xff"):
        committed.put(key, b"v")
    other = state.WriteSet(store, b"t")
    other.put(b"a-other-scope", b"v")
    store.stage(committed, 200, b"", b"")
    store.stage(other, 200, b"", b"")
    store.commit()
    staged = state.WriteSet(store, b"s")
    staged.put(b"aa", b"v")
    staged.delete(b"ab")
    store.stage(staged, 200, b"", b"")
    own = state.WriteSet(store, b"s")
    own.put(b"a\x01", b"v")
    own.delete(b"b")
    assert decode_list(own.list(b"", b"", 4096)) == [b"a", b"a\x00", b"a\x01", b"aa", b"a\xff", b"a\xff\xff"]
    assert decode_list(own.list(b"a", b"a\x00", 4096)) == [b"a\x01", b"aa", b"a\xff", b"a\xff\xff"]
    assert decode_list(own.list(b"a\xff", b"", 4096)) == [b"a\xff", b"a\xff\xff"]
    assert decode_list(own.list(b"", b"", 4 + 1 + 4 + 2)) == [b"a", b"a\x00"]   # whole keys only
    assert own.list(b"a\x00", b"", 4) == state.NO_ROOM
    assert own.list(b"zzz", b"", 4096) == b""


def test_limits_give_their_codes_and_a_delete_makes_room(state_backend):
    store = state_backend.make_store(max_key_bytes=8, max_value_bytes=10, max_scope_bytes=30)
    writes = state.WriteSet(store, b"s")
    assert writes.put(b"", b"v") == state.BAD_KEY
    assert writes.put(b"123456789", b"v") == state.BAD_KEY
    assert writes.get(b"") == state.BAD_KEY and writes.delete(b"") == state.BAD_KEY
    assert writes.put(b"k", b"x" * 11) == state.TOO_LARGE
    assert writes.put(b"k1", b"x" * 10) == 0 and writes.put(b"k2", b"x" * 10) == 0    # 24 bytes
    assert writes.put(b"k3", b"x" * 10) == state.OVER_QUOTA
    store.stage(writes, 200, b"", b"")
    store.commit()
    later = state.WriteSet(store, b"s")
    assert later.put(b"k3", b"x" * 10) == state.OVER_QUOTA     # the committed bytes count
    assert later.put(b"k1", b"") == 0                          # shrinking is always allowed
    assert later.put(b"k3", b"x" * 10) == 0
    assert state.WriteSet(store, b"other").put(b"k3", b"x" * 10) == 0   # quotas are per scope


def test_a_read_of_staged_writes_is_noted(state_backend):
    """A request that read what an earlier one staged shares that one's fate: if the group
    commit fails, the reader's reply is 503 too (workers/loop.py)."""
    store = state_backend.make_store()
    writer = state.WriteSet(store, b"s")
    writer.put(b"k", b"v")
    store.stage(writer, 200, b"", b"")
    reader = state.WriteSet(store, b"s")
    assert reader.get(b"other") == state.ABSENT and not reader.saw_staged
    assert reader.get(b"k") == b"v" and reader.saw_staged
    lister = state.WriteSet(store, b"s")
    assert decode_list(lister.list(b"", b"", 100)) == [b"k"] and lister.saw_staged
    assert not state.WriteSet(store, b"t").saw_staged


def test_a_commit_that_fails_keeps_nothing(state_backend):
    store = state_backend.make_store()
    writes = state.WriteSet(store, b"s")
    writes.put(b"k", b"v")
    store.stage(writes, 200, b"", b"")
    with state_backend.blocker(None, "svc") as lock:
        lock.hold()        # another writer holds the lock past the busy timeout
        with pytest.raises(state.ERRORS):
            store.commit()
        lock.release()
    assert state_backend.rows(None, "svc") == {}
    assert store.staged == [] and store.overlay == {}
    assert state.WriteSet(store, b"s").get(b"k") == state.ABSENT


def test_a_damaged_state_file_is_named(tmp_path):
    path = tmp_path / "svc.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(state.StateProblem, match=str(path)):
        state.check_file(path, create=True)


# --- the daemon ------------------------------------------------------------------

def kv_apps(**overrides) -> dict:
    app = {"module": KV_OPS, "timeout_ms": 500, "on_abort": "reinstantiate"}
    app.update(overrides)
    return {"kv": app}


@pytest.mark.timeout(90)
def test_writes_commit_on_200_and_422_and_nothing_is_kept_on_500_502_504(start_daemon, state_backend):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = start_daemon(kv_apps(), restart={"intensity": 1000},
                          extra={"metrics": {"listen": f"127.0.0.1:{port}"}, **state_backend.extra})
    db = lambda: state_backend.rows(daemon, "kv")
    assert daemon.call("kv", put(b"ok", b"1")).status == 200
    assert daemon.call("kv", put(b"guest-error", b"1") + end(1)).status == 422
    assert daemon.call("kv", put(b"unwind", b"1") + end(2)).status == 500
    assert daemon.call("kv", put(b"exception", b"1") + THROW).status == 500
    assert daemon.call("kv", put(b"abort", b"1") + TRAP).status == 502
    assert daemon.call("kv", put(b"deadline", b"1") + SPIN).status == 504
    assert {k for _, k in db()} == {b"ok", b"guest-error"}
    reply = daemon.call("kv", get(b"ok") + get(b"abort"))
    assert reply.status == 200 and reply.body[8:] == b"1" + struct.pack("<q", -1)
    stats = next(s for s in daemon.status()["services"] if s["name"] == "kv")["state"]
    assert stats["commits"] == 2 and stats["bytes"] == len(b"ok1guest-error1")
    assert stats["rollbacks"] == 4   # the 500s, 502 and 504 (reinstantiate: the worker stays and tells)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'corral_state_commits_total{service="kv"} 2' in metrics
    assert 'corral_state_rollbacks_total{service="kv"} 4' in metrics
    assert f'corral_state_bytes{{service="kv"}} {len(b"ok1guest-error1")}' in metrics


@pytest.mark.timeout(60)
def test_a_write_is_lost_when_the_worker_is_killed_while_the_guest_still_runs(start_daemon, state_backend):
    daemon = start_daemon(kv_apps(timeout_ms=20_000), supervisor={"workers": 1}, extra=state_backend.extra)
    db = lambda: state_backend.rows(daemon, "kv")
    client = daemon.client()
    assert client.call("kv", put(b"before", b"1")).status == 200
    pid = daemon.worker_pids()[0]
    request = client.send("kv", put(b"doomed", b"1") + SPIN)
    daemon.wait_for(lambda: next(w for w in daemon.status()["workers"] if w["pid"] == pid)["in_flight"],
                    what="the spinning request on the worker")
    time.sleep(0.3)   # the put is done, the guest spins
    os.kill(pid, signal.SIGKILL)
    reply = client.wait(request, timeout=10)
    assert reply.status == 502 and b"signal 9" in reply.body
    assert {k for _, k in db()} == {b"before"}
    daemon.wait_ready()
    assert value_of(daemon.call("kv", get(b"doomed")).body) is None


@pytest.mark.timeout(60)
def test_replies_wait_for_their_commit(start_daemon, state_backend):
    """The output gate. While another writer holds the database's write lock the worker cannot
    commit, so no reply may leave: killed then, the request's write is gone and its client got
    no 200; let go, the reply comes with its write in the file; held past the busy timeout
    (5 s, the worker heartbeating meanwhile), the commit fails and the reply is 503."""
    daemon = start_daemon(kv_apps(), supervisor={"workers": 1}, extra=state_backend.extra)
    db = lambda: state_backend.rows(daemon, "kv")
    client = daemon.client()
    assert client.call("kv", put(b"first", b"1")).status == 200
    with state_backend.blocker(daemon, "kv") as blocker:
        blocker.hold()
        request = client.send("kv", put(b"killed", b"1"))
        with pytest.raises(NoReply):
            client.wait(request, timeout=1.0)
        os.kill(daemon.worker_pids()[0], signal.SIGKILL)
        assert client.wait(request, timeout=10).status == 502
        blocker.release()
        daemon.wait_ready()

        blocker.hold()
        request = client.send("kv", put(b"waited", b"1"))
        with pytest.raises(NoReply):
            client.wait(request, timeout=1.0)
        blocker.release()
        assert client.wait(request, timeout=10).status == 200
        assert {k for _, k in db()} == {b"first", b"waited"}

        blocker.hold()
        reply = client.call("kv", put(b"refused", b"1"), timeout=state.BUSY_TIMEOUT_MS / 1000 + 10)
        blocker.release()
        assert reply.status == UNAVAILABLE_503 and reply.body == b"state commit failed"
        assert {k for _, k in db()} == {b"first", b"waited"}


@pytest.mark.timeout(120)
def test_a_durable_counter_goes_on_after_trap_kill_and_daemon_restart(start_daemon, state_backend):
    daemon = start_daemon({"counter": {"module": COUNTER, "instances": "keyed"}},
                          restart={"intensity": 1000}, extra=state_backend.extra)
    keys = [f"k{i}" for i in range(6)] + ["a", "a\x00", "a/b"]
    answered = {key: 0 for key in keys}
    client = daemon.client()
    for round_ in range(5):
        pending = {client.send("counter", b"incr", key=key): key for key in keys}
        for request, key in pending.items():
            reply = client.wait(request, timeout=10)
            assert reply.status == 200
            answered[key] += 1
            assert int(reply.body) == answered[key]
    assert client.call("counter", b"trap", key="k0").status == 502        # the add is not kept
    assert client.call("counter", b"throw", key="k0").status == 500
    assert int(client.call("counter", b"incr", key="k0").body) == answered["k0"] + 1
    answered["k0"] += 1
    old = set(daemon.worker_pids())
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    daemon.wait_for(lambda: len(set(daemon.worker_pids()) - old) == 2, what="new workers")
    assert int(daemon.call("counter", b"incr", key="k1").body) == answered["k1"] + 1
    answered["k1"] += 1
    daemon.stop(signal.SIGKILL)
    daemon.start()
    for key in keys:
        reply = daemon.call("counter", b"get", key=key)
        assert reply.status == 200 and int(reply.body) == answered[key], key


def token(scope: str) -> bytes:
    return hashlib.sha256(scope.encode()).hexdigest().encode()


@pytest.mark.timeout(90)
def test_no_key_bytes_reach_another_scope(start_daemon, state_backend):
    daemon = start_daemon({"kv": {"module": KV_OPS, "instances": "keyed", "max_state_key_bytes": 65535}},
                          extra=state_backend.extra)
    scopes = ["a", "a\x00", "a\x00b", "ab", "a/b", "b", "%", "\u00e9", "x" * 65535, "x" * 65534]
    client = daemon.client()
    for scope in scopes:
        body = put(b"k", token(scope)) + put(b"own " + scope.encode()[:10], b"1")
        assert client.call("kv", body, key=scope).status == 200
    for scope in scopes:
        reply = client.call("kv", get(b"k") + list_keys(b"", b"", 8192), key=scope)
        assert reply.status == 200
        assert value_of(reply.body) == token(scope)
        listed = reply.body[8 + len(token(scope)) + 8:]
        assert decode_list(listed) == sorted([b"k", b"own " + scope.encode()[:10]])
    # State keys are arbitrary bytes too, up to max_state_key_bytes, and never collide.
    big = b"\x00" * 65535
    body = put(big, b"zeros") + put(big[:-1], b"one less") + put(b"\x00", b"nul")
    assert client.call("kv", body, key="keys").status == 200
    reply = client.call("kv", get(big), key="keys")
    assert value_of(reply.body) == b"zeros"
    reply = client.call("kv", get(big[:-1]), key="keys")
    assert value_of(reply.body) == b"one less"
    assert value_of(client.call("kv", get(b"\x00"), key="other").body) is None


@pytest.mark.timeout(90)
def test_limits_return_their_codes_and_the_guest_decides(start_daemon, state_backend):
    daemon = start_daemon(kv_apps(max_state_mib=1, max_state_value_kib=128, max_state_key_bytes=16),
                          extra=state_backend.extra)
    reply = daemon.call("kv", put(b"", b"v") + put(b"k" * 17, b"v") + put(b"k" * 16, b"v")
                        + put(b"big", b"x" * (128 * 1024 + 1)))
    assert reply.status == 200
    assert [i32(reply.body, 4 * n) for n in range(4)] == [state.BAD_KEY, state.BAD_KEY, 0, state.TOO_LARGE]
    reply = daemon.call("kv", put(b"fits", b"x" * 128 * 1024) + get(b"") + delete(b"") + delete(b"absent")
                        + delete(b"k" * 16))
    assert reply.status == 200 and i32(reply.body) == 0 and i64(reply.body, 4) == state.BAD_KEY
    assert [i32(reply.body, 12 + 4 * n) for n in range(3)] == [state.BAD_KEY, 0, 1]
    results = []
    for n in range(9):   # 128 KiB each: with "fits", six fit in the MiB, the rest do not
        reply = daemon.call("kv", put(b"v%d" % n, b"x" * 128 * 1024))
        results.append(i32(reply.body))
    assert results == [0] * 6 + [state.OVER_QUOTA] * 3, results
    reply = daemon.call("kv", delete(b"v0") + put(b"v6", b"x" * 128 * 1024))   # a delete makes room
    assert (i32(reply.body), i32(reply.body, 4)) == (1, 0)
    reply = daemon.call("kv", get(b"fits", cap=4))   # too small a buffer: the length, nothing copied
    assert i64(reply.body) == 128 * 1024 and len(reply.body) == 8


@pytest.mark.timeout(90)
def test_out_of_bounds_buffers_are_aborts_and_keep_nothing(start_daemon, state_backend):
    daemon = start_daemon(kv_apps(), restart={"intensity": 1000}, extra=state_backend.extra)
    memory = 8 * 65536
    cases = [
        raw(0, memory - 1, 2, 0, 8),          # kv_get: key past the end
        raw(0, 0, 1, memory, 1),              # kv_get: value buffer past the end
        raw(0, 0, 1, memory + 5, 0),          # ... even with cap 0, nothing to copy
        raw(1, 0xFFFFFFF0, 32, 0, 1),         # kv_put: key wraps around 2^32
        raw(1, 0, 1, memory - 2, 3),          # kv_put: value past the end
        raw(2, memory, 1),                    # kv_delete
        raw(3, memory + 1, 0, 0, 0, 0, 16),   # kv_list: prefix pointer past the end, length 0
        raw(3, 0, 0, memory, 2, 0, 16),       # kv_list: after
        raw(3, 0, 0, 0, 0, memory - 8, 16),   # kv_list: output buffer
    ]
    for body in cases:
        reply = daemon.call("kv", put(b"written-first", b"1") + body)
        assert reply.status == 502 and b"ABI violation" in reply.body, (body, reply)
    assert state_backend.rows(daemon, "kv") == {}
    reply = daemon.call("kv", raw(0, 0, 1, memory - 8, 8))   # in bounds: an absent key
    assert reply.status == 200 and i64(reply.body) == state.ABSENT


@pytest.mark.timeout(90)
@pytest.mark.parametrize("idempotent", [True, False])
def test_a_retry_after_a_commit_is_answered_from_the_record(start_daemon, tmp_path, idempotent, state_backend):
    """The worker dies after its commit and before its reply. Idempotent: the retry finds the
    token and answers what the first attempt answered, without applying it again. Not
    idempotent: 502, and the write was applied ("may have been applied")."""
    flag = tmp_path / "kill-after-commit"
    daemon = start_daemon({"kv": {"module": KV_OPS, "instances": "keyed"}},
                          env={"CORRAL_TEST_KILL_AFTER_COMMIT": str(flag),
                               "PYTHONPATH": str(Path(__file__).parent / "hooks")}, extra=state_backend.extra)
    client = daemon.client()
    assert i64(client.call("kv", incr(b"n"), key="c").body) == 1
    flag.touch()
    reply = client.call("kv", incr(b"n"), key="c", idempotent=idempotent, timeout=20)
    assert not flag.exists(), "the worker did not commit"
    if idempotent:
        assert reply.status == 200 and i64(reply.body) == 2
    else:
        assert reply.status == 502 and b"signal 9" in reply.body
    daemon.wait_ready()
    assert value_of(client.call("kv", get(b"n"), key="c").body) == struct.pack("<q", 2)


@pytest.mark.chaos
@pytest.mark.timeout(180)
def test_chaos_every_counter_equals_its_200_replies(start_daemon, state_backend):
    """Clients increment keyed counters with idempotent requests while workers are SIGKILLed and
    guests abort at random: no commit is lost and none is applied twice."""
    daemon = start_daemon({"kv": {"module": KV_OPS, "instances": "keyed", "timeout_ms": 2000,
                                  "state_durability": "os"}},
                          supervisor={"workers": 3}, restart={"intensity": 100000, "period_s": 1},
                          extra=state_backend.extra)
    clients, keys_per_client, in_flight, seconds = 3, 4, 6, 15
    stop = threading.Event()
    oks: dict[str, int] = {}
    problems: list[str] = []
    killed: list[int] = []

    def load(n: int) -> None:
        client = daemon.client()
        keys = [f"c{n}-{i}" for i in range(keys_per_client)]
        for key in keys:
            oks[key] = 0
        pending: dict[bytes, tuple[str, bool]] = {}
        while not stop.is_set() or pending:
            while not stop.is_set() and len(pending) < in_flight:
                key = random.choice(keys)
                aborts = random.random() < 0.1
                body = incr(b"n") + (TRAP if aborts else b"")
                pending[client.send("kv", body, key=key, idempotent=True)] = (key, aborts)
            try:
                reply = client.recv(timeout=30)
            except NoReply:
                problems.append(f"client {n}: {len(pending)} requests got no reply in 30 s")
                return
            key, aborts = pending.pop(reply.request_id)
            if reply.status == 200:
                if aborts:
                    problems.append(f"{key}: an aborting request got 200")
                oks[key] += 1
            elif reply.status != 502 or not aborts:
                problems.append(f"{key}: {reply.status} {reply.body[:100]!r} (aborts: {aborts})")

    def killer() -> None:
        while not stop.wait(0.7):
            pids = daemon.worker_pids()
            if pids:
                victim = random.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=load, args=(n,)) for n in range(clients)]
    threads.append(threading.Thread(target=killer))
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a chaos thread is stuck"
    assert not problems, problems[:10]
    assert len(killed) >= 5, killed
    assert sum(oks.values()) > 200, oks
    daemon.wait_ready()
    durable = {}
    for key in oks:
        got = value_of(daemon.call("kv", get(b"n"), key=key).body)
        durable[key] = 0 if got is None else struct.unpack("<q", got)[0]
    assert durable == oks


@pytest.mark.timeout(90)
def test_export_import_and_backup_while_serving(start_daemon, tmp_path, state_backend):
    daemon = start_daemon({"kv": {"module": KV_OPS, "instances": "keyed"},
                           "copy": {"module": KV_OPS, "instances": "keyed"}}, extra=state_backend.extra)
    for scope in ("alice", "bob"):
        assert daemon.call("kv", put(b"name", scope.encode()) + put(b"\x00bin", b"\xff\x00"),
                           key=scope).status == 200
    config = str(daemon.config_path)
    exported = corral("state", "export", "kv", "-c", config)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert {(b64decode(l["scope"]), b64decode(l["key"]), b64decode(l["value"])) for l in lines} == {
        (b"alice", b"name", b"alice"), (b"alice", b"\x00bin", b"\xff\x00"),
        (b"bob", b"name", b"bob"), (b"bob", b"\x00bin", b"\xff\x00")}
    only_bob = corral("state", "export", "kv", "bob", "-c", config)
    assert {json.loads(l)["scope"] for l in only_bob.stdout.splitlines()} == {b64encode(b"bob").decode()}
    imported = corral("state", "import", "copy", "-c", config, stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    reply = daemon.call("copy", get(b"name"), key="alice")
    assert value_of(reply.body) == b"alice"
    bad = corral("state", "import", "copy", "-c", config, stdin=b'{"scope": "YQ==", "key": ""}\n')
    assert bad.returncode != 0 and b"line 1" in bad.stderr

    # The backup is taken while a client keeps writing: each copy is a consistent database.
    stop = threading.Event()

    def writer() -> None:
        client = daemon.client()
        n = 0
        while not stop.is_set():
            client.call("kv", incr(b"n"), key="busy")
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.3)
    backup = corral("state", "backup", str(tmp_path / "backup"), "-c", config)
    stop.set()
    thread.join(30)
    assert backup.returncode == 0, backup.stderr
    if state_backend.name == "sqlite":
        copy = tmp_path / "backup" / "kv.sqlite3"
        connection = sqlite3.connect(copy)
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        entries = [(bytes(s), bytes(k), bytes(v)) for s, k, v in connection.execute("SELECT scope, key, value FROM kv")]
        connection.close()
        assert (tmp_path / "backup" / "copy.sqlite3").exists()
    else:   # a consistent export: JSON lines as `export` writes, one file per service
        lines = (tmp_path / "backup" / "kv.jsonl").read_text().splitlines()
        entries = [tuple(b64decode(json.loads(l)[n]) for n in ("scope", "key", "value")) for l in lines]
        assert (tmp_path / "backup" / "copy.jsonl").exists()
        again = corral("state", "import", "copy", "-c", config, stdin="\n".join(lines).encode())
        assert again.returncode == 0, again.stderr
    copied = {s: v for s, k, v in entries if k == b"name"}
    assert copied == {b"alice": b"alice", b"bob": b"bob"}
    busy = [v for s, k, v in entries if s == b"busy"]
    assert len(busy) == 1 and struct.unpack("<q", busy[0])[0] > 0


@pytest.mark.timeout(60)
def test_a_corrupt_state_file_stops_start_up_and_check_naming_it(cache_dir):
    daemon = Daemon(kv_apps(), cache_dir)
    try:
        bad = state.database_path(daemon.root / "state" / "default", "kv")   # its cordon's (docs/confinement.md)
        bad.parent.mkdir(mode=0o700, parents=True)
        bad.write_bytes(b"garbage" * 1000)
        checked = corral("check", "-c", str(daemon.config_path))
        assert checked.returncode == 78 and str(bad).encode() in checked.stderr, checked.stderr
        daemon.start(wait=False)
        assert daemon.process.wait(30) == 78
        assert str(bad) in daemon.log_path.read_text()
    finally:
        assert not daemon.cleanup()


def test_check_refuses_other_imports_from_corral(tmp_path):
    guest = tmp_path / "bad.wat"
    guest.write_text('(module (import "corral" "kv_scan" (func (param i32 i32) (result i32))))')
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\ncache_dir = "{tmp_path / "cache"}"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[apps.bad]\nmodule = "{guest}"\n')
    checked = corral("check", "-c", str(config))
    assert checked.returncode == 78 and b"corral.kv_scan" in checked.stderr, checked.stderr
    assert not (tmp_path / "state").exists()


def test_an_idempotent_request_is_re_dispatched_only_once_its_worker_is_reaped(tmp_path):
    """Declared gone (heartbeat lost, rss limit, unreachable) is not gone: until the process is
    reaped it may still commit, so its idempotent requests wait; then they go out with their
    token and the REDELIVERED flag."""
    from test_broker import HandWorker, start_broker
    from corral.wire.protocol import REDELIVERED, Dialect, iter_request_records
    context, broker, backend = start_broker(tmp_path, {"kv": {"module": KV_OPS}})
    try:
        first = HandWorker(context, broker, backend, capacity=4, identity=b"w0.1", service="kv")
        now = time.monotonic()
        broker.core.enqueue(b"client", Dialect.NATIVE, b"r1", broker.core.services[b"kv"], None, incr(b"n"),
                       now + 30, True, now, False)
        broker.dispatch()
        [(ticket, _, _, _, _, token, flags)] = iter_request_records(first.socket.recv())
        assert token == ticket and flags == 0
        second = HandWorker(context, broker, backend, capacity=4, identity=b"w1.1", service="kv")
        broker.worker_gone(b"w0.1", "heartbeat lost")
        broker.dispatch()
        assert not second.socket.poll(300), "re-dispatched while the old worker may still commit"
        assert ticket in broker.core.ledger
        broker.worker_gone(b"w0.1", "killed by signal 9", reaped=True)
        broker.dispatch()
        assert second.socket.poll(2000)
        [(again, _, _, _, _, token, flags)] = iter_request_records(second.socket.recv())
        assert (again, token, flags) == (ticket, ticket, REDELIVERED)
    finally:
        broker.close()
        context.destroy(linger=0)
