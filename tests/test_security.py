"""Issue 12: nothing foreign runs in corral's processes, guest code never runs in the arbiter,
and clients on tcp are authenticated (CURVE + ZAP), encrypted and authorised per service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import FAULTS, GUESTS

pytestmark = pytest.mark.timeout(120)

SPIN = '(module (func $f (loop (br 0))) (start $f))'   # a start function that never returns


def maps_wasmtime(pid: int) -> bool:
    """Is wasmtime's shared library in the process's address space (could it run Wasm)?"""
    with open(f"/proc/{pid}/maps") as maps:
        return any("wasmtime" in line.rsplit(None, 1)[-1] for line in maps if "/" in line)


def watch_checks(daemon_pid: int, until) -> dict[int, bool]:
    """While `until()` is false: the daemon's check children seen, pid -> whether one was
    seen with wasmtime loaded and running; the daemon must never map wasmtime meanwhile."""
    seen: dict[int, bool] = {}
    daemon = psutil.Process(daemon_pid)
    while not until():
        try:
            assert not maps_wasmtime(daemon_pid), "the daemon loaded wasmtime"
            for child in daemon.children():
                if "corral.workers.check" in " ".join(child.cmdline()):
                    busy = child.cpu_times().user > 0.2 and maps_wasmtime(child.pid)
                    seen[child.pid] = seen.get(child.pid, False) or busy
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    return seen


def test_a_spinning_start_function_is_checked_in_a_child_not_in_the_daemon(tmp_path, cache_dir):
    (tmp_path / "spin.wat").write_text(SPIN)
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\nfrontend = "ipc://{tmp_path}/f.sock"\ncontrol = "ipc://{tmp_path}/c.sock"\n'
                      f'cache_dir = "{cache_dir}"\n[apps.spin]\nmodule = "spin.wat"\ntimeout_ms = 1500\n')
    process = subprocess.Popen([sys.executable, "-m", "corral", "run", "-c", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RUNTIME_DIRECTORY": str(tmp_path / "run")})
    try:
        seen = watch_checks(process.pid, lambda: process.poll() is not None)
        output = process.communicate(timeout=30)[0]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 78, output
    assert "[apps.spin] module: its first instance fails: deadline: interrupted after 1500 ms" in output
    assert process.pid not in seen and any(seen.values()), \
        f"no check child of daemon {process.pid} was seen spinning with wasmtime loaded: {seen}"


@pytest.mark.skipif(os.getuid() != 0, reason="dropping to another user needs root")
def test_the_check_child_runs_guest_code_as_the_workers_user(tmp_path, cache_dir):
    import pwd
    nobody = pwd.getpwnam("nobody").pw_uid
    (tmp_path / "spin.wat").write_text(SPIN)
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\nfrontend = "ipc://{tmp_path}/f.sock"\ncontrol = "ipc://{tmp_path}/c.sock"\n'
                      f'cache_dir = "{cache_dir}"\nuser = "nobody"\n'
                      f'[apps.spin]\nmodule = "spin.wat"\ntimeout_ms = 1500\n')
    process = subprocess.Popen([sys.executable, "-m", "corral", "check", "-c", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RUNTIME_DIRECTORY": str(tmp_path / "run")})
    uids: set[tuple[int, int]] = set()
    try:
        parent = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                for child in parent.children():
                    if "corral.workers.check" in " ".join(child.cmdline()) and child.cpu_times().user > 0.2:
                        uids.add((child.uids().real, child.uids().effective))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        output = process.communicate(timeout=30)[0]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 78 and "interrupted after 1500 ms" in output, output
    assert uids == {(nobody, nobody)}, f"the spinning check child ran as {uids}, not nobody ({nobody})"


def test_a_reload_checks_in_a_child_and_the_serving_daemon_never_loads_wasmtime(start_daemon, tmp_path):
    daemon = start_daemon()
    assert not maps_wasmtime(daemon.process.pid)
    (daemon.root / "spin.wat").write_text(SPIN)
    daemon.doc["apps"]["spin"] = {"module": daemon.root / "spin.wat", "timeout_ms": 1500}
    daemon.write_config()
    daemon.process.send_signal(signal.SIGHUP)
    refused = lambda: daemon.events("reload.config_invalid")
    seen = watch_checks(daemon.process.pid, refused)
    assert "its first instance fails: deadline" in refused()[0]["problem"]
    assert daemon.process.pid not in seen and any(seen.values()), seen
    assert daemon.call("echo", b"still here").body == b"still here"
    assert not maps_wasmtime(daemon.process.pid)


# --- CURVE + ZAP on tcp frontends ---------------------------------------------------------

import socket as plain_socket

import zmq
import zmq.auth

from corral import config as config_module
from corral.client import Client, CurveKeys, NoReply

EX_CONFIG = 78
REFUSED_S = 1.0   # how long an unauthenticated client waits for the reply that never comes


def free_port() -> int:
    with plain_socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(where: Path, *clients: str) -> Path:
    """server.key(_secret) in `where`, each client's pair beside it, their public keys in clients/."""
    (where / "clients").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(where, "server")
    for name in clients:
        zmq.auth.create_certificates(where, name)
        (where / f"{name}.key").rename(where / "clients" / f"{name}.key")
    return where


