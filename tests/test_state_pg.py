"""Durable state on PostgreSQL (docs/cluster.md), beyond the rules both backends share
(tests/test_state.py runs those on each): a store that goes away and comes back under load,
and fencing, against a real server started from its binaries (tests/pgserver.py)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from pgserver import running
from test_state import KV_OPS, get, i64, incr, value_of
from corral.client import NoReply
from corral.workers import state, state_pg


@pytest.fixture
def own_pg_server():
    """A server of the test's own: the test stops and starts it."""
    with running() as server:
        yield server


@pytest.mark.timeout(120)
def test_a_store_that_goes_away_under_load_costs_503s_and_loses_nothing_answered_200(start_daemon,
                                                                                     own_pg_server):
    """The server is shut down (fast: every session cut) and started again while clients
    increment keyed counters: meanwhile requests get 503 "state unavailable" or their guest
    reads -6 (kv_ops answers 422 then); the daemon and its workers stay (no restart), serve
    again on their own once the server is back, and every counter holds at least the 200s
    its client got and at most those plus its 503s (a commit whose answer was lost)."""
    server = own_pg_server
    dsn = server.dsn(server.create_database())
    daemon = start_daemon({"kv": {"module": KV_OPS, "instances": "keyed", "timeout_ms": 2000}},
                          supervisor={"workers": 2}, extra={"state": {"backend": "postgresql", "dsn": dsn}})
    workers = set(daemon.worker_pids())
    keys = [f"k{n}" for n in range(6)]
    oks = dict.fromkeys(keys, 0)
    maybe = dict.fromkeys(keys, 0)
    statuses: dict[tuple[int, bytes], int] = {}
    problems: list[str] = []
    refused: list[str] = []
    stop = threading.Event()

    def load(key: str) -> None:
        client = daemon.client()
        while not stop.is_set():
            try:
                reply = client.call("kv", incr(b"n"), key=key, timeout=20)
            except NoReply:
                problems.append(f"{key}: no reply in 20 s")
                return
            detail = reply.body if reply.status == 503 else b""
            statuses[(reply.status, detail)] = statuses.get((reply.status, detail), 0) + 1
            if reply.status == 200:
                oks[key] += 1
                if i64(reply.body) < oks[key]:
                    problems.append(f"{key}: counted {i64(reply.body)} after {oks[key]} 200s")
            elif reply.status == 503 and reply.body in (b"state unavailable", b"state commit failed"):
                maybe[key] += 1
            elif reply.status == 422 and i64(reply.body) == state.UNAVAILABLE:
                refused.append(key)   # the guest's kv_get said -6: it answered 422, nothing written
            else:
                problems.append(f"{key}: {reply.status} {reply.body[:80]!r}")
            time.sleep(0.005)

    threads = [threading.Thread(target=load, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        before = sum(oks.values())
        server.stop("fast")
        time.sleep(2.0)
        during = sum(oks.values())
        time.sleep(0.5)
        assert sum(oks.values()) == during, "200s while the store was down"
        server.start()
        daemon.wait_for(lambda: sum(oks.values()) > during + 50, timeout=20, what="200s again after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not problems, problems[:10]
    assert before > 20, statuses
    # The outage was seen: as -6 to the guest (a read first) and, when a commit was under way as
    # the server went, as 503; which of the two a given run sees depends on timing.
    assert refused or sum(maybe.values()), statuses
    assert set(daemon.worker_pids()) == workers, "workers were restarted"
    assert daemon.process.poll() is None
    for key in keys:
        stored = struct.unpack("<q", value_of(daemon.call("kv", get(b"n"), key=key).body))[0]
        assert oks[key] <= stored <= oks[key] + maybe[key], (key, stored, oks[key], maybe[key])


def test_a_fenced_worker_commits_nothing(pg_server):
    dsn = pg_server.dsn(pg_server.create_database())
    store = state_pg.PgStore(dsn, "svc", "os", state.Limits(), 30, run="r", worker="r/w0.1")
    other = state_pg.PgStore(dsn, "svc", "os", state.Limits(), 30, run="r", worker="r/w1.1")
    for s in (store, other):
        writes = state.WriteSet(s, b"scope")
        writes.put(s.worker.encode(), b"1")
        s.stage(writes, 200, b"", b"")
        s.commit()
    state_pg.fence(dsn, "r/w0.1")
    for s in (store, other):
        writes = state.WriteSet(s, b"scope", token=7)
        writes.put(b"after " + s.worker.encode(), b"1")
        s.stage(writes, 200, b"", b"")
    with pytest.raises(state.Fenced):
        store.commit()
    other.commit()
    assert [k for _, k, _ in state_pg.export_rows(dsn, "svc")] == [b"after r/w1.1", b"r/w0.1", b"r/w1.1"]
    # A store opened again under the fenced name stays fenced: the fence is not undone.
    again = state_pg.PgStore(dsn, "svc", "os", state.Limits(), 30, run="r", worker="r/w0.1")
    writes = state.WriteSet(again, b"scope")
    writes.put(b"again", b"1")
    again.stage(writes, 200, b"", b"")
    with pytest.raises(state.Fenced):
        again.commit()
    for s in (store, other, again):
        s.close()


# A worker of its own, in a process: it commits one group whenever it reads a line, and stops
# (SIGSTOP to itself) inside the commit's transaction when told, right after the fence check.
_PAUSING_WORKER = r"""
import sys, os, signal
from corral.workers import state, state_pg
dsn, worker = sys.argv[1], sys.argv[2]
store = state_pg.PgStore(dsn, "svc", "os", state.Limits(), 30, run="r", worker=worker)
original = store.check_fence
def check_then_maybe_stop(db, cursor=None):
    original(db, cursor)
    if pause[0]:
        print("paused", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
store.check_fence = check_then_maybe_stop
pause = [False]
for line in sys.stdin:
    command, key = line.split()
    pause[0] = command == "pause"
    writes = state.WriteSet(store, b"scope")
    writes.put(key.encode(), b"1")
    store.stage(writes, 200, b"", b"")
    try:
        store.commit()
        print("committed", key, flush=True)
    except state.Fenced:
        print("fenced", key, flush=True)
    except state.ERRORS as exc:
        print("failed", key, type(exc).__name__, flush=True)
"""


@pytest.mark.timeout(60)
def test_a_worker_paused_inside_its_commit_across_the_fence_commits_nothing(pg_server):
    """The worker checked its fence (unfenced then), holds the row's share lock, and is
    stopped. The fence write waits for that lock: the server ends the silent transaction
    (idle_in_transaction_session_timeout), so the fence is written within that time, and the
    paused commit, woken afterwards, fails: its write is not there. Its next commit: fenced."""
    dsn = pg_server.dsn(pg_server.create_database())
    worker = subprocess.Popen([sys.executable, "-c", _PAUSING_WORKER, dsn, "r/w0.1"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        worker.stdin.write("commit first\n")
        assert worker.stdout.readline().split() == ["committed", "first"]
        worker.stdin.write("pause paused-write\n")
        assert worker.stdout.readline().strip() == "paused"
        started = time.monotonic()
        state_pg.fence(dsn, "r/w0.1")
        waited = time.monotonic() - started
        assert waited < state_pg.IDLE_IN_TRANSACTION_S + 3, waited
        os.kill(worker.pid, signal.SIGCONT)
        assert worker.stdout.readline().split()[:2] == ["failed", "paused-write"]
        worker.stdin.write("commit later\n")
        assert worker.stdout.readline().split() == ["fenced", "later"]
        assert [k for _, k, _ in state_pg.export_rows(dsn, "svc")] == [b"first"]
    finally:
        worker.kill()
        worker.wait(10)


@pytest.mark.timeout(60)
def test_a_commit_in_progress_finishes_before_the_fence_returns(pg_server):
    """The other order: a commit that holds its fence row when the fence comes is kept, and
    the fence returns only after it (so whatever the broker does next sees it)."""
    dsn = pg_server.dsn(pg_server.create_database())
    store = state_pg.PgStore(dsn, "svc", "os", state.Limits(), 30, run="r", worker="r/w0.1")
    assert store.open()
    connection = store.db
    with connection.transaction():
        store.check_fence(connection)     # as a commit does first
        connection.execute("INSERT INTO corral_kv VALUES ('svc', 's', 'k', 'v')")
        fenced = threading.Event()
        fencer = threading.Thread(target=lambda: (state_pg.fence(dsn, "r/w0.1"), fenced.set()))
        fencer.start()
        assert not fenced.wait(1.0), "the fence did not wait for the commit in progress"
    fencer.join(10)
    assert fenced.is_set()
    assert [k for _, k, _ in state_pg.export_rows(dsn, "svc")] == [b"k"]
    store.close()


@pytest.mark.timeout(90)
def test_a_daemon_started_while_the_store_is_down_serves_once_it_is_up(start_daemon, own_pg_server):
    """Start-up does not wait for the database: the daemon is READY, stateful requests see
    -6 (kv_ops answers 422), and the same workers serve 200 once the server is started; the
    schema is made then, by the first worker that connects."""
    server = own_pg_server
    dsn = server.dsn(server.create_database())
    server.stop("fast")
    daemon = start_daemon({"kv": {"module": KV_OPS, "instances": "keyed"}}, supervisor={"workers": 1},
                          extra={"state": {"backend": "postgresql", "dsn": dsn}})
    workers = daemon.worker_pids()
    reply = daemon.call("kv", incr(b"n"), key="a")
    assert reply.status == 422 and i64(reply.body) == state.UNAVAILABLE, reply
    server.start()
    daemon.wait_for(lambda: daemon.call("kv", incr(b"n"), key="a").status == 200, timeout=20,
                    what="a 200 once the store is up")
    assert daemon.worker_pids() == workers
    with psycopg.connect(dsn) as connection:
        assert connection.execute("SELECT version FROM corral_schema").fetchone() == (state_pg.SCHEMA_VERSION,)


@pytest.fixture
def tcp_pg_server():
    """A server of the test's own that listens on loopback TCP as well as on its unix socket."""
    with running(listen="127.0.0.1") as server:
        yield server


@pytest.mark.timeout(90)
def test_confined_workers_reach_postgresql_over_tcp(start_daemon, tcp_pg_server, tmp_path):
    """A store on another machine is a TCP connection from a confined worker (docs/confinement.md):
    the seccomp filter lets it open an inet socket and Landlock lets it connect to the store's
    port (and nothing else), and libpq reads its password file. Without those, the worker
    died of SIGSYS on its first stateful request."""
    server = tcp_pg_server
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{server.port}:*:*:unused\n")
    passfile.chmod(0o600)
    dsn = server.dsn(server.create_database(), tcp_host="127.0.0.1")
    daemon = start_daemon({"kv": {"module": KV_OPS, "instances": "keyed"}},
                          supervisor={"workers": 1, "confinement": "require"},
                          extra={"state": {"backend": "postgresql", "dsn": dsn}},
                          env={"PGPASSFILE": str(passfile)})
    workers = set(daemon.worker_pids())
    for n in range(1, 4):
        reply = daemon.call("kv", incr(b"n"), key="k")
        assert reply.status == 200 and i64(reply.body) == n, reply
    assert set(daemon.worker_pids()) == workers, "a worker died reaching the store"
    with psycopg.connect(server.dsn(dsn.split("dbname=")[1].split()[0])) as connection:
        rows = connection.execute("SELECT count(*) FROM pg_stat_activity WHERE client_addr = '127.0.0.1' "
                                  "AND application_name LIKE 'corral worker%'").fetchone()[0]
    assert rows >= 1, "the worker's session is not on TCP"


def test_reach_names_the_tcp_ports_of_a_dsn_and_none_for_unix_sockets(monkeypatch):
    for variable in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGPASSFILE"):
        monkeypatch.setenv(variable, "")   # recorded, so that what reach() sets is undone
        monkeypatch.delenv(variable)
    assert state_pg.reach("host=/run/postgresql dbname=corral")[0] == []
    assert state_pg.reach("dbname=corral")[0] == []                            # libpq's default: a socket
    assert state_pg.reach("host=db1,db2 port=6432 dbname=corral")[0] == [6432]
    assert state_pg.reach("hostaddr=10.0.0.5 dbname=corral")[0] == [5432]
    monkeypatch.setenv("PGHOST", "db.internal")
    ports, reads = state_pg.reach("dbname=corral")
    assert ports == [5432] and "/etc/resolv.conf" in reads
    assert os.environ["PGUSER"] and os.environ["PGPASSFILE"] in reads   # libpq need not ask the passwd file
