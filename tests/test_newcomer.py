"""What a newcomer tripped over, each fixed: commands aimed at no daemon, compile
messages, a second daemon's control socket, signals from outside, and the
small sayings of the CLI and the client."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from harness import GUESTS


def corral(*args, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nowhere(tmp_path):
    """A config whose endpoints nobody serves: an ipc path that does not exist, a tcp port nobody binds."""
    port = free_port()
    path = tmp_path / "corral.toml"
    path.write_text(f'[supervisor]\nfrontend = "tcp://127.0.0.1:{port}"\n'
                    f'control = "ipc://{tmp_path}/no-such.sock"\n'
                    f'[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n')
    return path, port


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verb", [
    ["call", "echo", "x", "--timeout", "30"],           # the frontend: a refused tcp connect
    ["bench", "echo", "-n", "10"],
    ["status"],                                          # the control endpoint: no such ipc path
    ["scale", "3"],
])
def test_a_command_aimed_at_no_daemon_says_so_at_once(nowhere, verb):
    config, port = nowhere
    started = time.monotonic()
    done = corral(*verb, "-c", config)
    elapsed = time.monotonic() - started
    endpoint = f"tcp://127.0.0.1:{port}" if verb[0] in ("call", "bench") else f"ipc://{config.parent}/no-such.sock"
    assert done.returncode == 3, done
    assert done.stderr == f"corral: nothing is listening on {endpoint} (is the daemon running?)\n"
    assert elapsed < 5, elapsed   # not after --timeout (30 s) or the control wait (5 s)


@pytest.mark.timeout(60)
def test_corral_call_to_an_ipc_path_that_does_not_exist(tmp_path):
    done = corral("call", "echo", "x", "-e", f"ipc://{tmp_path}/gone.sock", "--timeout", "30")
    assert done.returncode == 3
    assert done.stderr == f"corral: nothing is listening on ipc://{tmp_path}/gone.sock (is the daemon running?)\n"


def check_config(tmp_path, wat: str):
    (tmp_path / "bad.wat").write_text(wat)
    path = tmp_path / "corral.toml"
    path.write_text(f'[supervisor]\ncache_dir = "{tmp_path}/cache"\n[apps.bad]\nmodule = "bad.wat"\n')
    return corral("check", "-c", path)


def test_corral_check_shows_the_whole_type_error(tmp_path):
    done = check_config(tmp_path, "(module\n  (func $f (result i32)\n    i64.const 1))\n")
    assert done.returncode == 78
    assert "bad.wat does not compile: failed to compile: wasm[0]::function[0]::f" in done.stderr
    assert "Caused by:" in done.stderr   # wasmtime's cause, and where
    assert "Invalid input WebAssembly code at offset 26: type mismatch: expected i32, found i64" in done.stderr


def test_corral_check_shows_the_line_and_column_of_a_wat_syntax_error(tmp_path):
    done = check_config(tmp_path, "(module\n  (func $f (result i32)\n    i32.cost 1))\n")
    assert done.returncode == 78
    assert "bad.wat does not compile: unknown operator or unexpected token" in done.stderr
    assert "--> bad.wat:3:5" in done.stderr and "i32.cost 1))" in done.stderr, done.stderr


@pytest.mark.timeout(120)
def test_two_daemons_with_two_configs_and_no_control_key_each_get_their_own(cache_dir):
    """The default control socket is derived from the config file's path, so a
    second daemon in the same runtime directory does not collide with the first."""
    import shutil
    import tempfile
    from pathlib import Path
    from harness import Daemon
    shared = Path(tempfile.mkdtemp(prefix="crl-rt-", dir="/tmp"))   # one runtime directory for both
    daemons = []
    try:
        for _ in range(2):
            daemon = Daemon({"echo": {"module": GUESTS / "echo.wat"}}, cache_dir, supervisor={"workers": 1},
                            env={"RUNTIME_DIRECTORY": str(shared)})
            daemons.append(daemon)
            del daemon.doc["supervisor"]["control"]
            daemon.write_config()
            daemon.start(wait=False)
            daemon.control = daemon.wait_for(lambda: daemon.events("daemon.started"),
                                             timeout=30, what="daemon.started")[0]["control"]
            daemon.wait_ready()
        assert daemons[0].control != daemons[1].control
        assert sorted(p.name for p in shared.glob("control-*.sock")) == \
            sorted(d.control.rsplit("/", 1)[1] for d in daemons)
        for daemon in daemons:
            done = corral("status", "-c", daemon.config_path, env=daemon.env)
            assert done.returncode == 0, done.stderr
            assert f"config {daemon.config_path}" in done.stdout
        for daemon in daemons:
            assert daemon.stop() == 0
    finally:
        for daemon in daemons:
            daemon.cleanup()
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.timeout(120)
def test_log_events_one_per_state_change_with_one_name_per_thing(start_daemon):
    import re
    from harness import FAULTS
    daemon = start_daemon({"faults": {"module": FAULTS}}, supervisor={"workers": 1})
    assert daemon.call("faults", b"unreachable").status == 502      # the worker retires and is respawned
    daemon.wait_for(lambda: len(daemon.events("worker.exited")) == 1, what="the retired worker gone")
    daemon.wait_for(lambda: len(daemon.events("worker.ready")) == 2, what="its successor ready")
    assert daemon.stop() == 0
    events = daemon.events()
    workers = {e["pid"]: e["worker"] for e in events if e["event"] == "worker.spawned"}
    assert len(workers) == 2
    for pid in workers:
        said = [e["event"] for e in events if e.get("pid") == pid and e["event"].startswith("worker.")]
        for name in ("worker.spawned", "worker.ready", "worker.exited"):
            assert said.count(name) == 1, (pid, said)
    assert [e["event"] for e in events].count("worker.retiring") == 1
    assert not [e for e in events if e["event"] == "worker.exit"]
    assert not [e for e in events if "reason" in e], "one word for why: cause"
    for event in events:
        assert event["component"] in ("daemon", "worker"), event
        if "worker" in event:
            assert re.fullmatch(r"w\d+\.\d+", event["worker"]), event
            if "pid" in event and event["event"] != "daemon.started":
                assert workers[event["pid"]] == event["worker"], event
    fault = [e for e in events if e["event"] in ("request.failed", "request.fault")]
    assert len(fault) == 1, fault    # one event per fault
    assert fault[0]["event"] == "request.failed" and fault[0]["worker"] == workers[fault[0]["pid"]]
    assert fault[0]["service"] == "faults" and fault[0]["request_id"] and fault[0]["instance"] == "discarded"
    assert [e["cause"] for e in events if e["event"] == "worker.retiring"] == ["abort"]
    assert [e["cause"] for e in events if e["event"] == "worker.exited"][0] == "retired (abort)"


def test_corral_version():
    import importlib.metadata as metadata
    done = corral("--version")
    assert done.returncode == 0
    assert done.stdout == (f"corral {metadata.version('corral')} (wasmtime {metadata.version('wasmtime')}, "
                           f"pyzmq {metadata.version('pyzmq')})\n")


def test_every_option_of_bench_has_help(monkeypatch):
    import argparse
    from corral import cli
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        cli.main(["status"])   # the top-level parser (call and bench parse their own)
    verbs = next(a for a in seen["parser"]._actions if isinstance(a, argparse._SubParsersAction))
    bench = verbs.choices["bench"]
    missing = [a.dest for a in bench._actions if not a.help]
    assert not missing, f"corral bench options without help: {missing}"
    assert "warm-up" in bench.format_help()


def test_corral_check_says_1_app(tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text(f'[supervisor]\ncache_dir = "{tmp_path}/cache"\n[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n')
    done = corral("check", "-c", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{path}: ok, 1 app: echo\n"


def test_a_str_body_is_a_clear_type_error():
    from corral.client import Client
    with Client("inproc://nobody-needed") as client:
        with pytest.raises(TypeError, match=r"^the body must be bytes, not str \(encode it: body.encode\(\)\)$"):
            client.send("echo", "hello")
        with pytest.raises(TypeError, match="not int"):
            client.call("echo", 3)


def test_no_reply_says_the_timeout_rounded():
    import zmq
    from corral.client import Client, NoReply
    context = zmq.Context()
    try:
        silent = context.socket(zmq.ROUTER)
        silent.bind("inproc://silent")
        with Client("inproc://silent", context) as client:
            with pytest.raises(NoReply, match=r"^no reply within 0\.123 s$"):
                client.call("echo", b"x", timeout=0.123456789)
            ids = [client.send("echo", b"x") for _ in range(2)]
            with pytest.raises(NoReply, match=r"^2 of 2 replies missing after 0\.0457 s$"):
                client.gather(ids, timeout=0.0456789)
    finally:
        context.destroy(linger=0)


@pytest.mark.timeout(120)
def test_bench_counts_only_timed_requests_and_says_so(start_daemon):
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}}, supervisor={"workers": 1})
    done = corral("bench", "echo", "-n", "40", "--concurrency", "4", "--warmup", "7", "--no-progress",
                  "-e", daemon.frontend, "-c", daemon.config_path)
    assert done.returncode == 0, done.stderr
    first, *rest = done.stdout.splitlines()
    assert first.endswith("40 requests, 1 client, 4 in flight each (closed loop) "
                          "(after 8 warm-up requests per client, not counted here)"), first
    assert "  status      200: 40" in rest
    served = {s["name"]: s["statuses"] for s in daemon.status()["services"]}["echo"]
    assert served == {"200": 48}   # the check, the warm-up and the 40: the daemon counts all (as --help says)


@pytest.mark.timeout(120)
def test_status_shows_the_absolute_config_path_when_run_with_a_relative_one(cache_dir):
    from harness import Daemon
    daemon = Daemon({"echo": {"module": GUESTS / "echo.wat"}}, cache_dir, supervisor={"workers": 1})
    try:
        daemon.log_file = open(daemon.log_path, "ab")
        daemon.process = subprocess.Popen([sys.executable, "-m", "corral", "run", "-c", "corral.toml"],
                                          stdout=daemon.log_file, stderr=subprocess.STDOUT,
                                          env=daemon.env, cwd=daemon.root)
        daemon.wait_ready()
        done = corral("status", "-c", "corral.toml", env=daemon.env, cwd=daemon.root)
        assert done.returncode == 0, done.stderr
        assert f"config {daemon.config_path} (generation 1)" in done.stdout.splitlines()[0]
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()


# --- issue 20: the small defects a newcomer reads in the code -------------------------

REPO_ROOT = GUESTS.parent


def package_sources():
    return sorted(p for folder in ("supervisor", "workers") for p in (REPO_ROOT / folder).rglob("*.py"))


def test_no_dict_literal_names_a_key_twice():
    """A key written twice in one dict literal: the first is dead (config.py's user and group were)."""
    import ast
    twice = []
    for path in package_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                twice += [f"{path.name}:{node.lineno}: {k!r}" for k in set(keys) if keys.count(k) > 1]
    assert not twice, twice


def test_each_exit_code_and_untested_wasmtime_is_defined_once():
    import ast
    defined: dict[str, list[str]] = {}
    for path in package_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.ClassDef):
                names = [node.name]
            for name in names:
                if name.startswith("EX_") or name == "UntestedWasmtime":
                    defined.setdefault(name, []).append(path.name)
    assert defined.get("EX_SOFTWARE") == ["exits.py"], defined
    assert defined.get("UntestedWasmtime") == ["exits.py"], defined
    assert all(len(where) == 1 for where in defined.values()), defined


