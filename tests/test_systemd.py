"""corral as a systemd service: the unit file, sd_notify, and dying without orphans.

There is no systemd to start the daemon here (nor in CI), so each part of
the contract is checked where it can be checked for real:

- the unit file, with `systemd-analyze verify` (and `security --offline`);
- sd_notify, through a real AF_UNIX datagram socket passed as $NOTIFY_SOCKET
  to a real daemon, as systemd would (READY, STATUS, WATCHDOG, RELOADING,
  STOPPING);
- what KillMode=mixed and a SIGKILL rely on: workers die with the daemon,
  and the next daemon cleans up after a killed one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from corral.pool import WORKER_MARKER
from harness import GUESTS, REPO

UNIT = REPO / "systemd" / "corral.service"
SAMPLE_CONFIG = REPO / "systemd" / "corral.toml"
INSTALLED_VENV = "/opt/corral/.venv"

pytestmark = pytest.mark.timeout(60)


# --- the unit file ------------------------------------------------------------


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: install Debian's `systemd` package "
                    "(./dev test does it)", pytrace=False)
    return path


def unit_directives(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, every value of each key (no sections: keys are unique)."""
    directives: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def runnable_corral() -> str:
    """This checkout's `corral`, as a command line systemd could exec."""
    script = Path(sysconfig.get_path("scripts")) / "corral"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return f"{sys.executable} -m corral"


def unit_with_this_checkouts_corral(tmp_path: Path, text: str | None = None) -> Path:
    """The unit, with /opt/corral/.venv/bin/corral replaced by this checkout's corral.

    `systemd-analyze verify` checks that every Exec*= binary exists and is
    executable, and /opt/corral/.venv (where the unit expects an operator to
    install corral) does not exist on a build machine. Rewriting only that
    path, to a corral that does exist, keeps everything else verify checks
    (every key, every value, the Exec lines' syntax) about the real file.
    """
    text = UNIT.read_text() if text is None else text
    assert f"{INSTALLED_VENV}/bin/corral " in text
    path = tmp_path / "corral.service"
    path.write_text(text.replace(f"{INSTALLED_VENV}/bin/corral ", runnable_corral() + " "))
    return path


def verify(unit: Path) -> list[str]:
    """Run `systemd-analyze verify`; return its complaints about this unit file.

    verify exits 0 on unknown keys and unparsable values (it only warns,
    as systemd does when it loads such a unit), so its output is checked
    too; lines about other units (the host's own) are not ours to judge.
    """
    run = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""})
    output = (run.stdout + run.stderr).splitlines()
    complaints = [line for line in output if unit.name in line or str(unit) in line]
    if run.returncode != 0:
        complaints.append(f"systemd-analyze verify exited {run.returncode}: {run.stdout}{run.stderr}")
    return complaints


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    assert verify(unit_with_this_checkouts_corral(tmp_path)) == []


def test_verify_complains_about_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt key and a bad value are caught."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixed\nKillMood=mixed\nOOMPolicy=sometimes")
    complaints = verify(unit_with_this_checkouts_corral(tmp_path, broken))
    assert any("KillMood" in line for line in complaints), complaints
    assert any("sometimes" in line for line in complaints), complaints


