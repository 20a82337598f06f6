"""The request path end to end: real daemon, real worker processes, real ZeroMQ sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from harness import GUESTS

pytestmark = pytest.mark.timeout(60)


def test_native_echo_round_trip(shared_daemon):
    reply = shared_daemon.call("echo", b"hello")
    assert (reply.status, reply.body) == (200, b"hello")


def test_echo_keeps_bytes_exact(shared_daemon):
    for body in (b"", b"\x00", bytes(range(256)) * 4096):
        reply = shared_daemon.call("echo", body)
        assert reply.status == 200
        assert reply.body == body


def test_mdp_client_written_from_the_spec(shared_daemon):
    """rfc 18/MDP client: DEALER, [MDPC02, 0x01, service, body] -> [MDPC02, 0x03, service, status, body]."""
    socket = shared_daemon.context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(shared_daemon.frontend)
    try:
        socket.send_multipart([b"MDPC02", b"\x01", b"echo", b"over MDP"])
        assert socket.poll(5000), "no MDP reply"
        assert socket.recv_multipart() == [b"MDPC02", b"\x03", b"echo", b"200", b"over MDP"]
    finally:
        socket.close()


def test_mdp_framing_with_delimiter_from_a_req_socket(shared_daemon):
    """The other framing in the wild: ["", MDPC02, 0x02, service, body] -> ["", MDPC02, 0x04, status, body]."""
    socket = shared_daemon.context.socket(zmq.REQ)  # REQ adds and strips the empty delimiter
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(shared_daemon.frontend)
    try:
        socket.send_multipart([b"MDPC02", b"\x02", b"echo", b"legacy"])
        assert socket.poll(5000), "no MDP reply"
        assert socket.recv_multipart() == [b"MDPC02", b"\x04", b"200", b"legacy"]
    finally:
        socket.close()


def test_mmi_service_answers_whether_a_service_exists(shared_daemon):
    socket = shared_daemon.context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(shared_daemon.frontend)
    try:
        socket.send_multipart([b"MDPC02", b"\x01", b"mmi.service", b"echo"])
        assert socket.poll(5000)
        assert socket.recv_multipart() == [b"MDPC02", b"\x03", b"mmi.service", b"200", b"200"]
        socket.send_multipart([b"MDPC02", b"\x01", b"mmi.service", b"nothing-here"])
        assert socket.poll(5000)
        assert socket.recv_multipart() == [b"MDPC02", b"\x03", b"mmi.service", b"404", b"404"]
    finally:
        socket.close()


def test_mdp_client_sends_the_key_as_a_body_frame(shared_daemon):
    socket = shared_daemon.context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(shared_daemon.frontend)
    try:
        counts = []
        for _ in range(3):
            socket.send_multipart([b"MDPC02", b"\x01", b"counter", b"mdp-key", b"incr"])
            assert socket.poll(5000)
            frames = socket.recv_multipart()
            assert frames[:4] == [b"MDPC02", b"\x03", b"counter", b"200"]
            counts.append(int(frames[4]))
        assert counts == [counts[0], counts[0] + 1, counts[0] + 2]
        socket.send_multipart([b"MDPC02", b"\x01", b"counter", b"incr"])  # no key frame
        assert socket.poll(5000)
        assert socket.recv_multipart()[3] == b"400"
    finally:
        socket.close()


def test_plain_module_numeric_exports(shared_daemon):
    reply = shared_daemon.call("calc", json.dumps({"call": "add", "args": [2, 40]}).encode())
    assert (reply.status, json.loads(reply.body)) == (200, {"results": [42]})
    reply = shared_daemon.call("calc", json.dumps({"call": "hypot", "args": [3, 4]}).encode())
    assert json.loads(reply.body) == {"results": [5.0]}
    reply = shared_daemon.call("calc", b'{"call": "missing"}')
    assert reply.status == 400 and b"missing" in reply.body


def test_500_concurrent_requests_from_several_clients_each_get_their_own_reply(shared_daemon):
    clients = [shared_daemon.client() for _ in range(5)]
    sent = {}
    for c, client in enumerate(clients):
        for i in range(100):
            body = f"client {c} request {i}".encode()
            sent[(c, client.send("echo", body))] = body
    for c, client in enumerate(clients):
        ids = [i for (cc, i) in sent if cc == c]
        replies = client.gather(ids, timeout=30)
        for request_id, reply in replies.items():
            assert reply.status == 200
            assert reply.body == sent[(c, request_id)], "a reply crossed to another request"
    assert len(sent) == 500


def test_keyed_counter_counts_each_key_on_its_own(shared_daemon):
    client = shared_daemon.client()
    a = [int(client.call("counter", b"incr", key="two-keys-a").body) for _ in range(5)]
    b = [int(client.call("counter", b"incr", key="two-keys-b").body) for _ in range(3)]
    a += [int(client.call("counter", b"incr", key="two-keys-a").body) for _ in range(2)]
    assert a == list(range(1, 8))
    assert b == [1, 2, 3]


def test_keyed_instances_over_max_keys_go_least_recently_used_first(start_daemon):
    counter = {"module": GUESTS / "counter.wat", "instances": "keyed", "max_keys": 3}
    daemon = start_daemon({"counter": counter}, supervisor={"workers": 1})
    client = daemon.client()

    def incr(key: str) -> int:
        reply = client.call("counter", b"incr", key=key)
        assert reply.status == 200, reply
        return int(reply.body)

    assert [incr(k) for k in "abc"] == [1, 1, 1]
    assert [incr(k) for k in "bc"] == [2, 2]      # least recently used first: a, b, c
    assert incr("d") == 1                         # a fourth key: a's instance goes
    assert incr("a") == 1                         # a starts afresh; now b goes
    assert [incr(k) for k in "cd"] == [3, 2]      # c and d kept their counts
    assert incr("b") == 1
    service = next(s for s in daemon.status()["services"] if s["name"] == "counter")
    assert (service["keys"], service["evicted"]) == (3, 3)


def test_keyed_request_without_key_is_a_bad_request(shared_daemon):
    reply = shared_daemon.call("counter", b"incr")
    assert reply.status == 400 and b"key" in reply.body


def test_unknown_service_is_404(shared_daemon):
    reply = shared_daemon.call("no-such-service", b"x")
    assert reply.status == 404


def raw_exchange(daemon, frames: list[bytes], timeout_ms: int = 5000) -> list[bytes] | None:
    socket = daemon.context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.frontend)
    try:
        socket.send_multipart(frames)
        return socket.recv_multipart() if socket.poll(timeout_ms) else None
    finally:
        socket.close()


@pytest.mark.parametrize("frames, expected", [
    ([b"GARBAGE", b"\xff\xfe"], [b"CORRAL1", b"", b"400"]),
    ([b"\x00" * 64], [b"CORRAL1", b"", b"400"]),
    ([b"CORRAL1", b"r1", b"echo"], [b"CORRAL1", b"r1", b"400"]),
    ([b"CORRAL1", b"r2", b"echo", b"{not json", b"x"], [b"CORRAL1", b"r2", b"400"]),
    ([b"CORRAL1", b"r3", b"echo", b"[1, 2]", b"x"], [b"CORRAL1", b"r3", b"400"]),
    ([b"CORRAL1", b"r4", b"echo", b'{"colour": "red"}', b"x"], [b"CORRAL1", b"r4", b"400"]),
    ([b"CORRAL1", b"r5", b"echo", b'{"deadline_ms": -5}', b"x"], [b"CORRAL1", b"r5", b"400"]),
    ([b"CORRAL1", b"r6", b"echo", b'{"key": 7}', b"x"], [b"CORRAL1", b"r6", b"400"]),
    ([b"MDPC02", b"\x07", b"echo", b"x"], [b"MDPC02", b"\x03", b"echo", b"400"]),
    ([b"MDPC02", b"\x01", b"echo"], [b"MDPC02", b"\x03", b"echo", b"400"]),
])
def test_malformed_frames_get_400_and_the_daemon_keeps_serving(shared_daemon, frames, expected):
    reply = raw_exchange(shared_daemon, frames)
    assert reply is not None, "no reply to a malformed request"
    assert reply[:len(expected)] == expected
    assert reply[-1], "a 400 carries a detail"
    assert shared_daemon.call("echo", b"still here").body == b"still here"


def test_oversized_body_gets_413(start_daemon):
    daemon = start_daemon(supervisor={"max_message_kib": 4, "workers": 1})
    client = daemon.client()
    assert client.call("echo", b"x" * 4096).status == 200
    reply = client.call("echo", b"x" * 4097)
    assert reply.status == 413
    reply = raw_exchange(daemon, [b"MDPC02", b"\x01", b"echo", b"y" * 5000])
    assert reply[:4] == [b"MDPC02", b"\x03", b"echo", b"413"]
    assert client.call("echo", b"after").body == b"after"


def test_kill_9_of_a_worker_leaves_the_daemon_serving_with_a_new_worker(start_daemon):
    daemon = start_daemon()
    before = daemon.status()
    victim = before["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced():
        status = daemon.status()
        ready = [w for w in status["workers"] if w["state"] == "ready"]
        return len(ready) == 2 and victim["pid"] not in [w["pid"] for w in ready] and status
    after = daemon.wait_for(replaced, timeout=15, what="a new worker in the killed one's place")
    new = [w for w in after["workers"] if w["slot"] == victim["slot"]][0]
    assert new["generation"] == victim["generation"] + 1
    assert after["pid"] == before["pid"]
    for i in range(20):
        assert daemon.call("echo", b"%d" % i).body == b"%d" % i
    exited = [e for e in daemon.events("worker.exited") if e["pid"] == victim["pid"]]
    assert exited and "signal 9" in exited[0]["how"]
    # killed from outside: a warning that names the signal, not info with no cause
    assert exited[0]["level"] == "warning"
    assert exited[0]["cause"] == "killed by signal 9 (SIGKILL), not by corral", exited[0]


def test_corral_call_prints_the_body_and_exits_by_status(shared_daemon):
    run = subprocess.run([sys.executable, "-m", "corral", "call", "echo", "hello",
                          "-e", shared_daemon.frontend], capture_output=True, timeout=30)
    assert (run.returncode, run.stdout) == (0, b"hello\n")
    run = subprocess.run([sys.executable, "-m", "corral", "call", "nope", "x",
                          "-e", shared_daemon.frontend], capture_output=True, timeout=30)
    assert run.returncode == 1 and b"404" in run.stderr
    run = subprocess.run([sys.executable, "-m", "corral", "call", "counter", "incr", "--key", "cli",
                          "-e", shared_daemon.frontend], capture_output=True, timeout=30)
    assert (run.returncode, run.stdout) == (0, b"1\n")
    run = subprocess.run([sys.executable, "-m", "corral", "call", "echo", "-",
                          "-e", shared_daemon.frontend], input=b"from stdin", capture_output=True, timeout=30)
    assert run.stdout == b"from stdin\n"


def test_corral_status_lists_workers_and_services(shared_daemon):
    run = subprocess.run([sys.executable, "-m", "corral", "status", "-c", str(shared_daemon.config_path)],
                         capture_output=True, timeout=30, env=shared_daemon.env)
    assert run.returncode == 0, run.stderr
    text = run.stdout.decode()
    for word in ("workers", "services", "echo", "counter", "calc", "ready", "closed"):
        assert word in text
    run = subprocess.run([sys.executable, "-m", "corral", "status", "--json", "-c",
                          str(shared_daemon.config_path)], capture_output=True, timeout=30, env=shared_daemon.env)
    status = json.loads(run.stdout)
    assert {w["state"] for w in status["workers"]} == {"ready"}
    assert all(isinstance(w["rss_bytes"], int) and w["rss_bytes"] > 0 for w in status["workers"])


def test_requests_are_balanced_over_the_workers(shared_daemon):
    client = shared_daemon.client()
    before = {w["pid"]: w["requests"] for w in shared_daemon.status()["workers"]}
    ids = [client.send("echo", b"%d" % i) for i in range(400)]
    client.gather(ids, timeout=30)
    after = {w["pid"]: w["requests"] for w in shared_daemon.status()["workers"]}
    served = [after[pid] - before.get(pid, 0) for pid in after]
    assert len(served) == 2 and all(n > 0 for n in served), served


@pytest.mark.timeout(90)
def test_default_config_serves_the_example_guests(tmp_path):
    """`corral run` with no -c serves the packaged config; `corral call echo hello` prints hello.

    The packaged config listens on tcp://127.0.0.1:5555: with anything else there (a `./dev
    run` in another terminal) this test says so and stops, rather than take its replies."""
    import socket
    with socket.socket() as probe:
        probe.settimeout(1)
        if probe.connect_ex(("127.0.0.1", 5555)) == 0:
            pytest.fail("another process listens on tcp://127.0.0.1:5555, where the packaged config serves "
                        "(a `./dev run` in another terminal?): stop it and run this test again", pytrace=False)
    env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp_path / "run"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("NOTIFY_SOCKET", None)
    daemon = subprocess.Popen([sys.executable, "-m", "corral", "run"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"))
    try:
        end = time.monotonic() + 60
        while True:
            run = subprocess.run([sys.executable, "-m", "corral", "call", "echo", "hello", "--timeout", "1"],
                                 capture_output=True, env=env, timeout=30)
            if run.returncode == 0 or time.monotonic() > end or daemon.poll() is not None:
                break
        assert daemon.poll() is None, f"corral run exited {daemon.returncode}:\n" + (tmp_path / "log").read_text()[-3000:]
        assert run.stdout == b"hello\n", (tmp_path / "log").read_text()[-3000:]
        run = subprocess.run([sys.executable, "-m", "corral", "status"], capture_output=True, env=env, timeout=30)
        assert run.returncode == 0 and b"counter" in run.stdout
        assert run.stdout.startswith(b"corral pid %d," % daemon.pid), run.stdout   # this test's daemon answered
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_per_request_instances_start_fresh_every_time(start_daemon):
    daemon = start_daemon({"counter": {"module": GUESTS / "counter.wat", "instances": "per-request"},
                           "shared": {"module": GUESTS / "counter.wat", "instances": "reuse"}},
                          supervisor={"workers": 1})
    client = daemon.client()
    assert [client.call("counter", b"incr").body for _ in range(3)] == [b"1", b"1", b"1"]
    assert [client.call("shared", b"incr").body for _ in range(3)] == [b"1", b"2", b"3"]


def test_wasm_binary_modules_are_served_like_wat(start_daemon, tmp_path):
    import wasmtime
    (tmp_path / "echo.wasm").write_bytes(wasmtime.wat2wasm((GUESTS / "echo.wat").read_text()))
    daemon = start_daemon({"echo": {"module": tmp_path / "echo.wasm"}}, supervisor={"workers": 1})
    assert daemon.call("echo", b"binary").body == b"binary"


def test_console_log_format(start_daemon):
    daemon = start_daemon(logging={"format": "console", "level": "debug"}, supervisor={"workers": 1})
    daemon.call("nope", b"")
    text = daemon.log_path.read_text()
    assert "worker.ready" in text and "request.rejected" in text
    assert not text.lstrip().startswith("{")


def test_a_key_sent_to_a_service_that_is_not_keyed_is_ignored(start_daemon):
    daemon = start_daemon({"shared": {"module": GUESTS / "counter.wat"}}, supervisor={"workers": 1})
    client = daemon.client()
    counts = [client.call("shared", b"incr", key=key).body for key in ("a", "b", "c")]
    assert counts == [b"1", b"2", b"3"]   # one instance, whatever the key


def test_an_oversized_key_is_a_bad_request(shared_daemon):
    reply = shared_daemon.call("counter", b"incr", key="k" * 70000)
    assert reply.status == 400 and b"key" in reply.body


def test_wasi_imports_are_provided(start_daemon):
    daemon = start_daemon({"random": {"module": GUESTS / "faults" / "wasi_random.wat"}},
                          supervisor={"workers": 1})
    client = daemon.client()
    first, second = client.call("random", b"x"), client.call("random", b"y")
    assert first.status == second.status == 200
    assert len(first.body) == 16 and first.body != second.body
    exited = client.call("random", b"exit")
    assert (exited.status, exited.body) == (502, b"abort: the guest called proc_exit(3)")
    daemon.wait_for(lambda: daemon.worker_pids(), what="a worker again")
    assert client.call("random", b"z").status == 200