@pytest.mark.timeout(120)
def test_a_missing_wasmtime_name_of_the_state_calls_is_exit_70_not_an_attribute_error(tmp_path):
    """workers/statecalls.py's private wasmtime names are in the start-up check: `corral
    check` and `corral run` say which is gone and exit 70, as for the hot path's own."""
    import importlib.metadata
    import json
    import os
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import wasmtime._ffi as ffi\n"
        "class WithoutOne:\n"
        "    def __init__(self, dll):\n"
        "        self.dll = dll\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self.dll, name)\n"
        "    def __getitem__(self, name):\n"
        "        if name == 'wasmtime_linker_define_func_unchecked':\n"
        "            raise AttributeError(name)\n"
        "        return self.dll[name]\n"
        "ffi.dll = WithoutOne(ffi.dll)\n")
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\nfrontend = "ipc://{tmp_path}/f.sock"\ncontrol = "ipc://{tmp_path}/c.sock"\n'
                      f'cache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n'
                      f'[apps.tally]\nmodule = "{GUESTS / "counter_durable.wat"}"\n')
    env = {**os.environ, "PYTHONPATH": str(site), "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    expected = (f"wasmtime {importlib.metadata.version('wasmtime')} has no C function "
                "wasmtime_linker_define_func_unchecked in wasmtime._ffi.dll, which corral's hot path "
                "(corral/workers/abi.py) uses; corral is tested with wasmtime>=50,<51")
    check = corral("check", "-c", config, env=env)
    assert (check.returncode, check.stderr) == (70, f"corral: {expected}\n")
    run = corral("run", "-c", config, env=env)
    assert run.returncode == 70, run.stderr
    line = json.loads(run.stderr.strip().splitlines()[-1])
    assert (line["event"], line["error"]) == ("daemon.start_failed", expected)


