"""Operating the daemon: reload, drain, the control verbs, recycling, OS limits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import zmq

from harness import GUESTS
from corral.client import Client, NoReply

pytestmark = pytest.mark.timeout(120)


class Load:
    """Client threads sending requests continuously, recording every reply."""

    def __init__(self, daemon, service: str, clients: int = 3, in_flight: int = 4, **meta):
        self.daemon = daemon
        self.service = service
        self.meta = meta
        self.in_flight = in_flight
        self.stop = threading.Event()
        self.replies: list[tuple[bytes, int, bytes, float]] = []   # (body, status, reply body, time)
        self.problems: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(clients)]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def run(self, n: int) -> None:
        client = self.daemon.client()
        pending: dict[bytes, bytes] = {}
        i = 0
        while not self.stop.is_set() or pending:
            while not self.stop.is_set() and len(pending) < self.in_flight:
                body = b"%d-%d" % (n, i)
                pending[client.send(self.service, body, **self.meta)] = body
                i += 1
            try:
                reply = client.recv(timeout=30)
            except TimeoutError:
                self.problems.append(f"{len(pending)} requests unanswered after 30 s")
                return
            body = pending.pop(reply.request_id)
            self.replies.append((body, reply.status, reply.body, time.monotonic()))

    def failures(self) -> list:
        return [r for r in self.replies if r[1] != 200] + self.problems


# --- reload ----------------------------------------------------------------------

def test_reload_under_load_loses_nothing_and_applies_changes(start_daemon, tmp_path):
    module = tmp_path / "greeter.wat"
    module.write_text((GUESTS / "echo.wat").read_text())
    daemon = start_daemon({"greeter": {"module": module}, "echo": {"module": GUESTS / "echo.wat"}})
    before = daemon.status()
    with Load(daemon, "echo") as load:
        time.sleep(0.5)
        # Change the greeter's module (now a counter) and add an app, then SIGHUP.
        module.write_text((GUESTS / "counter.wat").read_text())
        daemon.doc["apps"]["calc"] = {"module": GUESTS / "calc.wat"}
        daemon.write_config()
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: daemon.status()["config_generation"] == 2, what="the reload to start")
        after = daemon.wait_ready(timeout=30)
        time.sleep(0.5)
    assert not load.failures(), load.failures()[:5]
    assert len(load.replies) > 200
    assert all(reply == body for body, _, reply, _ in load.replies)
    old_pids = {w["pid"] for w in before["workers"]}
    assert old_pids.isdisjoint(w["pid"] for w in after["workers"] if w["state"] == "ready")
    daemon.wait_for(lambda: old_pids.isdisjoint(w["pid"] for w in daemon.status()["workers"]),
                    what="the old workers gone")
    assert daemon.call("greeter", b"").body == b"1"          # the changed module
    assert daemon.call("calc", b'{"call": "add", "args": [1, 2]}').body == b'{"results": [3]}'
    assert any(e["event"] == "reload.done" for e in daemon.events())


def test_a_bad_config_on_reload_is_logged_and_the_old_one_keeps_serving(start_daemon):
    daemon = start_daemon()
    pids = daemon.worker_pids()
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[supervisor.oops]\n")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for(lambda: daemon.events("reload.config_invalid"), what="the reload refused")
    assert daemon.call("echo", b"still").body == b"still"
    assert daemon.worker_pids() == pids
    assert daemon.status()["config_generation"] == 1


def test_reload_removes_apps_and_answers_when_over(start_daemon):
    daemon = start_daemon()
    del daemon.doc["apps"]["calc"]
    daemon.write_config()
    # The control verb answers once every worker serves the new config: no waiting after it.
    reply = daemon.control_request("reload", timeout=60)
    assert reply == {"ok": True, "config_generation": 2}, reply
    status = daemon.status()
    serving = [w for w in status["workers"] if w["state"] == "ready"]
    assert len(serving) == 2 and all(w["config_generation"] == 2 for w in serving), status["workers"]
    assert daemon.call("calc", b'{"call": "add", "args": [1, 2]}').status == 404
    assert daemon.call("echo", b"x").status == 200


def test_reload_of_a_bad_config_answers_its_problems(start_daemon, tmp_path):
    daemon = start_daemon()
    daemon.doc["apps"]["echo"]["timeout_ms"] = "soon"       # refused when read
    daemon.write_config()
    reply = daemon.control_request("reload", timeout=60)
    assert reply["ok"] is False
    assert any("timeout_ms" in problem for problem in reply["problems"]), reply
    broken = tmp_path / "broken.wat"
    broken.write_text("(module (func $f (result i32)))")    # refused when compiled, off the loop
    daemon.doc["apps"]["echo"]["timeout_ms"] = 1000
    daemon.doc["apps"]["broken"] = {"module": broken}
    daemon.write_config()
    reply = daemon.control_request("reload", timeout=60)
    assert reply["ok"] is False
    assert any("broken.wat" in problem for problem in reply["problems"]), reply
    broken.write_text("(module (func $f unreachable) (start $f))")   # compiles; no instance can be made
    reply = daemon.control_request("reload", timeout=60)
    assert reply["ok"] is False
    assert any("[apps.broken] module: its first instance fails: abort: trap unreachable" in problem
               for problem in reply["problems"]), reply
    assert daemon.status()["config_generation"] == 1
    assert daemon.call("echo", b"still").body == b"still"


def test_reload_applies_the_broker_settings_and_judges_each_worker_by_its_own_heartbeat(start_daemon):
    apps = {"faults": {"module": GUESTS / "faults" / "faults.wat", "timeout_ms": 3000}}
    daemon = start_daemon(apps, supervisor={"heartbeat_ms": 100, "liveness": 3, "max_queue": 10000})
    daemon.doc["supervisor"].update({"heartbeat_ms": 1000, "max_queue": 1})
    daemon.write_config()
    assert daemon.control_request("reload", timeout=60)["ok"] is True
    pids = set(daemon.worker_pids())
    # Idle workers of the new config heartbeat once a second: judged by the old
    # 0.3 s liveness they would be killed as silent.
    time.sleep(3)
    assert not daemon.events("worker.killed"), daemon.events("worker.killed")
    assert set(daemon.worker_pids()) == pids
    # and the new max_queue holds: a burst beyond the workers' credit is refused at once
    client = daemon.client()
    sent = [client.send("faults", b"slow") for _ in range(2 * 2 * 16 + 8)]
    statuses = [client.wait(r, timeout=30).status for r in sent]
    assert 503 in statuses, statuses


def test_reload_moves_the_frontend_and_refuses_an_endpoint_in_use(start_daemon, tmp_path):
    daemon = start_daemon()
    old, moved, taken = daemon.frontend, f"ipc://{tmp_path}/moved.sock", f"ipc://{tmp_path}/taken.sock"
    daemon.doc["supervisor"]["frontend"] = [moved]
    daemon.write_config()
    assert daemon.control_request("reload", timeout=60)["ok"] is True
    assert Client(moved, daemon.context).call("echo", b"here", timeout=10).body == b"here"
    assert not os.path.exists(old[len("ipc://"):])     # no longer listened on
    with pytest.raises(NoReply):
        Client(old, daemon.context).call("echo", b"there", timeout=1)

    squatter = daemon.context.socket(zmq.ROUTER)       # a live listener on the next endpoint
    squatter.bind(taken)
    try:
        daemon.doc["supervisor"]["frontend"] = [moved, taken]
        daemon.write_config()
        reply = daemon.control_request("reload", timeout=60)
        assert reply["ok"] is False
        assert any(f"[supervisor] frontend endpoint {taken} is in use" in p for p in reply["problems"]), reply
        assert Client(moved, daemon.context).call("echo", b"still", timeout=10).body == b"still"
        assert daemon.status()["config_generation"] == 2
    finally:
        squatter.close(linger=0)


# --- drain -------------------------------------------------------------------------

def test_sigterm_under_load_finishes_requests_in_flight_and_exits_0(start_daemon):
    daemon = start_daemon({"faults": {"module": GUESTS / "faults" / "faults.wat", "timeout_ms": 3000},
                           "echo": {"module": GUESTS / "echo.wat"}}, supervisor={"graceful_timeout_s": 8})
    pids = daemon.worker_pids()
    client = daemon.client()
    slow = [client.send("faults", b"slow") for _ in range(4)]   # ~0.25 s each, 2 per worker
    daemon.wait_for(lambda: daemon.status()["in_flight"] >= 2, what="requests in flight")
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait_for(lambda: daemon.events("daemon.draining"), what="the drain to begin")
    refused = client.call("echo", b"late", timeout=5)
    replies = client.gather(slow, timeout=10)
    assert [r.status for r in replies.values()] == [200] * 4
    assert refused.status == 503 and b"draining" in refused.body
    assert daemon.process.wait(15) == 0
    assert time.monotonic() - started < 8
    assert not daemon.leftover_processes()
    assert {e["pid"] for e in daemon.events("worker.exited")} >= set(pids)


def test_a_drain_that_outlasts_graceful_timeout_answers_503_and_exits(start_daemon):
    daemon = start_daemon({"faults": {"module": GUESTS / "faults" / "faults.wat", "timeout_ms": 60000}},
                          supervisor={"graceful_timeout_s": 3, "workers": 1})
    client = daemon.client()
    stuck = client.send("faults", b"loop", deadline_ms=60000)
    daemon.wait_for(lambda: daemon.status()["in_flight"] == 1, what="the loop in flight")
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    reply = client.wait(stuck, timeout=10)
    assert reply.status == 503
    assert daemon.process.wait(10) == 0
    assert time.monotonic() - started < 3 + 1.5
    assert not daemon.leftover_processes()


# --- control verbs -----------------------------------------------------------------

def test_scale_up_and_down(start_daemon):
    daemon = start_daemon()
    assert daemon.control_request("scale", {"workers": 4})["ok"]
    status = daemon.wait_ready(timeout=30, workers=4)
    assert len([w for w in status["workers"] if w["state"] == "ready"]) == 4
    assert daemon.control_request("scale", {"workers": 1})["ok"]
    daemon.wait_for(lambda: len(daemon.status()["workers"]) == 1, what="scaled down to one")
    assert daemon.call("echo", b"one").body == b"one"
    assert not daemon.control_request("scale", {"workers": 0})["ok"]


def test_restart_one_worker_then_all_gracefully_under_load(start_daemon):
    daemon = start_daemon()
    first = {w["slot"]: w["pid"] for w in daemon.status()["workers"]}
    with Load(daemon, "echo") as load:
        assert daemon.control_request("restart", {"slots": [0]})["ok"]
        daemon.wait_for(lambda: {w["slot"]: w["pid"] for w in daemon.status()["workers"]
                                 if w["state"] == "ready"}.get(0) not in (None, first[0])
                        and len(daemon.status()["workers"]) == 2, what="slot 0 replaced")
        second = {w["slot"]: w["pid"] for w in daemon.status()["workers"]}
        assert second[1] == first[1]
        assert daemon.control_request("restart")["ok"]
        daemon.wait_for(lambda: len(daemon.status()["workers"]) == 2 and
                        set(w["pid"] for w in daemon.status()["workers"]).isdisjoint(second.values()),
                        what="every worker replaced")
    assert not load.failures(), load.failures()[:5]
    assert len(load.replies) > 100


def test_cli_admin_verbs(start_daemon):
    daemon = start_daemon()
    def corral(*args):
        return subprocess.run([sys.executable, "-m", "corral", *args, "-c", str(daemon.config_path)],
                              capture_output=True, text=True, timeout=30, env=daemon.env)
    scaled = corral("scale", "3")
    assert (scaled.returncode, scaled.stdout) == (0, "scaling to 3 workers\n")
    daemon.wait_ready(workers=3)
    restarted = corral("restart", "2")
    assert (restarted.returncode, restarted.stdout) == (0, "restarting the worker in slot 2, one at a time\n")
    reloaded = corral("reload")   # returns once every worker serves the new config
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout == "reloaded: every worker serves config generation 2\n"
    serving = [w for w in daemon.status()["workers"] if w["state"] == "ready"]
    assert len(serving) == 2 and all(w["config_generation"] == 2 for w in serving), serving
    failed = corral("restart", "9")
    assert failed.returncode == 1 and "slots" in failed.stderr
    daemon.doc["apps"]["echo"]["timeout_ms"] = "soon"
    daemon.write_config()
    refused = corral("reload")            # the command reads the file too: a config error, as check gives
    assert refused.returncode == 78 and "timeout_ms" in refused.stderr, refused.stderr
    broken = daemon.root / "broken.wat"
    broken.write_text("(module (func $f (result i32)))")
    daemon.doc["apps"]["echo"]["timeout_ms"] = 1000
    daemon.doc["apps"]["broken"] = {"module": broken}
    daemon.write_config()
    refused = corral("reload")            # refused by the daemon, which compiles it
    assert refused.returncode == 1 and "broken.wat" in refused.stderr, refused.stderr
    del daemon.doc["apps"]["broken"]
    daemon.doc["supervisor"]["cache_dir"] = str(daemon.root / "another-cache")
    daemon.write_config()
    warned = corral("reload")             # applied, but not all of it: said on stderr
    assert warned.returncode == 0, warned.stderr
    assert "warning:" in warned.stderr and "[supervisor] cache_dir: changed, but takes effect only on a restart" \
        in warned.stderr, warned.stderr
    assert daemon.stop() == 0
    started = time.monotonic()
    gone = corral("reload")
    assert gone.returncode == 3 and "is the daemon running?" in gone.stderr, gone.stderr
    assert time.monotonic() - started < 20   # told at once, not after reload's --timeout (120 s)


def test_control_socket_is_owner_only(shared_daemon):
    mode = os.stat(shared_daemon.control[len("ipc://"):]).st_mode & 0o777
    assert mode == 0o600


@pytest.mark.parametrize("endpoint", ["control", "frontend"])
def test_a_second_daemon_on_the_same_ipc_endpoint_refuses_to_start(start_daemon, cache_dir, endpoint):
    """libzmq would take a live ipc path over silently; the second daemon exits 69 instead."""
    from harness import Daemon
    first = start_daemon()
    taken = getattr(first, endpoint)
    assert taken.startswith("ipc://")
    second = Daemon({"echo": {"module": GUESTS / "echo.wat"}}, cache_dir, supervisor={endpoint: taken})
    try:
        second.start(wait=False)
        assert second.process.wait(30) == 69
        assert f"{endpoint} endpoint {taken} is in use" in second.log_tail()
        assert first.call("echo", b"ok").body == b"ok"
        assert first.status()["state"] == "running"
    finally:
        second.cleanup()


# --- recycling ---------------------------------------------------------------------------

def test_max_requests_recycles_workers_without_losing_requests(start_daemon):
    daemon = start_daemon(supervisor={"workers": 2, "max_requests": 50, "max_requests_jitter": 10})
    first = set(daemon.worker_pids())
    client = daemon.client()
    for batch in range(6):
        ids = {client.send("echo", b"%d-%d" % (batch, i)): b"%d-%d" % (batch, i) for i in range(40)}
        replies = client.gather(list(ids), timeout=30)
        assert all(r.status == 200 and r.body == ids[i] for i, r in replies.items())
    daemon.wait_for(lambda: first.isdisjoint(daemon.worker_pids()), what="recycled workers")
    assert any(e.get("cause") == "max_requests" for e in daemon.events("worker.retiring"))


# --- OS limits of the workers --------------------------------------------------------------

def test_workers_run_with_os_limits(start_daemon):
    daemon = start_daemon(supervisor={"max_open_files": 1000})
    for pid in daemon.worker_pids():
        status = Path(f"/proc/{pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = [line for line in limits.splitlines() if line.startswith("Max core file size")][0]
        assert core.split()[4:6] == ["0", "0"]
        files = [line for line in limits.splitlines() if line.startswith("Max open files")][0]
        assert files.split()[3:5] == ["1000", "1000"]


@pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")
def test_workers_drop_to_the_configured_user(start_daemon):
    daemon = start_daemon(supervisor={"user": "nobody"}, wait=False)
    daemon.root.chmod(0o711)   # as /run is: the user may pass through to its socket
    daemon.wait_ready()
    import pwd
    nobody = pwd.getpwnam("nobody")
    for pid in daemon.worker_pids():
        assert os.stat(f"/proc/{pid}").st_uid == nobody.pw_uid
    assert daemon.call("echo", b"as nobody").body == b"as nobody"


# --- metrics ---------------------------------------------------------------------------------

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_counts_this_tests_requests(start_daemon):
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    port = free_port()
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"},
                           "faults": {"module": GUESTS / "faults" / "faults.wat", "on_abort": "respawn"},
                           "counter": {"module": GUESTS / "counter.wat", "instances": "keyed", "max_keys": 1}},
                          extra={"metrics": {"listen": f"127.0.0.1:{port}"}})
    client = daemon.client()
    client.gather([client.send("echo", b"x") for _ in range(25)], timeout=30)
    assert client.call("faults", b"error").status == 422
    assert client.call("faults", b"unreachable").status == 502
    assert client.call("nowhere", b"").status == 404
    daemon.wait_for(lambda: [e for e in daemon.events("worker.exited") if "abort" in (e.get("cause") or "")],
                    what="the aborted worker's exit")
    daemon.wait_ready()
    for key in "abcde":  # one key per worker at most: 2 live, 3 evicted
        assert client.call("counter", b"incr", key=key).body == b"1"
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("corral_requests_total", (("service", "echo"), ("status", "200")))] == 25
    assert samples[("corral_requests_total", (("service", "faults"), ("status", "422")))] == 1
    assert samples[("corral_requests_total", (("service", "faults"), ("status", "502")))] == 1
    assert samples[("corral_rejected_total", (("status", "404"),))] == 1
    assert samples[("corral_request_duration_seconds_count", (("service", "echo"),))] == 25
    assert samples[("corral_request_duration_seconds_bucket", (("le", "+Inf"), ("service", "echo")))] == 25
    assert samples[("corral_worker_exits_total", (("cause", "abort"),))] == 1
    assert samples[("corral_circuit_open", (("service", "echo"), ("state", "closed")))] == 0
    assert samples[("corral_queue_depth", (("service", "echo"),))] == 0
    assert samples[("corral_workers", (("state", "ready"),))] >= 1
    assert samples[("corral_keys", (("service", "counter"),))] == 2
    assert samples[("corral_keys_evicted_total", (("service", "counter"),))] == 3


def test_an_address_space_limit_with_bounded_memories(start_daemon):
    # (timeout_ms: growing a bounded memory page by page to its limit copies it as it
    # grows, which takes over a second on a busy machine)
    daemon = start_daemon({"faults": {"module": GUESTS / "faults" / "faults.wat", "max_memory_mib": 64,
                                      "on_abort": "reinstantiate", "instances": "keyed",
                                      "timeout_ms": 20000}},
                          supervisor={"max_address_space_mib": 3072, "workers": 1})
    pid = daemon.worker_pids()[0]
    limits = Path(f"/proc/{pid}/limits").read_text()
    line = [l for l in limits.splitlines() if l.startswith("Max address space")][0]
    assert line.split()[3:5] == [str(3072 << 20)] * 2
    client = daemon.client()
    # 40 keyed instances: with default reservations (4 GiB+ each) they could not fit in 3 GiB.
    for key in range(40):
        assert client.call("faults", b"count", key=str(key)).body == b"1"
    assert client.call("faults", b"growsoft", key="0").status == 422
    assert client.call("faults", b"oob", key="1").status == 502
    assert daemon.worker_pids() == [pid]


def test_a_runtime_directory_owned_by_someone_else_is_refused(tmp_path, cache_dir):
    import pwd
    if os.getuid() != 0:
        pytest.skip("making a directory owned by another user needs root")
    trap = tmp_path / "run"
    trap.mkdir(mode=0o777)
    os.chown(trap, pwd.getpwnam("nobody").pw_uid, -1)
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\nfrontend = "ipc://{tmp_path}/f.sock"\ncontrol = "ipc://{tmp_path}/c.sock"\n'
                      f'cache_dir = "{cache_dir}"\n[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n')
    run = subprocess.run([sys.executable, "-m", "corral", "run", "-c", str(config)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RUNTIME_DIRECTORY": str(trap)})
    assert run.returncode == 77
    assert "belongs to uid" in run.stderr


def test_reload_moves_the_metrics_endpoint(start_daemon):
    import urllib.error
    import urllib.request
    first, second = free_port(), free_port()
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}},
                          extra={"metrics": {"listen": f"127.0.0.1:{first}"}})
    assert b"corral_requests_total" in urllib.request.urlopen(f"http://127.0.0.1:{first}/metrics", timeout=10).read()
    daemon.doc["metrics"]["listen"] = f"127.0.0.1:{second}"
    daemon.write_config()
    assert daemon.control_request("reload", timeout=60)["ok"] is True
    assert b"corral_requests_total" in urllib.request.urlopen(f"http://127.0.0.1:{second}/metrics", timeout=10).read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{first}/metrics", timeout=2)


def test_reload_applies_the_restart_budget_to_services_already_running(start_daemon):
    always_abort = GUESTS / "faults" / "always_abort.wat"
    daemon = start_daemon({"broken": {"module": always_abort, "on_abort": "reinstantiate"}},
                          restart={"intensity": 100, "period_s": 30})
    client = daemon.client()
    assert [client.call("broken", b"a%d" % i, timeout=15).status for i in range(3)] == [502] * 3
    daemon.doc["restart"]["intensity"] = 1
    daemon.write_config()
    assert daemon.control_request("reload", timeout=60)["ok"] is True
    assert client.call("broken", b"b", timeout=15).status == 502   # 4 aborts in period_s: over 1
    reply = client.call("broken", b"c", timeout=15)
    assert reply.status == 503 and b"more than 1 aborts" in reply.body, reply
