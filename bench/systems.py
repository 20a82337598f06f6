"""The systems under load and the processes behind them: (a) the one-hop pyzmq echo,
(b) zmq.proxy + REP workers, (c) the real corral daemon, (d) corral from another
checkout; every process each the leader of its own group, all stopped at the end."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import zmq

from corral.config import to_toml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GUESTS = REPO / "guests"
ECHO = GUESTS / "echo.wat"
COUNTER = GUESTS / "counter.wat"
COUNTER_DURABLE = GUESTS / "counter_durable.wat"
BASELINES = BENCH / "baselines.py"
TRACER = BENCH / "tracer"   # the hops section's sitecustomize.py


class BenchError(Exception):
    """Something the benchmark needs did not happen (a server did not start, a daemon failed)."""


class Processes:
    """Every process the benchmark starts, each the leader of a new process group."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        self.env.pop("NOTIFY_SOCKET", None)
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path | None = None, pipe: bool = False,
              env: dict | None = None, death_signal: int = signal.SIGKILL) -> subprocess.Popen:
        """Start a process as the leader of a new process group. `death_signal` reaches it if
        this script dies without cleaning up (SIGKILL cannot be caught): no orphans even then.

        A process group, not a session of its own: Linux schedules each session as one
        group (CFS autogroup), so one session per server process gave (b)'s proxy and
        each of its workers a group of their own while corral's daemon and workers shared
        one, and under load the load generator's I/O thread, in this script's group, was
        starved of a core for 15-200 ms at a time (bench/README.md, "Noise"). In one
        session every thread of every system is scheduled alike."""
        stdout = subprocess.PIPE if pipe else (open(log, "ab") if log else subprocess.DEVNULL)
        try:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout,
                                       stderr=subprocess.STDOUT if log else None,
                                       env={**self.env, **(env or {})}, cwd=self.root,
                                       process_group=0,
                                       preexec_fn=lambda: _die_with_parent(death_signal))
        finally:
            if log:
                stdout.close()
        self.started.append(process)
        return process

    def start_ready(self, args: list[str], timeout: float = 15.0) -> subprocess.Popen:
        """Start a baseline server and wait for its "ready" line."""
        process = self.start(args, pipe=True)
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        try:
            if not selector.select(timeout):
                raise BenchError(f"{' '.join(args[1:3])}: not ready within {timeout:g} s")
            line = process.stdout.readline()
            if line.strip() != b"ready":
                raise BenchError(f"{' '.join(args[1:3])}: exited or said {line!r} instead of ready")
        finally:
            selector.close()
        return process

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 3.0) -> int | None:
        """Stop a process and every process in its group; returns its exit code."""
        try:
            if process.poll() is None:
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        except ProcessLookupError:
            pass
        self.kill_group(process.pid)
        if process.poll() is None:
            process.kill()
        code = process.wait()
        if process.stdout:
            process.stdout.close()
        if process in self.started:
            self.started.remove(process)
        return code

    @staticmethod
    def group_members(pgid: int) -> list[int]:
        """Live (not zombie) processes of a process group."""
        import psutil
        members = []
        for process in psutil.process_iter(["pid", "status"]):
            try:
                if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                    members.append(process.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return members

    def kill_group(self, pgid: int, grace_s: float = 0.0) -> list[int]:
        """SIGKILL whatever is still alive in a group after grace_s; returns what was left."""
        end = time.monotonic() + grace_s
        left = self.group_members(pgid)
        while left and time.monotonic() < end:
            time.sleep(0.05)
            left = self.group_members(pgid)
        if left:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            end = time.monotonic() + 2.0
            while self.group_members(pgid) and time.monotonic() < end:
                time.sleep(0.02)
        return left

    def stop_all(self) -> None:
        for process in reversed(list(self.started)):
            self.stop(process, timeout=1.0)


_libc = None


def _die_with_parent(signum: int) -> None:
    """In the child, before exec: prctl(PR_SET_PDEATHSIG) (Linux; elsewhere nothing)."""
    global _libc
    try:
        import ctypes
        _libc = _libc or ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, int(signum), 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoints:
    """ipc:// paths under the run's directory, or tcp:// on 127.0.0.1 with free ports."""

    def __init__(self, root: Path, transport: str):
        self.root, self.transport = root, transport

    def __call__(self, name: str) -> str:
        if self.transport == "ipc":
            return f"ipc://{self.root / (name + '.sock')}"
        return f"tcp://127.0.0.1:{free_port()}"


class EchoServer:
    """(a) one hop: a Python ROUTER that answers every request itself."""
    label = "a  pyzmq ROUTER echo, one hop"
    framing = "native"

    def __init__(self, procs: Processes, endpoints: Endpoints, opts):
        self.procs, self.endpoint, self.opts = procs, endpoints("echo"), opts

    def start(self) -> None:
        args = [sys.executable, str(BASELINES), "echo", self.endpoint]
        if self.opts.baseline_multipart:
            args.append("--multipart")
        self.process = self.procs.start_ready(args)

    def roles(self) -> dict[str, list[int]]:
        return {"server": [self.process.pid]}

    def stop(self) -> None:
        if getattr(self, "process", None) is not None:
            self.procs.stop(self.process)


class ProxyServer:
    """(b) the C zmq.proxy (ROUTER to DEALER) in front of N Python REP workers."""
    framing = "reqrep"

    def __init__(self, procs: Processes, endpoints: Endpoints, opts):
        self.procs, self.opts = procs, opts
        self.endpoint, self.backend = endpoints("proxy-front"), endpoints("proxy-back")
        self.label = f"b  zmq.proxy + {opts.workers} Python REP worker{'s' * (opts.workers != 1)}"

    def start(self) -> None:
        self.proxy = self.procs.start_ready([sys.executable, str(BASELINES), "proxy", self.endpoint,
                                             self.backend])
        rep = [sys.executable, str(BASELINES), "rep", self.backend]
        if self.opts.baseline_multipart:
            rep.append("--multipart")
        self.reps = [self.procs.start_ready(rep) for _ in range(self.opts.workers)]
        # The DEALER backend round-robins over the peers it has: let every REP's
        # connection complete before the first request (the warm-up follows).
        time.sleep(0.3)

    def roles(self) -> dict[str, list[int]]:
        return {"proxy": [self.proxy.pid], "workers": [p.pid for p in self.reps]}

    def stop(self) -> None:
        for process in getattr(self, "reps", []) + [getattr(self, "proxy", None)]:
            if process is not None:
                self.procs.stop(process)


class Corral:
    """(c) the real daemon: `python -m corral run -c <temp config>`."""
    framing = "native"

    def __init__(self, procs: Processes, endpoints: Endpoints, opts, name: str = "corral",
                 apps: dict | None = None, workers: int | None = None, restart: dict | None = None,
                 standby: int = 0, env: dict | None = None, label: str = "c  corral",
                 extra: dict | None = None):
        """`extra`: more config sections (e.g. [state])."""
        self.procs, self.opts, self.name = procs, opts, name
        self.env = env or {}
        self.workers = workers or opts.workers
        self.dir = procs.root / name
        self.dir.mkdir()
        self.endpoint = endpoints(name)
        self.control = f"ipc://{self.dir / 'control.sock'}"
        self.log = self.dir / "daemon.log"
        self.config = self.dir / "corral.toml"
        self.label = f"{label}, echo guest, {self.workers} worker{'s' * (self.workers != 1)}"
        supervisor = {"frontend": self.endpoint, "control": self.control, "workers": self.workers,
                      "graceful_timeout_s": 5, "cache_dir": str(procs.root / "cache")}
        if standby:
            supervisor["standby"] = standby
        supervisor.update(opts.corral_set)
        self.graceful_s = float(supervisor["graceful_timeout_s"])
        doc = {"supervisor": supervisor, "restart": restart or {}, **(extra or {}),
               "apps": apps or {"echo": {"module": str(ECHO)}}}
        self.config.write_text(to_toml(doc))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        # If this script is killed outright, the daemon gets SIGTERM: it drains and takes its workers along.
        self.process = self.procs.start([sys.executable, "-m", "corral", "run", "-c", str(self.config)],
                                        log=self.log, env={"RUNTIME_DIRECTORY": str(self.dir / "run"), **self.env},
                                        death_signal=signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name}: the daemon exited with {self.process.returncode}:\n"
                                 f"{self.log_tail()}")
            try:
                status = self.status(timeout=1.0)
            except TimeoutError:
                continue
            ready = [w for w in status["workers"] if w["state"] == "ready"]
            if status["state"] == "running" and len(ready) >= status["workers_target"]:
                return
            time.sleep(0.05)
        raise BenchError(f"{self.name}: not ready within {timeout:g} s:\n{self.log_tail()}")

    def status(self, timeout: float = 5.0) -> dict:
        """The control endpoint's status verb (what `corral status` shows)."""
        context = zmq.Context()
        try:
            req = context.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(self.control)
            req.send_multipart([b"status", b"{}"])
            if not req.poll(int(timeout * 1000)):
                raise TimeoutError("no answer on the control endpoint")
            return json.loads(req.recv())
        finally:
            context.destroy(linger=0)

    def roles(self) -> dict[str, list[int]]:
        members = Processes.group_members(self.process.pid)
        return {"broker": [self.process.pid], "workers": [p for p in members if p != self.process.pid]}

    def wait_for_standby(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(w["state"] == "standby" for w in self.status()["workers"]):
                return
            time.sleep(0.02)
        raise BenchError(f"{self.name}: no standby worker ready within {timeout:g} s")

    def ready_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"] if w["state"] == "ready"]

    def stop(self) -> None:
        """SIGTERM, a drain, exit 0 and nothing left in its process group: else BenchError."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(self.graceful_s + 5)
        except subprocess.TimeoutExpired:
            code = None
        left = self.procs.kill_group(process.pid, grace_s=1.0)
        self.procs.stop(process)
        if code != 0:
            raise BenchError(f"{self.name}: after SIGTERM the daemon "
                             f"{'did not exit in time' if code is None else f'exited with {code}'}:\n"
                             f"{self.log_tail()}")
        if left:
            raise BenchError(f"{self.name}: processes {left} of the daemon were left after it exited "
                             f"(killed now)")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def compared_corral(procs: Processes, endpoints: Endpoints, opts) -> Corral:
    """(d) --compare DIR: corral as another checkout has it (its daemon and workers import
    from DIR first, through PYTHONPATH); the rest of the run is this checkout's."""
    try:
        revision = subprocess.run(["git", "-C", str(opts.compare), "describe", "--always", "--dirty"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    return Corral(procs, endpoints, opts, name="corral-compared",
                  env={"PYTHONPATH": str(import_root(opts.compare, procs.root))},
                  label=f"d  corral {(revision or opts.compare.name)[:12]}")


def import_root(checkout: Path, root: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes `import corral` load `checkout`.

    A checkout of the `corral` layout maps supervisor/ to corral and workers/ to
    corral.workers (package-dir), which no folder on sys.path says by itself:
    build that package of symlinks. An older checkout (top-level supervisor
    and workers packages) is importable as it is."""
    if not (checkout / "supervisor" / "wire").is_dir():
        return checkout
    package = root / "compared" / "corral"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (checkout / "supervisor").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "workers").symlink_to(checkout / "workers")
    return package.parent


class Context:
    """What every section is handed: the run's private directory, its processes and endpoints."""

    def __init__(self, root: Path, transport: str):
        self.root = root
        self.procs = Processes(root)
        self.endpoints = Endpoints(root, transport)


_HOSTS: dict[Path, object] = {}


def make_host(cache_dir: Path):
    """A worker's Host, built from a WorkerSpec as a worker builds it (one per run: each has an
    epoch ticker thread that lives as long as the process): the echo guest ("reuse") and the
    counter guest ("keyed", on_abort = "reinstantiate")."""
    if cache_dir in _HOSTS:
        return _HOSTS[cache_dir]
    from corral.workers import modules
    from corral.workers.host import Host
    from corral.workers.spec import AppSpec, WorkerSpec
    engine = modules.make_engine()
    apps = []
    for name, path, instances, on_abort in (("echo", ECHO, "reuse", "respawn"),
                                            ("counter", COUNTER, "keyed", "reinstantiate")):
        _, artifact = modules.compile_cached(engine, path, cache_dir)
        apps.append(AppSpec(name=name, module=str(path), artifact=str(artifact), instances=instances,
                            timeout_ms=1000, max_memory_mib=64, on_abort=on_abort))
    spec = WorkerSpec(backend="", config_generation=1, heartbeat_ms=500, capacity=4,
                      restart_intensity=1_000_000, restart_period_s=30.0, log_level="warning",
                      log_format="json", cache_dir=str(cache_dir), max_open_files=4096, apps=apps)
    host = Host(spec)
    host.warm()
    _HOSTS[cache_dir] = host
    return host