def test_a_failed_commit_replaces_each_gated_reply_whole_whatever_its_pieces(tmp_path, monkeypatch):
    """workers/loop.py turns the replies of a failed commit into 503 in place: it replaces the
    pieces each record took, not a hard-coded three (here a record is made of four)."""
    import sqlite3
    from types import SimpleNamespace
    from corral.wire import protocol
    from corral.workers import loop as loop_module, outcome, state
    from corral.wire.protocol import Status, iter_replies

    def four_pieces(ticket, status, fault, body):
        header, fault, body = protocol.reply_record(ticket, status, fault, body)
        return header, fault, body[:1], body[1:]
    monkeypatch.setattr(loop_module, "reply_record", four_pieces)
    monkeypatch.setattr(loop_module, "SLOW_CALL_S", 1e9)   # no flush between them: one batch

    def refuse(self, now=None, waiting=None):
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(state.Store, "commit", refuse)
    store = state.Store(tmp_path / "kv.sqlite3", "os", state.Limits(), 30.0)

    def run(key, body, timeout_ms, writes):
        if body.startswith(b"put"):
            writes.put(b"k", body)
        return outcome.Outcome(Status.OK, body)
    guest = SimpleNamespace(state=SimpleNamespace(store=store), app=SimpleNamespace(timeout_ms=1000), run=run)
    worker = object.__new__(loop_module.WorkerLoop)
    worker.host = SimpleNamespace(guests={b"kv": guest})
    worker.log = SimpleNamespace(error=lambda *a, **k: None)
    worker.cautious, worker.handled, worker.pending = {}, 0, 0
    worker.replies, worker.gated, worker.staged = [protocol.W_REPLY], [], {}
    far = time.monotonic() + 60
    for ticket, body in ((1, b"put one"), (2, b"read only"), (3, b"put three")):
        assert worker.run_one(loop_module.Job(ticket, far, b"kv", b"alice", body)) is None
    worker.commit()
    replies = list(iter_replies(b"".join(worker.replies)))
    assert replies == [(1, Status.UNAVAILABLE, b"state", b"state commit failed"),
                       (2, Status.OK, b"", b"read only"),
                       (3, Status.UNAVAILABLE, b"state", b"state commit failed")]
    store.close()


