"""Start the real daemon as a process, talk to it over real sockets, clean up after it.

Each daemon gets a short private directory under /tmp (ipc paths must stay
under 108 bytes) holding its config, its ipc endpoints, its runtime
directory and its log. `stop()` and `cleanup()` leave nothing behind: the
daemon, its workers, the directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zmq

from corral.client import Client, Reply
from corral.config import to_toml

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "guests"
FAULTS = GUESTS / "faults" / "faults.wat"


def load_guest_builder():
    """guests/build.py as a module (guests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("corral_guest_build", GUESTS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Daemon:
    def __init__(self, apps: dict, cache_dir: Path, supervisor: dict | None = None,
                 restart: dict | None = None, logging: dict | None = None, extra: dict | None = None,
                 env: dict | None = None, command: list[str] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="crl-", dir="/tmp"))
        self.frontend = f"ipc://{self.root / 'front.sock'}"
        self.control = f"ipc://{self.root / 'control.sock'}"
        self.config_path = self.root / "corral.toml"
        self.log_path = self.root / "daemon.log"
        sup = {"frontend": self.frontend, "control": self.control, "workers": 2,
               "heartbeat_ms": 200, "graceful_timeout_s": 5, "cache_dir": str(cache_dir),
               "state_dir": str(self.root / "state")}
        sup.update(supervisor or {})
        self.doc = {"supervisor": sup, "restart": restart or {}, "logging": logging or {},
                    **(extra or {}), "apps": apps}
        self.write_config()
        self.env = {**os.environ, "RUNTIME_DIRECTORY": str(self.root / "run")}
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None
        self.command = command or [sys.executable, "-m", "corral"]   # how `corral` is started
        self.context = zmq.Context()
        self.clients: list[Client] = []
        self._client: Client | None = None
        self.seen_workers: set[int] = set()

    def write_config(self) -> None:
        self.config_path.write_text(to_toml(self.doc))

    # --- life ----------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float = 30.0) -> "Daemon":
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*self.command, "run", "-c", str(self.config_path)],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0, workers: int | None = None) -> dict:
        """Wait until every wanted worker is ready on the current config."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status = self.status(timeout=1.0)
            except TimeoutError:
                continue
            want = workers if workers is not None else status["workers_target"]
            ready = [w for w in status["workers"] if w["state"] == "ready"
                     and w["config_generation"] == status["config_generation"]]
            if status["state"] == "running" and len(ready) >= want:
                self.seen_workers.update(w["pid"] for w in status["workers"])
                return status
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the daemon and wait for it; returns its exit code."""
        for client in self.clients:
            client.close()
        self.clients.clear()
        self._client = None
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log_tail()}") from None
        self.log_file.close()
        return self.process.returncode

    def leftover_processes(self) -> list[psutil.Process]:
        """Worker processes of this daemon still alive (should be none once it stopped)."""
        left = []
        for pid in self.seen_workers:
            try:
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process)
            except psutil.NoSuchProcess:
                pass
        marker = str(self.root)
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = process.info["cmdline"] or []
            if any(marker in part for part in cmdline) and process.pid not in {p.pid for p in left}:
                try:
                    if process.status() != psutil.STATUS_ZOMBIE:
                        left.append(process)
                except psutil.NoSuchProcess:
                    pass
        return left

    def cleanup(self) -> list[int]:
        """Stop everything this daemon started; return the pids that had to be killed."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.stop(timeout=20)
        except AssertionError:
            pass
        killed = []
        for process in self.leftover_processes():
            try:
                process.kill()
                killed.append(process.pid)
            except psutil.NoSuchProcess:
                pass
        self.context.destroy(linger=0)
        shutil.rmtree(self.root, ignore_errors=True)
        return killed

    # --- talking to it ---------------------------------------------------------

    def client(self) -> Client:
        client = Client(self.frontend, self.context)
        self.clients.append(client)
        return client

    def call(self, service: str, body: bytes = b"", timeout: float = 10.0, **meta) -> Reply:
        if self._client is None:
            self._client = self.client()
        return self._client.call(service, body, timeout=timeout, **meta)

    def control_request(self, verb: str, args: dict | None = None, timeout: float = 5.0) -> dict:
        socket = self.context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(self.control)
            socket.send_multipart([verb.encode(), json.dumps(args or {}).encode()])
            if not socket.poll(int(timeout * 1000)):
                raise TimeoutError(f"no answer to {verb} on the control endpoint")
            return json.loads(socket.recv())
        finally:
            socket.close()

    def status(self, timeout: float = 5.0) -> dict:
        status = self.control_request("status", timeout=timeout)
        self.seen_workers.update(w["pid"] for w in status["workers"])
        return status

    @property
    def backend(self) -> str:
        """The workers' endpoint: workers.sock in the daemon's run directory (daemon-<pid>)."""
        return f"ipc://{Path(self.env['RUNTIME_DIRECTORY']) / f'daemon-{self.process.pid}' / 'workers.sock'}"

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["state"] == "ready"]

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached within {timeout} s:\n{self.log_tail()}")

    # --- its log ---------------------------------------------------------------

    def events(self, name: str | None = None) -> list[dict]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                events.append(event)
        return events

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
