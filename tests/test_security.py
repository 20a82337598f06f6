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

from harness import GUESTS

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