def test_no_test_switch_in_production_code():
    """Test-only mechanisms (the kill after a commit: tests/hooks) live in tests/."""
    found = [f"{path.relative_to(REPO_ROOT)}:{n}" for path in package_sources()
             for n, line in enumerate(path.read_text().splitlines(), 1) if "CORRAL_TEST" in line]
    assert not found, found


def test_restart_of_a_slot_that_is_not_there_says_which_are():
    from types import SimpleNamespace
    from corral import verbs
    one = SimpleNamespace(slots=lambda: [0])   # verbs.Arbiter's slots
    assert verbs.restart(one, {"slots": [3]}) == {"ok": False,
                                                  "error": "no worker in slot 3; the worker is in slot 0"}


def test_state_import_and_backup_count_in_words(tmp_path):
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\ncache_dir = "{tmp_path}/cache"\nstate_dir = "{tmp_path}/state"\n'
                      f'[apps.tally]\nmodule = "{GUESTS / "counter_durable.wat"}"\ninstances = "keyed"\n')
    (tmp_path / "state").mkdir(mode=0o700)
    line = '{"scope": "YWxpY2U=", "key": "Y291bnQ=", "value": "AwAAAAAAAAA="}\n'
    imported = corral("state", "import", "tally", "-c", config, input=line)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == f"{tmp_path}/state/default/tally.sqlite3: 1 entry imported\n"
    backup = corral("state", "backup", tmp_path / "copy", "-c", config)
    assert backup.returncode == 0, backup.stderr
    assert backup.stdout == f"{tmp_path}/copy: 1 database copied\n"


@pytest.mark.timeout(120)
def test_call_takes_options_before_the_body_and_names_a_close_service(start_daemon):
    daemon = start_daemon()
    config = daemon.config_path
    first = corral("call", "counter", "--key", "alice", "-c", config, env=daemon.env)
    assert (first.returncode, first.stdout) == (0, "1\n"), first.stderr
    thrown = corral("call", "counter", "--key", "alice", "throw", "-c", config, env=daemon.env)
    assert thrown.returncode == 1
    assert thrown.stderr == "corral: 500: unwind: a Wasm exception escaped the export\n"
    again = corral("call", "counter", "-c", config, "get", "--key", "alice", env=daemon.env)
    assert again.stdout == "2\n", again.stderr
    bench = corral("bench", "echo", "-n", "20", "--no-progress", "-c", config, "hi", env=daemon.env)
    assert bench.returncode == 0, bench.stderr
    typo = corral("call", "ecoh", "x", "-c", config, env=daemon.env)
    assert (typo.returncode, typo.stderr) == (1, "corral: 404: no such service: ecoh (did you mean echo?)\n")
    far = corral("call", "nothing-like-it", "-c", config, env=daemon.env)
    assert far.stderr == ("corral: 404: no such service: nothing-like-it "
                          "(the services of this config: calc, counter, echo)\n")


@pytest.mark.timeout(120)
def test_a_body_over_twice_max_message_kib_is_refused_at_once(start_daemon):
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}},
                          supervisor={"workers": 1, "max_message_kib": 1})
    config = daemon.config_path
    big = b"x" * (2 * 1024 + 65536 + 1)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "corral", "call", "echo", "-", "-c", str(config)], input=big,
                          capture_output=True, timeout=60, env=daemon.env)
    assert time.monotonic() - started < 5       # not after --timeout (10 s)
    assert done.returncode == 1
    assert done.stderr.decode() == (f"corral: the body is 66 KiB, over twice max_message_kib (1 KiB) in {config}: "
                                    "the daemon would drop the connection without a reply (up to twice the "
                                    "limit it answers 413)\n")
    fits = subprocess.run([sys.executable, "-m", "corral", "call", "echo", "-", "-c", str(config)],
                          input=b"x" * 2048, capture_output=True, timeout=60, env=daemon.env)
    assert (fits.returncode, fits.stderr) == (1, b"corral: 413: body of 2048 bytes is over max_message_kib\n")