def test_unit_file_keeps_the_daemons_contract():
    """The lines the daemon's behaviour depends on (docs/operating.md)."""
    unit = unit_directives(UNIT.read_text())
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] in ("notify", "notify-reload")
    if one["Type"] == "notify":
        assert one["ExecReload"] == f"{INSTALLED_VENV}/bin/corral reload -c /etc/corral/corral.toml"
    assert one["NotifyAccess"] == "main"
    assert re.fullmatch(rf"{INSTALLED_VENV}/bin/corral run -c /etc/corral/corral\.toml", one["ExecStart"])
    assert one["KillMode"] == "mixed"
    assert one["OOMPolicy"] == "continue"
    assert one["Restart"] == "on-failure"
    assert "78" in one["RestartPreventExitStatus"].split()
    assert "69" not in one["RestartPreventExitStatus"].split()
    assert one["RuntimeDirectory"] == "corral" and one["CacheDirectory"] == "corral"
    assert one["LimitCORE"] == "0"
    assert "StartLimitIntervalSec" in unit and "StartLimitBurst" in unit
    # wasmtime writes machine code at run time: W^X would break every guest.
    assert one.get("MemoryDenyWriteExecute", "no") == "no"
    # SIGTERM must outlast the drain of the shipped config, and the watchdog
    # be long enough for the main loop (it polls at least once a second).
    graceful = tomllib.loads(SAMPLE_CONFIG.read_text())["supervisor"]["graceful_timeout_s"]
    assert seconds(one["TimeoutStopSec"]) > graceful + 5
    assert seconds(one["WatchdogSec"]) >= 10


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_unit_hardening_exposure_stays_low(tmp_path):
    """`systemd-analyze security` scores the sandbox; keep it at "OK" or better."""
    analyze = systemd_analyze()
    probe = subprocess.run([analyze, "security", "--help"], capture_output=True, text=True, timeout=30)
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    unit = unit_with_this_checkouts_corral(tmp_path)
    run = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", "--threshold=20", str(unit)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"})
    assert run.returncode == 0, f"exposure over 2.0:\n{run.stdout}{run.stderr}"


def test_sample_config_is_valid_and_points_at_the_installed_guests(tmp_path):
    """systemd/corral.toml passes `corral check` once its install paths are mapped to this checkout.

    Its modules live in <venv>/share/corral/guests/, where pip puts the
    guests/*.wat of pyproject.toml's data-files; its control socket lies in
    /run/corral, which only exists while the service runs.
    """
    text = SAMPLE_CONFIG.read_text()
    doc = tomllib.loads(text)
    assert doc["supervisor"]["control"] == "ipc:///run/corral/control.sock"
    assert doc["supervisor"]["frontend"].startswith("tcp://")
    installed = f"{INSTALLED_VENV}/share/corral/guests/"
    for name, app in doc["apps"].items():
        assert app["module"].startswith(installed), name
        assert (GUESTS / app["module"].removeprefix(installed)).is_file(), name
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "guests/*.wat" in pyproject["tool"]["setuptools"]["data-files"]["share/corral/guests"]

    runtime = Path(tempfile.mkdtemp(prefix="crl-s-", dir="/tmp"))
    try:
        config = tmp_path / "corral.toml"
        config.write_text(text.replace(installed, f"{GUESTS}/")
                          .replace("ipc:///run/corral/", f"ipc://{runtime}/"))
        env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime), "CACHE_DIRECTORY": str(tmp_path / "cache")}
        run = subprocess.run([sys.executable, "-m", "corral", "check", "-c", str(config)],
                             capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "3 apps" in run.stdout
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


# --- sd_notify ------------------------------------------------------------------


@dataclass
class Message:
    fields: dict[str, str]
    at: float                                   # time.monotonic() when received
    log_events: list[dict] = field(default_factory=list)   # the daemon's log then (READY=1 only)


class NotifySocket:
    """What systemd's end of $NOTIFY_SOCKET sees: every datagram, timestamped, in order.

    Reads in a thread of its own and does nothing slow there: a unix
    datagram socket queues only a few messages (net.unix.max_dgram_qlen)
    and the daemon drops what does not fit rather than block.
    """

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="crl-n-", dir="/tmp"))
        self.path = str(self.dir / "notify.sock")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.05)
        self.messages: list[Message] = []
        self.changed = threading.Condition()
        self.daemon = None            # set once started: READY=1 snapshots its log
        self.stopped = False
        self.thread = threading.Thread(target=self.receive, daemon=True)
        self.thread.start()

    def receive(self) -> None:
        while not self.stopped:
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            message = Message(fields, at)
            if fields.get("READY") == "1" and self.daemon is not None:
                message.log_events = self.daemon.events()
            with self.changed:
                self.messages.append(message)
                self.changed.notify_all()

    def wait(self, predicate, after: int = 0, timeout: float = 30.0, what: str = "message") -> tuple[int, Message]:
        """The first message from index `after` on that matches; (index, message)."""
        end = time.monotonic() + timeout
        with self.changed:
            while True:
                for index in range(after, len(self.messages)):
                    if predicate(self.messages[index].fields):
                        return index, self.messages[index]
                left = end - time.monotonic()
                if left <= 0:
                    seen = [m.fields for m in self.messages[after:] if "WATCHDOG" not in m.fields]
                    raise AssertionError(f"no {what} within {timeout} s; got {seen}")
                self.changed.wait(left)

    def snapshot(self) -> list[Message]:
        with self.changed:
            return list(self.messages)

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.socket.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


