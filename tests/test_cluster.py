"""Many hosts (docs/cluster.md) with real parts: the broker daemon in the test's namespace,
each `corral host` in a network namespace of its own on a veth pair (tests/netns.py), real
CURVE keys (corral keygen), PostgreSQL from its binaries (tests/pgserver.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from harness import FAULTS, GUESTS
from pgserver import PgServer, wait_until
from corral.config import to_toml

DURABLE = GUESTS / "counter_durable.wat"


def keygen(name: str, folder: Path) -> None:
    subprocess.run([sys.executable, "-m", "corral", "keygen", name, "--dir", str(folder)], check=True,
                   capture_output=True, timeout=60)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """Keys for a broker, its clients and hosts h1, h2 (allowed) and stranger (not)."""

    def __init__(self, root: Path):
        self.root = root
        self.keys = root / "keys"
        keygen("broker", self.keys)
        keygen("client", self.keys / "clients")
        for name in ("h1", "h2", "stranger"):
            keygen(name, self.keys / "own")
        (self.keys / "hosts").mkdir()
        for name in ("h1", "h2"):
            (self.keys / "hosts" / f"{name}.key").write_bytes((self.keys / "own" / f"{name}.key").read_bytes())
        self.port = free_port()
        self.hosts: list[subprocess.Popen] = []

    def sections(self, state: dict | None = None) -> dict:
        extra = {"security": {"curve_secret_key": str(self.keys / "broker.key_secret"),
                              "client_keys": str(self.keys / "clients")},
                 "cluster": {"listen": f"tcp://0.0.0.0:{self.port}", "host_keys": str(self.keys / "hosts")}}
        if state:
            extra["state"] = state
        return extra

    def start_host(self, namespace, name: str, workers: int = 2, dsn: str = "",
                   broker_key: str = "broker.key", notify: str = "") -> subprocess.Popen:
        folder = self.root / f"host-{name}-{len(self.hosts)}"
        folder.mkdir()
        doc = {"host": {"broker": f"tcp://{namespace.host_address}:{self.port}",
                        "broker_key": str(self.keys / broker_key),
                        "secret_key": str(self.keys / "own" / f"{name}.key_secret"), "workers": workers,
                        "cache_dir": str(self.root / f"host-cache-{name}"), "graceful_timeout_s": 3},
               "logging": {"format": "console"}}
        if dsn:
            doc["state"] = {"dsn": dsn}
        (folder / "host.toml").write_text(to_toml(doc))
        env = {**os.environ, "RUNTIME_DIRECTORY": str(folder / "run")}
        env.pop("NOTIFY_SOCKET", None)
        if notify:
            env["NOTIFY_SOCKET"] = notify
        log = open(folder / "host.log", "ab")
        process = subprocess.Popen(namespace.command([sys.executable, "-m", "corral", "host", "-c",
                                                      str(folder / "host.toml")]),
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        process.log_path = folder / "host.log"
        self.hosts.append(process)
        return process

    def logs(self) -> str:
        """The end of every host's log: what a test that waited in vain shows."""
        return "\n".join(f"--- {process.log_path.parent.name}:\n"
                         + process.log_path.read_text(errors="replace")[-1500:] for process in self.hosts)

    def wait_joined(self, daemon, counts: dict[str, int], timeout: float = 60) -> None:
        """Until each named host has that many workers linked; else fail with the hosts' logs."""
        try:
            daemon.wait_for(lambda: all(len(remote_workers(daemon, name)) == count for name, count in counts.items()),
                            timeout=timeout, what=f"the hosts' workers {counts}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def stop(self) -> list[int]:
        """Every host stopped (SIGTERM, then SIGKILL); the pids that were still left after."""
        left = []
        for process in self.hosts:
            try:
                children = psutil.Process(process.pid).children(recursive=True)
            except psutil.Error:
                children = []
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            for child in children:
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    left.append(child.pid)
                    child.kill()
        return left


@pytest.fixture
def cluster(tmp_path):
    made = Cluster(tmp_path)
    yield made
    left = made.stop()
    assert not left, f"host workers left behind: {left}"


def remote_workers(daemon, host: str) -> list[dict]:
    return [w for w in daemon.status()["workers"] if w["host"] == host and w["state"] == "ready"]


@pytest.mark.timeout(180)
def test_a_host_joins_and_serves_and_strangers_never_do(start_daemon, cluster, namespaces):
    """h1, in its own namespace, gets the spec and the modules from the broker, and its
    workers serve the echo guest and a durable counter on PostgreSQL (which the host reaches
    over its own link); a host whose key is not in host_keys, and one that speaks plain tcp
    to the cluster endpoint, never get a worker linked."""
    one, two, three = namespaces(), namespaces(), namespaces()
    server = PgServer(listen="*")
    try:
        server.start()
        database = server.create_database()
        daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"},
                               "count": {"module": DURABLE, "instances": "keyed"}},
                              supervisor={"workers": 0}, wait=False,
                              extra=cluster.sections({"backend": "postgresql", "dsn": server.dsn(database)}))
        daemon.wait_for(lambda: daemon.status()["state"] == "running", timeout=30, what="the broker")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(cluster.root / "notify.sock"))
        notify.settimeout(60)
        host = cluster.start_host(one, "h1", dsn=server.dsn(database, tcp_host=one.host_address),
                                  notify=str(cluster.root / "notify.sock"))
        stranger = cluster.start_host(two, "stranger")
        daemon.wait_for(lambda: len(remote_workers(daemon, "h1")) == 2, timeout=60,
                        what=f"h1's workers:\n{host.log_path.read_text()[-3000:]}")
        said = notify.recv(4096).decode()   # sd_notify: READY=1 once both workers joined
        assert said.startswith("READY=1") and "2 workers joined" in said, said
        notify.close()
        client = daemon.client()   # (the frontend is ipc: no client key)
        assert client.call("echo", b"over the link").body == b"over the link"
        for n in range(1, 6):
            reply = client.call("count", b"incr", key="k")
            assert (reply.status, reply.body) == (200, str(n).encode())
        assert client.call("count", b"get", key="k").body == b"5"
        workers = remote_workers(daemon, "h1")
        assert sum(w["requests"] for w in workers) == 7
        assert all(w["seccomp"] and w["landlock"] for w in workers), workers   # confined as local ones
        # A plain tcp peer: a DEALER without CURVE, speaking the worker protocol.
        plain = subprocess.run(three.command([sys.executable, "-c", _PLAIN_WORKER,
                                              f"tcp://{three.host_address}:{cluster.port}"]),
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode == 0, plain.stderr
        time.sleep(1.0)
        names = {w["host"] for w in daemon.status()["workers"]}
        assert names == {"h1"}, names   # neither the stranger nor the plain peer
        assert stranger.poll() is None and "host.broker_silent" in stranger.log_path.read_text()
    finally:
        server.destroy()


# A worker's READY over plain tcp (no CURVE): libzmq refuses the mechanism; nothing arrives.
_PLAIN_WORKER = r"""
import json, sys, time, zmq
context = zmq.Context()
socket = context.socket(zmq.DEALER)
socket.setsockopt(zmq.ROUTING_ID, b"h1:00000000/w0.1")
socket.setsockopt(zmq.LINGER, 0)
socket.connect(sys.argv[1])
socket.send(b"\x01" + json.dumps({"pid": 1, "capacity": 4, "services": ["echo"], "host": "h1"}).encode())
time.sleep(2)
socket.close()
context.term()
"""


@pytest.mark.timeout(180)
def test_a_killed_host_costs_its_requests_a_502_naming_it_and_the_other_host_serves_on(start_daemon, cluster,
                                                                                        namespaces):
    """Two hosts serve a load; h1 is SIGKILLed (its workers die with it). Its
    in-flight non-idempotent requests are answered 502 "host lost: h1" within liveness + 2 s;
    idempotent requests all end 200; h2 is unaffected."""
    one, two = namespaces(), namespaces()
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"},
                           "faults": {"module": FAULTS}},   # "slow": a quarter second of guest time
                          supervisor={"workers": 0, "heartbeat_ms": 200, "liveness": 3}, wait=False,
                          extra=cluster.sections())
    daemon.wait_for(lambda: daemon.status()["state"] == "running", timeout=30, what="the broker")
    h1 = cluster.start_host(one, "h1")
    cluster.start_host(two, "h2")
    cluster.wait_joined(daemon, {"h1": 2, "h2": 2})
    results: list[tuple[bool, int, bytes, float]] = []
    stop = threading.Event()

    def load(idempotent: bool) -> None:
        client = daemon.client()
        while not stop.is_set():
            # Non-idempotent ones run slow (so some are in flight on h1 when it dies).
            reply = client.call("echo", b"x" * 64, timeout=20, idempotent=True) if idempotent else \
                client.call("faults", b"slow", timeout=20, idempotent=False)
            results.append((idempotent, reply.status, reply.body, time.monotonic()))

    threads = [threading.Thread(target=load, args=(n % 2 == 0,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        h1.kill()
        time.sleep(0.6 + 2.0 + 1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    idempotent_bad = [(s, b) for i, s, b, _ in results if i and s != 200]
    assert not idempotent_bad, idempotent_bad[:5]
    failed = [(s, b, t) for i, s, b, t in results if not i and s != 200]
    assert failed, "no request was in flight on h1 when it was killed"
    assert all(s == 502 and b"host lost: h1" in b for s, b, _ in failed), failed[:5]
    assert all(t - killed_at <= 0.6 + 2.0 for _, _, t in failed), [t - killed_at for *_, t in failed]
    after = [s for _, s, _, t in results if t > killed_at + 2.6]
    assert after and all(s == 200 for s in after)   # h2 serves on
    assert "cluster.host_lost" in daemon.log_path.read_text()
    assert daemon.log_path.read_text().count('"cluster.host_lost"') == 1   # once, by name


@pytest.mark.timeout(240)
def test_a_paused_host_is_fenced_before_its_keys_move_and_its_late_commits_fail(start_daemon, cluster,
                                                                               namespaces):
    """Clients increment keyed durable counters (idempotent) served by h1; h1 and its workers
    are paused (SIGSTOP) mid-load. The broker declares them lost, fences the worker in the
    store, and the keys move to h2. Resumed, the old worker runs what it held and commits:
    "fenced", nothing kept. Each key's stored count equals the 200s its client got."""
    one, two = namespaces(), namespaces()
    server = PgServer(listen="*")
    try:
        server.start()
        database = server.create_database()
        daemon = start_daemon({"count": {"module": DURABLE, "instances": "keyed", "idempotent": True}},
                              supervisor={"workers": 0, "heartbeat_ms": 200, "liveness": 3}, wait=False,
                              extra=cluster.sections({"backend": "postgresql", "dsn": server.dsn(database)}))
        daemon.wait_for(lambda: daemon.status()["state"] == "running", timeout=30, what="the broker")
        h1 = cluster.start_host(one, "h1", workers=1, dsn=server.dsn(database, tcp_host=one.host_address))
        cluster.wait_joined(daemon, {"h1": 1})
        keys = [f"k{n}" for n in range(4)]
        for key in keys:   # every key placed on h1, the only worker
            assert daemon.call("count", b"incr", key=key).status == 200
        oks = dict.fromkeys(keys, 1)
        problems: list[str] = []
        stop = threading.Event()
        cluster.start_host(two, "h2", workers=1, dsn=server.dsn(database, tcp_host=two.host_address))
        cluster.wait_joined(daemon, {"h2": 1})

        def load(key: str) -> None:
            client = daemon.client()
            while not stop.is_set():
                reply = client.call("count", b"incr", key=key, timeout=30)
                if reply.status == 200:
                    oks[key] += 1
                else:
                    problems.append(f"{key}: {reply.status} {reply.body[:80]!r}")

        threads = [threading.Thread(target=load, args=(key,)) for key in keys]
        for thread in threads:
            thread.start()
        paused = [psutil.Process(h1.pid)] + psutil.Process(h1.pid).children(recursive=True)
        try:
            time.sleep(1.5)
            for process in paused:
                process.suspend()
            moved = sum(oks.values())
            daemon.wait_for(lambda: sum(oks.values()) > moved + 50, timeout=30, what="the keys served by h2")
            for process in paused:
                process.resume()
            time.sleep(3.0)   # the old worker runs what it held and tries to commit it
        finally:
            for process in paused:
                try:
                    process.resume()
                except psutil.Error:
                    pass
            stop.set()
            for thread in threads:
                thread.join(60)
        assert not problems, problems[:10]
        for key in keys:
            stored = daemon.call("count", b"get", key=key).body
            assert int(stored) == oks[key], (key, stored, oks[key])
        log = h1.log_path.read_text()
        assert "state.commit_failed" in log and "fenced" in log, log[-3000:]
        assert '"cluster.fenced"' in daemon.log_path.read_text()
    finally:
        server.destroy()


def test_the_host_unit_passes_systemd_analyze_verify(tmp_path):
    from test_systemd import INSTALLED_VENV, runnable_corral, verify
    unit = Path(__file__).resolve().parent.parent / "systemd" / "corral-host.service"
    text = unit.read_text()
    assert f"{INSTALLED_VENV}/bin/corral host " in text and "Type=notify" in text
    path = tmp_path / "corral-host.service"
    path.write_text(text.replace(f"{INSTALLED_VENV}/bin/corral ", runnable_corral() + " "))
    assert verify(path) == []


@pytest.mark.timeout(120)
def test_a_reload_that_removes_a_hosts_key_drops_its_workers(start_daemon, cluster, namespaces):
    """h1's key leaves host_keys and the broker reloads: h1's workers are dropped at once and
    stay unlinked although their connections still speak; the broker's own worker serves on."""
    one = namespaces()
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}}, supervisor={"workers": 1}, wait=False,
                          extra=cluster.sections())
    daemon.wait_ready()
    cluster.start_host(one, "h1")
    cluster.wait_joined(daemon, {"h1": 2})
    (cluster.keys / "hosts" / "h1.key").unlink()
    assert daemon.control_request("reload", timeout=60).get("ok"), daemon.log_tail()
    daemon.wait_for(lambda: not remote_workers(daemon, "h1"), timeout=10, what="h1's workers dropped")
    time.sleep(1.5)   # their heartbeats keep coming over the open connections: ignored
    assert not [w for w in daemon.status()["workers"] if w["host"] == "h1"]
    assert daemon.call("echo", b"still").body == b"still"
    assert '"cluster.host_removed"' in daemon.log_path.read_text()