from test_security import curve_daemon  # noqa: E402,F401  (a fixture: a daemon with a CURVE frontend)


@pytest.mark.timeout(120)
def test_a_call_without_a_key_on_a_curve_frontend_is_told_it_needs_one(curve_daemon):
    config = curve_daemon.config_path
    started = time.monotonic()
    done = corral("call", "echo", "x", "-c", config, "-e", curve_daemon.tcp, env=curve_daemon.env)
    assert time.monotonic() - started < 5   # not after --timeout (10 s)
    assert done.returncode == 2
    assert done.stderr == (f"corral: {curve_daemon.tcp} speaks CURVE ([security] curve_secret_key in {config}): "
                           f"this frontend needs --key-file NAME.key_secret (a key pair from corral keygen whose "
                           f"public half is in {curve_daemon.keys / 'clients'})\n")
    alice = curve_daemon.keys / "alice.key_secret"
    done = corral("call", "echo", "x", "-c", config, "-e", curve_daemon.tcp, "--key-file", alice,
                  env=curve_daemon.env)
    assert (done.returncode, done.stdout) == (0, "x\n"), done.stderr
    ipc = corral("call", "echo", "x", "-c", config, "-e", curve_daemon.frontend, env=curve_daemon.env)
    assert (ipc.returncode, ipc.stdout) == (0, "x\n"), ipc.stderr   # ipc: no CURVE, no key needed


@pytest.mark.timeout(120)
def test_corral_check_names_every_kind_of_problem_in_one_run(tmp_path):
    """A non-loopback frontend (a config problem) does not hide a bad import and a
    trapping start function (module problems) in the same file."""
    (tmp_path / "imports.wat").write_text('(module (import "env" "launch" (func)))\n')
    (tmp_path / "traps.wat").write_text("(module (func $start unreachable) (start $start))\n")
    (tmp_path / "fine.wat").write_text("(module)\n")
    path = tmp_path / "corral.toml"
    path.write_text(f'[supervisor]\nfrontend = "tcp://0.0.0.0:5555"\ncache_dir = "{tmp_path}/cache"\n'
                    f'[apps.imports]\nmodule = "imports.wat"\n[apps.traps]\nmodule = "traps.wat"\n'
                    f'[apps.fine]\nmodule = "fine.wat"\n[apps.lost]\nmodule = "nowhere.wat"\n')
    done = corral("check", "-c", path)
    assert done.returncode == 78
    lines = done.stderr.splitlines()
    assert any("[supervisor] frontend: tcp://0.0.0.0:5555 is not a loopback address" in line for line in lines), lines
    assert any("[apps.lost] module: file" in line and "does not exist" in line for line in lines), lines
    assert any("[apps.imports] module:" in line and "env" in line and "launch" in line for line in lines), lines
    assert any("[apps.traps] module: its first instance fails:" in line and "unreachable" in line
               for line in lines), lines
    assert not any("[apps.fine]" in line for line in lines), lines


def readme_block(path, heading: str, language: str) -> str:
    """The first ```language block after `heading` in a markdown file."""
    text = path.read_text()
    after = text[text.index(heading):]
    start = after.index(f"```{language}\n") + len(f"```{language}\n")
    return after[start:after.index("```", start)]


DYNAMIC_UID = 61990   # in systemd's DynamicUser range, with no passwd entry: a stranger to every file


def load_as_unit_user(config, credentials=None) -> str:
    """config.load(config) in a child that has become the unit's dynamic user (another uid and
    gid, no groups): "ok", or the problems. Forked, not exec'd: this interpreter lives under
    /root, which that user cannot enter (as systemd/README.md says of a Python there)."""
    import os
    from corral import config as config_module, security  # noqa: F401  (the child cannot read /root's stdlib)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setresgid(DYNAMIC_UID, DYNAMIC_UID, DYNAMIC_UID)
            os.setresuid(DYNAMIC_UID, DYNAMIC_UID, DYNAMIC_UID)
            if credentials is not None:
                os.environ["CREDENTIALS_DIRECTORY"] = str(credentials)
            try:
                config_module.load(config)
                answer = "ok"
            except config_module.ConfigError as exc:
                answer = "\n".join(exc.problems)
            os.write(write, answer.encode())
        except BaseException:
            import traceback
            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as stream:
        answer = stream.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.timeout(180)