@pytest.fixture
def curve_daemon(start_daemon, tmp_path):
    keys = make_keys(tmp_path / "keys", "alice", "bob", "mallory")
    (keys / "clients" / "mallory.key").rename(keys / "mallory.key")   # a key pair, but not an allowed one
    port = free_port()
    apps = {"echo": {"module": GUESTS / "echo.wat"},
            "calc": {"module": GUESTS / "calc.wat", "allow": ["bob"]}}
    daemon = start_daemon(apps, supervisor={"frontend": [f"ipc://{tmp_path}/f.sock", f"tcp://127.0.0.1:{port}"]},
                          extra={"security": {"curve_secret_key": keys / "server.key_secret",
                                              "client_keys": keys / "clients"}})
    daemon.frontend = f"ipc://{tmp_path}/f.sock"   # harness calls go here
    daemon.tcp = f"tcp://127.0.0.1:{port}"
    daemon.keys = keys
    return daemon


def keyed_client(daemon, name: str) -> Client:
    keys = CurveKeys.load(str(daemon.keys / f"{name}.key_secret"), str(daemon.keys / "server.key"))
    client = Client(daemon.tcp, daemon.context, keys=keys)
    daemon.clients.append(client)
    return client


def plain_client(daemon) -> Client:
    client = Client(daemon.tcp, daemon.context)
    daemon.clients.append(client)
    return client


def test_an_allowed_key_is_served_and_a_call_outside_its_acl_is_403_logged_by_key_name(curve_daemon):
    alice, bob = keyed_client(curve_daemon, "alice"), keyed_client(curve_daemon, "bob")
    assert alice.call("echo", b"hi", timeout=10).body == b"hi"
    assert bob.call("echo", b"hi bob", timeout=10).status == 200
    calc = b'{"call": "add", "args": [2, 3]}'
    refused = alice.call("calc", calc, timeout=10)
    assert refused.status == 403, refused
    assert b"alice" in refused.body
    assert bob.call("calc", calc, timeout=10).status != 403
    forbidden = curve_daemon.wait_for(lambda: curve_daemon.events("request.forbidden"), what="forbidden logged")
    assert forbidden[0]["key"] == "alice" and forbidden[0]["service"] == "calc"
    # the ipc frontend relies on file permissions: no key, no ACL
    assert curve_daemon.call("calc", calc).status != 403


def test_unknown_keys_null_clients_and_plain_tcp_get_nothing(curve_daemon):
    with pytest.raises(NoReply):
        keyed_client(curve_daemon, "mallory").call("echo", b"x", timeout=REFUSED_S)
    with pytest.raises(NoReply):
        plain_client(curve_daemon).call("echo", b"x", timeout=REFUSED_S)
    host, port = curve_daemon.tcp.removeprefix("tcp://").rsplit(":", 1)
    with plain_socket.create_connection((host, int(port)), timeout=REFUSED_S) as raw:
        raw.sendall(b"CORRAL1 echo hello\r\n" * 4)
        got = b""
        try:
            while chunk := raw.recv(4096):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    assert b"hello" not in got and b"200" not in got, got   # at most the ZMTP greeting, then closed
    assert keyed_client(curve_daemon, "alice").call("echo", b"still", timeout=10).body == b"still"


def test_a_key_removed_on_reload_is_refused_on_its_open_connection(curve_daemon):
    bob = keyed_client(curve_daemon, "bob")
    assert bob.call("echo", b"1", timeout=10).status == 200
    (curve_daemon.keys / "clients" / "bob.key").unlink()
    assert curve_daemon.control_request("reload", timeout=60)["ok"] is True
    refused = bob.call("echo", b"2", timeout=10)
    assert refused.status == 403 and b"no longer allowed" in refused.body
    with pytest.raises(NoReply):
        keyed_client(curve_daemon, "bob").call("echo", b"3", timeout=REFUSED_S)   # a new connection: refused


