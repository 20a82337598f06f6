"""Confinement, the second wall (docs/confinement.md), looked at from outside the workers.

A real daemon, real workers; a simulated escape: tests/injector.c (compiled here
with gcc) makes a live worker's main thread run one system call from its own
libc, as a guest that broke out of Wasm would. The same injections are first
shown to go through on unconfined workers, so these tests can fail.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import FAULTS, GUESTS


SYS_OPEN, SYS_CLOSE, SYS_SOCKET, SYS_GETPID, SYS_FORK, SYS_EXECVE = 2, 3, 41, 39, 57, 59
O_RDONLY = 0


@pytest.fixture(scope="module")
def injector(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("injector") / "injector"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(Path(__file__).parent / "injector.c")],
                   check=True)
    return out


def inject(injector: Path, pid: int, nr: int, *args) -> tuple[str, int | None]:
    """("result", value) or ("killed", signal) or ("exec", None)."""
    done = subprocess.run([str(injector), str(pid), str(nr), *map(str, args)], capture_output=True, text=True,
                          timeout=20)
    assert done.returncode == 0, done.stderr
    word, *value = done.stdout.split()
    return word, int(value[0]) if value else None


def apps(timeout_ms: int = 20_000) -> dict:
    return {"echo": {"module": GUESTS / "echo.wat"},
            "faults": {"module": FAULTS, "timeout_ms": timeout_ms}}


def one_worker(start_daemon, **supervisor):
    daemon = start_daemon(apps(), supervisor={"workers": 1, **supervisor})
    [pid] = daemon.worker_pids()
    return daemon, pid


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


# --- every worker is confined --------------------------------------------------------------

def test_every_worker_runs_under_seccomp_and_no_new_privileges(start_daemon):
    daemon = start_daemon(apps(), supervisor={"workers": 2, "standby": 1})
    workers = daemon.wait_for(lambda: [w for w in daemon.status()["workers"] if w["state"] in ("ready", "standby")]
                              if len(daemon.status()["workers"]) == 3 else None, what="two workers and a standby", timeout=30)
    for pid in [w["pid"] for w in workers]:
        fields = status_fields(pid)
        assert fields["Seccomp"] == "2", (pid, fields["Seccomp"])   # 2: a filter
        assert fields["NoNewPrivs"] == "1"
        assert fields["Seccomp_filters"] == "1"
    assert len(workers) == 3 and all(w["seccomp"] is True and w["landlock"] >= 1 and w["uid"] == os.getuid()
                           for w in workers), workers


def test_confinement_off_leaves_only_no_new_privileges(start_daemon):
    daemon = start_daemon(apps(), supervisor={"workers": 1, "confinement": "off"})
    [pid] = daemon.worker_pids()
    fields = status_fields(pid)
    assert (fields["Seccomp"], fields["NoNewPrivs"]) == ("0", "1")
    [worker] = daemon.status()["workers"]
    assert (worker["seccomp"], worker["landlock"]) == (False, 0)


# --- a simulated escape --------------------------------------------------------------------

def test_the_injection_goes_through_on_an_unconfined_worker(start_daemon, injector):
    """The control: without confinement, every call the tests below expect to fail succeeds."""
    daemon, pid = one_worker(start_daemon, confinement="off")
    assert inject(injector, pid, SYS_GETPID) == ("result", pid)
    word, fd = inject(injector, pid, SYS_SOCKET, socket.AF_INET, socket.SOCK_STREAM, 0)
    assert word == "result" and fd >= 0
    assert inject(injector, pid, SYS_CLOSE, fd) == ("result", 0)
    word, fd = inject(injector, pid, SYS_OPEN, "s:/etc/shadow", O_RDONLY)
    assert word == "result" and fd >= 0
    assert inject(injector, pid, SYS_CLOSE, fd) == ("result", 0)
    word, child = inject(injector, pid, SYS_FORK)
    assert word == "result" and child > 0
    os.kill(child, signal.SIGKILL)   # a copy of the worker, stopped before it does anything
    assert daemon.call("echo", b"still serving").body == b"still serving"
    assert inject(injector, pid, SYS_EXECVE, "s:/bin/true", 0, 0) == ("exec", None)
    daemon.wait_for(lambda: daemon.worker_pids() and pid not in daemon.worker_pids(), what="a new worker")
    daemon.wait_ready()
    assert daemon.call("echo", b"after").status == 200


@pytest.mark.parametrize("call", ["execve", "fork", "socket AF_INET"])
def test_a_forbidden_call_kills_the_worker_and_only_its_request_fails(start_daemon, injector, call):
    daemon, pid = one_worker(start_daemon)
    client = daemon.client()
    held = client.send("faults", b"loop")   # the worker is running guest code when the call comes
    time.sleep(0.5)
    nr, args = {"execve": (SYS_EXECVE, ("s:/bin/true", 0, 0)), "fork": (SYS_FORK, ()),
                "socket AF_INET": (SYS_SOCKET, (socket.AF_INET, socket.SOCK_STREAM, 0))}[call]
    assert inject(injector, pid, nr, *args) == ("killed", signal.SIGSYS)
    reply = client.gather([held], timeout=10)[held]
    assert reply.status == 502
    assert b"seccomp" in reply.body and b"SIGSYS" in reply.body, reply.body
    exited = daemon.wait_for(lambda: [e for e in daemon.events("worker.exited") if e.get("pid") == pid],
                             what="the worker's exit")
    assert "SIGSYS" in exited[0]["how"]
    daemon.wait_ready()
    assert pid not in daemon.worker_pids()
    for _ in range(5):
        assert daemon.call("echo", b"later").status == 200


def test_landlock_refuses_files_outside_the_worker_s_own(start_daemon, injector, tmp_path):
    daemon, pid = one_worker(start_daemon)
    assert inject(injector, pid, SYS_OPEN, "s:/etc/shadow", O_RDONLY) == ("result", -errno.EACCES)
    assert inject(injector, pid, SYS_OPEN, "s:/etc/passwd", O_RDONLY) == ("result", -errno.EACCES)
    outside = tmp_path / "planted"
    assert inject(injector, pid, SYS_OPEN, f"s:{outside}", os.O_WRONLY | os.O_CREAT) == ("result", -errno.EACCES)
    assert not outside.exists()
    assert pid in daemon.worker_pids()   # a refused open is not a death: the worker serves on
    assert daemon.call("echo", b"still here").body == b"still here"


# --- the modes -------------------------------------------------------------------------------

# A kernel without Landlock, made real for one process tree: a seccomp filter (inherited by
# everything it starts) that answers landlock_create_ruleset with ENOSYS, as an old kernel does.
NO_LANDLOCK = [sys.executable, "-c", """
import os, sys, pyseccomp as sc
f = sc.SyscallFilter(sc.ALLOW)
f.add_rule(sc.ERRNO(38), "landlock_create_ruleset")
f.load()
os.execv(sys.executable, [sys.executable, "-m", "corral", *sys.argv[1:]])
"""]


def test_require_refuses_to_start_without_landlock_and_names_it(start_daemon):
    daemon = start_daemon(apps(), supervisor={"confinement": "require"}, command=NO_LANDLOCK, wait=False)
    assert daemon.process.wait(timeout=30) == 78
    problems = [e["problem"] for e in daemon.events("config.invalid")]
    assert problems and "confinement" in problems[0] and "Landlock" in problems[0], problems


def test_best_effort_takes_what_there_is_and_says_once_what_is_missing(start_daemon):
    daemon = start_daemon(apps(), supervisor={"confinement": "best-effort", "workers": 2}, command=NO_LANDLOCK)
    [partial] = daemon.events("daemon.confinement_partial")
    assert "Landlock" in " ".join(partial["missing"])
    workers = daemon.status()["workers"]
    assert [(w["seccomp"], w["landlock"]) for w in workers] == [(True, 0), (True, 0)]
    for pid in daemon.worker_pids():
        assert status_fields(pid)["Seccomp"] == "2"
    assert daemon.call("echo", b"x").status == 200


def test_a_bad_mode_is_a_config_error_naming_the_key(tmp_path):
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\nconfinement = "sometimes"\n[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n')
    done = subprocess.run([sys.executable, "-m", "corral", "check", "-c", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 78
    assert "[supervisor] confinement" in done.stderr and "sometimes" in done.stderr


def test_corral_check_says_what_this_kernel_offers(tmp_path):
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\ncache_dir = "{tmp_path / "cache"}"\n'
                      f'[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n')
    done = subprocess.run([sys.executable, "-m", "corral", "check", "-c", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from corral.workers.confine import landlock_abi
    assert f"corral: confinement: require (this kernel offers seccomp filters, Landlock ABI {landlock_abi()}" \
        in done.stderr, done.stderr


def test_the_check_child_is_confined_while_it_runs_a_first_instance(start_daemon, tmp_path):
    """The check child compiles modules and makes their first instance: it is under the same
    filter. A start function that spins keeps it alive long enough to look at it."""
    import psutil
    spin = tmp_path / "spin.wat"
    spin.write_text("(module (func $spin (loop $l (br $l))) (start $spin))\n")
    daemon = start_daemon({"spin": {"module": spin, "timeout_ms": 4000}}, wait=False)
    daemon_process = psutil.Process(daemon.process.pid)
    child = daemon.wait_for(lambda: [p for p in daemon_process.children()
                                     if "corral.workers.check" in " ".join(p.cmdline())], what="the check child")[0]
    time.sleep(0.5)   # past its start-up: compiling, then the first instance
    fields = status_fields(child.pid)
    assert (fields["Seccomp"], fields["NoNewPrivs"]) == ("2", "1")
    assert daemon.process.wait(timeout=30) == 78   # the module's first instance never returns
    assert "first instance" in " ".join(e["problem"] for e in daemon.events("config.invalid"))


def test_a_request_whose_worker_dies_of_seccomp_counts_as_its_abort(start_daemon, injector):
    """Three escapes on the same request body quarantine it, as three traps would (circuit.py)."""
    daemon = start_daemon(apps(), supervisor={"workers": 1}, restart={"intensity": 100})
    client = daemon.client()
    for _ in range(3):
        daemon.wait_ready()
        [pid] = daemon.worker_pids()
        held = client.send("faults", b"loop")
        time.sleep(0.5)
        assert inject(injector, pid, SYS_SOCKET, socket.AF_INET, socket.SOCK_STREAM, 0) == ("killed", signal.SIGSYS)
        assert client.gather([held], timeout=10)[held].status == 502
        daemon.wait_for(lambda: pid not in daemon.worker_pids() and daemon.worker_pids(), what="a new worker")
    reply = client.call("faults", b"loop", timeout=10)
    assert (reply.status, reply.body) == (502, b"quarantined: this request aborted instances repeatedly")
    assert daemon.call("echo", b"others pass").status == 200