def test_the_systemd_curve_steps_work_for_the_units_dynamic_user(start_daemon):
    """systemd/README.md's CURVE steps, run as written (paths moved under a scratch root).
    As the unit's user, the plain secret key (0600 root) cannot be read (the unit's exit 78);
    through LoadCredential= and $CREDENTIALS_DIRECTORY it can, and the daemon serves a keyed
    client with that config."""
    import os
    import shutil
    import tempfile
    from pathlib import Path
    root = Path(tempfile.mkdtemp(prefix="crl-unit-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        corral_bin = Path(sys.executable).parent / "corral"
        steps = readme_block(REPO_ROOT / "systemd" / "README.md", "## Serve tcp clients with CURVE", "sh")
        steps = (steps.replace("/opt/corral/.venv/bin/corral", str(corral_bin)).replace("sudo ", "")
                 .replace("/etc/", f"{root}/etc/").replace("~/", f"{root}/home/"))
        for line in steps.strip().splitlines():
            done = subprocess.run(["bash", "-ec", line], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (line, done.stderr)
        keys = root / "etc" / "corral" / "keys"
        assert (keys / "clients" / "alice.key").is_file() and (keys / "server.key_secret").stat().st_mode & 0o077 == 0
        drop_in = (root / "etc" / "systemd" / "system" / "corral.service.d" / "curve.conf").read_text()
        credential, source = drop_in.split("LoadCredential=")[1].strip().split(":")
        # What systemd does at each start: a copy only the service's user can read.
        credentials = root / "credentials"
        credentials.mkdir(mode=0o500)
        shutil.copy(source, credentials / credential)
        os.chmod(credentials / credential, 0o400)
        for path in (credentials, credentials / credential):
            os.chown(path, DYNAMIC_UID, DYNAMIC_UID)

        config = root / "etc" / "corral" / "corral.toml"
        head = f'[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n'
        config.write_text(head + '[security]\ncurve_secret_key = "keys/server.key_secret"\nclient_keys = "keys/clients"\n')
        os.chmod(config, 0o644)
        plain = load_as_unit_user(config)
        assert "cannot read the certificate" in plain and "Permission denied" in plain, plain

        security = readme_block(REPO_ROOT / "systemd" / "README.md", "## Serve tcp clients with CURVE", "toml")
        config.write_text(head + security.replace("/etc/", f"{root}/etc/"))
        assert load_as_unit_user(config, credentials) == "ok"
        by_hand = corral("check", "-c", config)   # outside the unit: says how to check it
        assert by_hand.returncode == 78 and "$CREDENTIALS_DIRECTORY is not set" in by_hand.stderr, by_hand.stderr

        port = free_port()
        daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}},
                              supervisor={"workers": 1, "frontend": [f"tcp://127.0.0.1:{port}"]},
                              extra={"security": {"curve_secret_key": "$CREDENTIALS_DIRECTORY/server.key_secret",
                                                  "client_keys": str(keys / "clients")}},
                              env={"CREDENTIALS_DIRECTORY": str(credentials)})
        called = corral("call", "echo", "hi", "-e", f"tcp://127.0.0.1:{port}", "--key-file",
                        root / "home" / "corral-keys" / "alice.key_secret", "--server-key", keys / "server.key")
        assert (called.returncode, called.stdout) == (0, "hi\n"), called.stderr
        status = corral("status", "-c", daemon.config_path, env={**daemon.env, "CREDENTIALS_DIRECTORY": ""})
        assert status.returncode == 0, status.stderr   # an operator's shell: no credentials, no problem
        assert daemon.stop() == 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_every_installed_config_serves_only_installed_modules():
    """pyproject.toml's data-files, as pip lays them out in <prefix>/share/corral: each config
    installed there names modules that are installed there too (languages.toml served
    ../build/guests, which no installed package has)."""
    import glob
    import os
    import tomllib
    from corral import config as config_module
    data_files = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    installed = {f"{target}/{os.path.basename(source)}": source for target, patterns in data_files.items()
                 for pattern in patterns for source in glob.glob(str(REPO_ROOT / pattern))}
    configs = [path for path in installed if path.startswith("share/corral/config/")]
    assert "share/corral/config/corral.toml" in configs, configs
    for path in configs:
        with open(installed[path], "rb") as stream:
            doc = tomllib.load(stream)
        for name, app in doc["apps"].items():
            module = os.path.normpath(os.path.join(os.path.dirname(path), app["module"]))
            assert module in installed, f"{path}: [apps.{name}] module {app['module']} is not installed ({module})"
    assert config_module.load(REPO_ROOT / "config" / "corral.toml").apps