def test_a_reload_that_changes_the_server_key_is_refused_and_the_old_key_keeps_serving(curve_daemon):
    zmq.auth.create_certificates(curve_daemon.keys, "server2")
    curve_daemon.doc["security"]["curve_secret_key"] = curve_daemon.keys / "server2.key_secret"
    curve_daemon.write_config()
    answer = curve_daemon.control_request("reload", timeout=60)
    assert answer["ok"] is False and any("curve_secret_key" in p and "restart" in p for p in answer["problems"]), answer
    assert keyed_client(curve_daemon, "alice").call("echo", b"same key", timeout=10).body == b"same key"


def corral(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNTIME_DIRECTORY": str(cwd / "run"), "XDG_CACHE_HOME": str(cwd / "cache")}
    env.pop("CACHE_DIRECTORY", None)
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def test_the_cli_takes_client_keys(curve_daemon):
    path, cwd = str(curve_daemon.config_path), curve_daemon.root
    alice = str(curve_daemon.keys / "alice.key_secret")
    # the server's public key from the config's secret key file (same host)
    done = corral("call", "echo", "by key", "-c", path, "-e", curve_daemon.tcp, "--key-file", alice, cwd=cwd)
    assert done.returncode == 0 and done.stdout == "by key\n", done.stderr
    done = corral("call", "calc", "{}", "-c", path, "-e", curve_daemon.tcp, "--key-file", alice,
                  "--server-key", str(curve_daemon.keys / "server.key"), cwd=cwd)
    assert done.returncode == 1 and "403" in done.stderr, done.stderr
    done = corral("call", "echo", "x", "-e", curve_daemon.tcp, "--timeout", "1", cwd=cwd)
    assert done.returncode == 3, done.stderr   # no key, and no config to tell: refused, no reply
    done = corral("bench", "echo", "-n", "200", "--concurrency", "8", "-c", path, "-e", curve_daemon.tcp,
                  "--key-file", alice, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr


def test_keygen_writes_a_certificate_pair_the_secret_owner_only(tmp_path):
    done = corral("keygen", "carol", "--dir", str(tmp_path / "k"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    public, secret = zmq.auth.load_certificate(tmp_path / "k" / "carol.key_secret")
    assert zmq.auth.load_certificate(tmp_path / "k" / "carol.key") == (public, None)
    assert (tmp_path / "k" / "carol.key_secret").stat().st_mode & 0o077 == 0
    again = corral("keygen", "carol", "--dir", str(tmp_path / "k"), cwd=tmp_path)
    assert again.returncode != 0 and "not overwritten" in again.stderr


def exposed_config(tmp_path: Path, security: str = "") -> Path:
    (tmp_path / "echo.wat").write_text((GUESTS / "echo.wat").read_text())
    path = tmp_path / "corral.toml"
    path.write_text(f'[supervisor]\nfrontend = "tcp://0.0.0.0:{free_port()}"\ncontrol = "ipc://{tmp_path}/c.sock"\n'
                    f'{security}\n[apps.echo]\nmodule = "echo.wat"\n')
    return path


@pytest.mark.parametrize("verb", ["run", "check"])
def test_a_non_loopback_frontend_without_curve_is_refused_naming_the_key(tmp_path, verb):
    done = corral(verb, "-c", str(exposed_config(tmp_path)), cwd=tmp_path)
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert "is not a loopback address" in done.stderr and "curve_secret_key" in done.stderr \
        and "insecure_tcp" in done.stderr, done.stderr


def test_insecure_tcp_allows_it_and_check_warns(tmp_path):
    done = corral("check", "-c", str(exposed_config(tmp_path, "[security]\ninsecure_tcp = true\n")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning" in done.stderr and "without CURVE" in done.stderr


# --- config: every new key ----------------------------------------------------------------

def parse(tmp_path: Path, doc: dict) -> config_module.Config:
    (tmp_path / "echo.wat").write_text("(module)")
    doc = {"apps": {"echo": {"module": "echo.wat"}}, **doc}
    return config_module.parse(doc, tmp_path / "corral.toml")


def problems(tmp_path: Path, doc: dict) -> list[str]:
    with pytest.raises(config_module.ConfigError) as caught:
        parse(tmp_path, doc)
    return caught.value.problems


def test_security_paths_are_relative_to_the_config_file(tmp_path):
    make_keys(tmp_path / "keys", "alice")
    config = parse(tmp_path, {"security": {"curve_secret_key": "keys/server.key_secret",
                                           "client_keys": "keys/clients"}})
    assert config.security.curve_secret_key == tmp_path / "keys" / "server.key_secret"
    assert config.security.client_keys == tmp_path / "keys" / "clients"
    assert config.security.curve and not config.security.insecure_tcp


@pytest.mark.parametrize("security, words", [
    ({"curve_secret_key": "keys/server.key_secret"}, "[security] client_keys: missing"),
    ({"client_keys": "keys/clients"}, "[security] curve_secret_key: missing"),
    ({"curve_secret_key": "keys/nope", "client_keys": "keys/clients"}, "[security] curve_secret_key:"),
    ({"curve_secret_key": "keys/server.key", "client_keys": "keys/clients"}, "has no secret-key"),
    ({"curve_secret_key": "keys/server.key_secret", "client_keys": "keys/server.key"}, "is not a directory"),
    ({"insecure_tcp": "yes"}, "[security] insecure_tcp: must be a boolean"),
    ({"curve": True}, "[security] curve: unknown key"),
])
def test_bad_security_keys_are_named(tmp_path, security, words):
    make_keys(tmp_path / "keys")
    found = problems(tmp_path, {"security": security})
    assert any(words in p and str(tmp_path / "corral.toml") in p for p in found), found


def test_allow_needs_curve_and_names(tmp_path):
    doc = {"apps": {"echo": {"module": "echo.wat", "allow": ["alice"]}}}
    assert any("[apps.echo] allow: needs [security] curve_secret_key" in p for p in problems(tmp_path, doc))
    make_keys(tmp_path / "keys", "alice")
    security = {"curve_secret_key": "keys/server.key_secret", "client_keys": "keys/clients"}
    assert parse(tmp_path, {"security": security, **doc}).apps["echo"].allow == ("alice",)
    bad = {"apps": {"echo": {"module": "echo.wat", "allow": [1]}}}
    assert any("[apps.echo] allow: must be a list of key names" in p for p in problems(tmp_path, {"security": security, **bad}))
    assert parse(tmp_path, {"security": security}).apps["echo"].allow is None   # any allowed key
    config = parse(tmp_path, {"security": security, "apps": {"echo": {"module": "echo.wat", "allow": ["alice", "bob"]}}})
    assert [w for w in config_module.warnings(config) if "allow: no key 'bob'" in w], config_module.warnings(config)
    assert not [w for w in config_module.warnings(config) if "'alice'" in w]


def test_curve_without_libzmq_support_is_refused_naming_why(tmp_path, monkeypatch):
    make_keys(tmp_path / "keys")
    monkeypatch.setattr(zmq, "has", lambda capability: capability != "curve")
    found = problems(tmp_path, {"security": {"curve_secret_key": "keys/server.key_secret",
                                             "client_keys": "keys/clients"}})
    assert any("has no CURVE support" in p for p in found), found


@pytest.mark.parametrize("frontend, refused", [
    ("tcp://0.0.0.0:5555", True), ("tcp://*:5555", True), ("tcp://10.1.2.3:5555", True),
    ("tcp://eth0:5555", True), ("tcp://[::]:5555", True),
    ("tcp://127.0.0.1:5555", False), ("tcp://127.8.9.1:5555", False), ("tcp://localhost:5555", False),
    ("tcp://[::1]:5555", False), ("ipc:///tmp/x.sock", False),
])
def test_which_frontends_need_curve(tmp_path, frontend, refused):
    doc = {"supervisor": {"frontend": frontend}}
    if refused:
        assert any("[supervisor] frontend" in p and "insecure_tcp" in p for p in problems(tmp_path, doc))
        assert parse(tmp_path, {**doc, "security": {"insecure_tcp": True}}).security.insecure_tcp
    else:
        parse(tmp_path, doc)


def test_the_control_socket_must_be_ipc(tmp_path):
    found = problems(tmp_path, {"supervisor": {"control": "tcp://127.0.0.1:7000"}})
    assert any("[supervisor] control: must be an ipc://" in p for p in found), found


@pytest.mark.parametrize("listen, host, warned", [
    ("9100", "127.0.0.1", False), (":9100", "127.0.0.1", False), ("127.0.0.1:9100", "127.0.0.1", False),
    ("0.0.0.0:9100", "0.0.0.0", True), ("[::1]:9100", "::1", False),
])
def test_metrics_listen_defaults_to_loopback_and_check_warns_otherwise(tmp_path, listen, host, warned):
    config = parse(tmp_path, {"metrics": {"listen": listen}})
    assert config_module.metrics_address(listen) == (host, 9100)
    assert bool(config_module.warnings(config)) is warned


def test_both_drains_read_the_key_name_of_each_message(tmp_path):
    """frames.drain_with_user (the C extension's) and the pyzmq one it falls back to agree:
    the ZAP User-Id on a CURVE connection, None on ipc."""
    from corral import security
    from corral.wire import frames
    keys = make_keys(tmp_path / "keys", "alice")
    context = zmq.Context()
    authenticator = security.KeyAuthenticator(context, security.KeyNames(keys / "clients"))
    authenticator.start()
    sockets = []
    try:
        router = context.socket(zmq.ROUTER)
        sockets.append(router)
        router.setsockopt(zmq.CURVE_SECRETKEY, security.server_keys(keys / "server.key_secret")[1])
        router.setsockopt(zmq.CURVE_SERVER, 1)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        router.setsockopt(zmq.CURVE_SERVER, 0)
        router.bind(f"ipc://{tmp_path}/x.sock")
        alice = context.socket(zmq.DEALER)
        CurveKeys.load(str(keys / "alice.key_secret"), str(keys / "server.key")).apply(alice)
        alice.connect(f"tcp://127.0.0.1:{port}")
        local = context.socket(zmq.DEALER)
        local.connect(f"ipc://{tmp_path}/x.sock")
        sockets += [alice, local]
        implementations = [frames._drain_with_user] + ([frames.drain_with_user]
                                                       if frames.drain_with_user is not frames._drain_with_user else [])
        assert frames.IMPLEMENTATION != "c" or len(implementations) == 2
        for drain in implementations:
            alice.send_multipart([b"CORRAL1", b"1", b"echo", b"", b"from alice"])
            local.send_multipart([b"CORRAL1", b"2", b"echo", b"", b"from ipc"])
            got = []
            while len(got) < 2:
                assert router.poll(5000)
                got += drain(router, 16)
            by_body = {tuple(message[1:]): user for message, user in got}
            assert by_body == {(b"CORRAL1", b"1", b"echo", b"", b"from alice"): "alice",
                               (b"CORRAL1", b"2", b"echo", b"", b"from ipc"): None}, (drain, got)
    finally:
        for socket in sockets:
            socket.close(0)
        authenticator.stop()
        context.term()


@pytest.mark.timeout(60)
def test_with_curve_every_connection_of_one_key_counts_as_one_client(start_daemon, tmp_path):
    """docs/config.md: with CURVE on, a client for max_inflight_per_client is also one key name.
    Two connections of alice share one budget (her third request is 429, on whichever
    connection); bob, on the same service at the same time, is not refused."""
    keys = make_keys(tmp_path / "keys", "alice", "bob")
    port = free_port()
    daemon = start_daemon({"slow": {"module": FAULTS, "timeout_ms": 5000}},
                          supervisor={"frontend": [f"ipc://{tmp_path}/f.sock", f"tcp://127.0.0.1:{port}"],
                                      "workers": 1, "max_inflight_per_client": 2},
                          extra={"security": {"curve_secret_key": keys / "server.key_secret",
                                              "client_keys": keys / "clients"}})
    daemon.frontend = f"ipc://{tmp_path}/f.sock"
    daemon.tcp, daemon.keys = f"tcp://127.0.0.1:{port}", keys
    first, second, bob = keyed_client(daemon, "alice"), keyed_client(daemon, "alice"), keyed_client(daemon, "bob")
    held = [first.send("slow", b"slow"), second.send("slow", b"slow")]   # alice: two open, her budget
    daemon.wait_for(lambda: sum(c["running"] + c["queued"] for c in daemon.status()["clients"]
                                if c["client"] == "alice") == 2, what="alice's two requests open")
    refused = first.call("slow", b"ok", timeout=10)
    assert refused.status == 429, refused
    assert second.call("slow", b"ok", timeout=10).status == 429
    assert bob.call("slow", b"ok", timeout=10).status == 200
    assert all(r.status == 200 for r in [first.wait(held[0], timeout=10), second.wait(held[1], timeout=10)])
    assert first.call("slow", b"ok", timeout=10).status == 200   # her budget is back