def ready(fields):
    return fields.get("READY") == "1"


def is_key(key):
    return lambda fields: key in fields


def daemon_events(events: list[dict], name: str) -> list[dict]:
    """The daemon's own events called `name` (workers log to the same stream)."""
    return [e for e in events if e.get("event") == name and e.get("component") == "daemon"]


def served(status: str) -> int:
    match = re.search(r"(\d+) served", status)
    return int(match.group(1)) if match else -1


@pytest.mark.timeout(120)
def test_sd_notify_ready_status_watchdog_reload_stop(start_daemon, notify_socket):
    workers = 3
    daemon = start_daemon(None, wait=False, supervisor={"workers": workers},
                          env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"})
    notify_socket.daemon = daemon

    # READY=1 only once every worker is up: by the time it arrives, the
    # daemon has logged worker.ready for each of them, and its status says so.
    index, message = notify_socket.wait(ready, what="READY=1")
    started = daemon_events(message.log_events, "worker.ready")
    assert len(started) == workers, f"READY=1 came after {len(started)} of {workers} worker.ready"
    status = daemon.status()
    assert [w["state"] for w in status["workers"]] == ["ready"] * workers
    assert message.fields.get("STATUS", "").startswith(f"{workers}/{workers} workers ready")
    before = [m.fields for m in notify_socket.snapshot()[:index]]
    assert not any(ready(f) or "RELOADING" in f or "STOPPING" in f for f in before), before

    # STATUS= carries live counts (re-sent every 2 s when it changed).
    for n in range(7):
        assert daemon.call("echo", b"hello %d" % n).status == 200
    notify_socket.wait(lambda f: served(f.get("STATUS", "")) >= 7, after=index, timeout=10,
                       what="STATUS= counting 7 served requests")

    # WATCHDOG=1 at half of WATCHDOG_USEC (200 ms): about 10 in 2 s.
    window_start = time.monotonic()
    time.sleep(2.0)
    pings = [m.at for m in notify_socket.snapshot()
             if "WATCHDOG" in m.fields and window_start <= m.at <= window_start + 2.0]
    assert all(m.fields["WATCHDOG"] == "1" for m in notify_socket.snapshot() if "WATCHDOG" in m.fields)
    assert 4 <= len(pings) <= 16, f"{len(pings)} WATCHDOG=1 in 2 s, expected about 10"
    gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
    assert 0.1 <= gaps[len(gaps) // 2] <= 0.4, f"median gap between pings {gaps[len(gaps) // 2]:.3f} s"

    # SIGHUP: RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC, as systemd
    # compares it), then READY=1 once every worker rolled onto the new config.
    mark = len(notify_socket.snapshot())
    sent_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.process.send_signal(signal.SIGHUP)
    index, message = notify_socket.wait(is_key("RELOADING"), after=mark, timeout=10, what="RELOADING=1")
    assert message.fields["RELOADING"] == "1"
    monotonic_usec = int(message.fields["MONOTONIC_USEC"])
    received_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sent_usec <= monotonic_usec <= received_usec
    index, message = notify_socket.wait(ready, after=index, timeout=30, what="READY=1 after the reload")
    started = daemon_events(message.log_events, "worker.ready")
    assert len(started) >= 2 * workers, "READY=1 before every worker rolled onto the new config"
    assert any(e.get("event") == "reload.done" for e in message.log_events)
    status = daemon.status()
    current = [w for w in status["workers"]
               if w["state"] == "ready" and w["config_generation"] == status["config_generation"]]
    assert status["config_generation"] == 2 and len(current) == workers, status["workers"]
    assert daemon.call("echo", b"after reload").status == 200

    # SIGTERM: STOPPING=1, then a clean exit.
    mark = len(notify_socket.snapshot())
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()
    after = [m.fields for m in notify_socket.snapshot()[mark:]]
    assert {"STOPPING": "1"} in after, after
    stopping_at = after.index({"STOPPING": "1"})
    assert not any(ready(f) for f in after[stopping_at:]), after


@pytest.mark.timeout(60)
def test_watchdog_meant_for_another_process_is_not_pinged(start_daemon, notify_socket):
    """WATCHDOG_PID names the process systemd watches; a child that inherits it stays quiet."""
    other = os.getpid()   # the test process: certainly not the daemon
    daemon = start_daemon(None, wait=False, supervisor={"workers": 1},
                          env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000",
                               "WATCHDOG_PID": str(other)})
    notify_socket.wait(ready, what="READY=1")
    time.sleep(1.0)
    assert not any("WATCHDOG" in m.fields for m in notify_socket.snapshot())
    assert daemon.stop() == 0


# --- dying ----------------------------------------------------------------------


def gone(process: psutil.Process) -> bool:
    """Exited (a zombie waiting for whoever inherited it counts as exited)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(60)
def test_sigkill_of_the_daemon_takes_its_workers_along(start_daemon):
    """No orphans even when the daemon cannot clean up: the workers' parent-death signal."""
    daemon = start_daemon(None, supervisor={"workers": 3})
    workers = [psutil.Process(w["pid"]) for w in daemon.status()["workers"]]
    assert len(workers) == 3 and not any(gone(w) for w in workers)
    daemon.process.kill()
    daemon.process.wait(10)
    end = time.monotonic() + 2.0
    while time.monotonic() < end and not all(gone(w) for w in workers):
        time.sleep(0.02)
    left = [w.pid for w in workers if not gone(w)]
    assert not left, f"workers {left} outlived their SIGKILLed daemon by 2 s"
    # Its socket files stay behind, stale: the next daemon on the same endpoints starts all the same.
    assert os.path.exists(daemon.frontend[len("ipc://"):]) and os.path.exists(daemon.control[len("ipc://"):])
    daemon.start()
    assert daemon.call("echo", b"again").body == b"again"


@pytest.mark.timeout(90)
def test_next_daemon_cleans_up_after_a_sigkilled_one(start_daemon):
    """A daemon starting on the runtime directory of a killed one removes what it left.

    The killed daemon's daemon-<pid>/ directory (its worker sockets and
    specs) stays behind; so would a worker that survived it, if its
    parent-death signal ever failed. That worker is played here by a process
    carrying the dead daemon's marker in its environment, as kill_stale_workers
    looks for exactly that; a process that only imitates a worker's command
    line is left alone.
    """
    first = start_daemon(None, supervisor={"workers": 1})
    runtime = first.root / "run"
    first_pid = first.process.pid
    stale_dir = runtime / f"daemon-{first_pid}"
    assert stale_dir.is_dir() and (stale_dir / "spec-1.default.json").is_file()
    worker = psutil.Process(first.status()["workers"][0]["pid"])
    first.process.kill()
    first.process.wait(10)   # reaped: the pid no longer exists (systemd would reap it too)
    deadline = time.monotonic() + 2.0
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone(worker)
    assert stale_dir.is_dir(), "nothing removes a SIGKILLed daemon's directory but the next daemon"

    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                env={**os.environ, WORKER_MARKER: str(stale_dir)})
    lookalike = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)",
         "-P", "-m", "corral.workers", str(stale_dir / "spec-1.default.json"), "--slot", "0", "--generation", "1",
         "--parent", str(first_pid)])
    try:
        second = start_daemon(None, supervisor={"workers": 1}, env={"RUNTIME_DIRECTORY": str(runtime)})
        assert impostor.wait(10) == -signal.SIGKILL
        assert not stale_dir.exists(), f"{stale_dir} left behind"
        second_pid = second.process.pid
        assert (runtime / f"daemon-{second_pid}").is_dir()
        assert [e["pid"] for e in second.events("worker.stale_killed")] == [impostor.pid]
        assert second.call("echo", b"still serving").status == 200
        assert lookalike.poll() is None, "a command line alone marks no process as a worker"
        assert second.stop() == 0
        assert not (runtime / f"daemon-{second_pid}").exists(), "a clean stop removes its own directory"
    finally:
        for process in (impostor, lookalike):
            if process.poll() is None:
                process.kill()
                process.wait()