def test_a_missing_zig_says_what_to_run(monkeypatch, tmp_path):
    """After `./dev run` alone (no test extra), guests/build.py names the command that installs zig."""
    import importlib.util
    import shutil
    from harness import load_guest_builder
    build = load_guest_builder()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    wanted = f"run `{sys.executable} -m pip install 'ziglang>=0.13'` (or `./dev test` once"
    with pytest.raises(build.ToolchainMissing) as linker:
        build.wasm_linker(tmp_path)
    assert str(linker.value).startswith(f"no wasm linker: {wanted}"), linker.value
    with pytest.raises(build.ToolchainMissing) as compiler:
        build.zig_cc()
    assert str(compiler.value).startswith(f"no C compiler for wasm32: {wanted}"), compiler.value


@pytest.mark.timeout(180)
def test_the_default_config_test_refuses_another_daemons_port():
    """tests/test_daemon.py's packaged-config test, with something else answering on 5555 (here
    an impostor that echoes every request, as another corral would): it fails at once, saying
    why, and never takes the impostor's replies for its own daemon's."""
    import threading
    import zmq
    context = zmq.Context()
    impostor = context.socket(zmq.ROUTER)
    impostor.linger = 0
    stop = threading.Event()
    try:
        impostor.bind("tcp://127.0.0.1:5555")
    except zmq.ZMQError:
        impostor.close()
        impostor = None   # something already listens there: the test must fail all the same

    def echo() -> None:
        while not stop.is_set():
            if impostor.poll(50):
                peer, magic, request_id, service, meta, body = impostor.recv_multipart()
                impostor.send_multipart([peer, magic, request_id, b"200", body])
    thread = threading.Thread(target=echo, daemon=True) if impostor is not None else None
    if thread is not None:
        thread.start()
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_daemon.py::test_default_config_serves_the_example_guests"],
                              capture_output=True, text=True, timeout=150, cwd=REPO_ROOT)
        assert done.returncode == 1, done.stdout
        assert "another process listens on tcp://127.0.0.1:5555, where the packaged config serves" in done.stdout
        assert time.monotonic() - started < 30
    finally:
        stop.set()
        if thread is not None:
            thread.join()
            impostor.close()
        context.term()


@pytest.mark.timeout(120)
def test_the_daemon_logs_a_connection_dropped_for_a_frame_over_the_limit(start_daemon):
    import zmq
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}},
                          supervisor={"workers": 1, "max_message_kib": 1})
    socket = daemon.context.socket(zmq.DEALER)
    socket.linger = 0
    socket.connect(daemon.frontend)
    try:
        socket.send_multipart([b"CORRAL1", b"r1", b"echo", b"", b"x" * (2 * 1024 + 65536 + 1)])
        found = daemon.wait_for(lambda: daemon.events("client.disconnected"), timeout=10,
                                what="client.disconnected")
    finally:
        socket.close()
    assert found[0]["endpoint"] == daemon.frontend and found[0]["component"] == "daemon"
    assert "sent a frame over 66 KiB (twice max_message_kib, plus 64 KiB)" in found[0]["detail"]
    assert daemon.call("echo", b"still serving").body == b"still serving"


# The broker's files are being rewritten on another branch; their two citations go with it.
def test_docs_and_comments_cite_the_projects_own_docs_not_design():
    """DESIGN.md is not in the repository: what it said lives in docs/, and that is what is cited."""
    import subprocess as sp
    tracked = sp.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout.split()
    citing = [name for name in tracked if name != "tests/test_newcomer.py"
              and (REPO_ROOT / name).is_file() and "DESIGN" in (REPO_ROOT / name).read_text(errors="replace")]
    assert not citing, citing
    for doc in ("guest-abi", "state", "worker-protocol", "config", "operating"):
        assert (REPO_ROOT / "docs" / f"{doc}.md").stat().st_size > 2000, doc


def test_the_readme_is_short_and_links_only_to_files_that_exist():
    import re
    readme = (REPO_ROOT / "README.md").read_bytes()
    assert len(readme) < 15000, len(readme)
    text = readme.decode()
    assert text.splitlines()[5:7] == [
        "./dev run     # set up .venv and run the daemon on config/corral.toml (guests echo, counter, calc)",
        "./dev test    # set up .venv and the guest toolchains (apt, pip), then run the whole test suite"]
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (REPO_ROOT / target).exists(), target
    assert "pkill" not in text


def console_steps(heading: str, nth: int = 0) -> list[tuple[str, list[str]]]:
    """($ command, the lines it prints) of the nth ```console block after `heading` in README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    block = text[text.index(heading):].split("```console\n")[nth + 1].split("```")[0]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def kernel_neutral(lines: list[str]) -> list[str]:
    """`corral check`'s lines with what this kernel offers left out (the README shows one kernel's)."""
    return [re.sub(r"\(this kernel offers [^;]*;", "(this kernel offers ...;", line) for line in lines]


def run_readme_step(command: str, config, env) -> list[str]:
    import shlex
    words = shlex.split(command, comments=True)
    assert words[0] == ".venv/bin/corral", command
    words = [w if w != "durable.toml" else str(config) for w in words[1:]]
    if "-c" not in words:
        words += ["-c", str(config)]
    done = corral(*words, env=env)
    return (done.stdout + done.stderr).splitlines()


@pytest.mark.timeout(180)
def test_the_readmes_try_it_commands_print_what_it_says(start_daemon):
    daemon = start_daemon()
    for command, printed in console_steps("## Try it"):
        if "corral status" in command:
            continue   # its numbers are the reader's own
        assert run_readme_step(command, daemon.config_path, daemon.env) == printed, command


@pytest.mark.timeout(180)
def test_the_readmes_durable_counter_survives_a_trap_a_kill_and_a_restart(start_daemon):
    import signal as signals
    daemon = start_daemon({"tally": {"module": GUESTS / "counter_durable.wat", "instances": "keyed"}},
                          supervisor={"workers": 1})
    running = True   # its first `corral run` is the daemon started above
    for command, printed in console_steps("## Try it", nth=2):
        if command.startswith("kill -9"):          # the worker in slot 0, from outside
            worker = next(w for w in daemon.status()["workers"] if w["slot"] == 0)
            os_kill(worker["pid"], signals.SIGKILL)
            daemon.wait_for(lambda: any(w["pid"] != worker["pid"] and w["state"] == "ready"
                                        for w in daemon.status()["workers"]), what="a new worker")
        elif command.startswith("kill -TERM"):     # the daemon: it drains and exits 0
            assert daemon.stop() == 0
            running = False
        elif "corral run" in command:
            if not running:
                daemon.start()
                running = True
        elif "corral status" in command:
            continue
        elif "corral check" in command:
            assert kernel_neutral(run_readme_step(command, daemon.config_path, daemon.env)) == \
                kernel_neutral([f"{daemon.config_path}: ok, 1 app: tally", *printed[1:]])
        else:
            assert run_readme_step(command, daemon.config_path, daemon.env) == printed, command


def os_kill(pid: int, sig: int) -> None:
    import os
    os.kill(pid, sig)


@pytest.mark.timeout(120)
def test_the_curve_steps_of_operating_md_make_a_config_that_checks(tmp_path):
    """docs/operating.md's keygen steps, run as written under a scratch root: clients/ exists
    before a key goes in, and the config's relative [security] paths find the keys."""
    from pathlib import Path
    doc = REPO_ROOT / "docs" / "operating.md"
    corral_bin = Path(sys.executable).parent / "corral"
    steps = readme_block(doc, "## CURVE", "sh")
    for line in steps.strip().splitlines():
        line = line.split("  #")[0].replace("sudo ", "").replace("corral keygen", f"{corral_bin} keygen")
        line = line.replace("/etc/", f"{tmp_path}/etc/").replace("~/", f"{tmp_path}/home/")
        done = subprocess.run(["bash", "-ec", line], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (line, done.stderr)
    toml = readme_block(doc, "## CURVE", "toml").replace("billing.wasm", "billing.wat")
    (tmp_path / "etc" / "corral" / "billing.wat").write_bytes((GUESTS / "echo.wat").read_bytes())
    config = tmp_path / "etc" / "corral" / "corral.toml"
    config.write_text(toml.replace("ipc:///run/corral/front.sock", f"ipc://{tmp_path}/front.sock"))
    import os
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("CACHE_DIRECTORY", None)
    done = corral("check", "-c", config, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{config}: ok, 1 app: billing\n"


def test_the_config_reference_documents_every_key_the_parser_knows():
    """docs/config.md names each key of supervisor/config.py's tables, in a table row or a
    sentence of its section: a key added to the parser and not to the docs fails here."""
    import re
    from corral import config as config_module
    text = (REPO_ROOT / "docs" / "config.md").read_text()
    tables = {"supervisor": config_module._SUPERVISOR_KEYS, "restart": config_module._RESTART_KEYS,
              "logging": config_module._LOGGING_KEYS, "metrics": config_module._METRICS_KEYS,
              "state": config_module._STATE_KEYS, "cluster": config_module._CLUSTER_KEYS,
              "security": config_module._SECURITY_KEYS, "apps.NAME": config_module._APP_KEYS,
              "cordons.NAME": config_module._CORDON_KEYS}
    sections = {name: text.index(f"`[{name}]`") for name in tables}   # each table has its section
    starts = sorted(sections.values()) + [len(text)]
    missing = []
    for name, keys in tables.items():
        start = sections[name]
        section = text[start:starts[starts.index(start) + 1]]
        missing += [f"[{name}] {key}" for key in keys if not re.search(rf"`{re.escape(key)}`", section)]
    assert not missing, missing
