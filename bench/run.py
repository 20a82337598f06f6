#!/usr/bin/env python3
"""corral against its baselines, in one go, on this machine (DESIGN section 8; issue 5).

    python bench/run.py                  everything (about 2 minutes on 2 cores)
    python bench/run.py --quick          everything, small (about 15 s): the CI smoke run
    python bench/run.py --throughput     only some sections: --throughput --half-load
                                         --hops --host --instantiate --abort --fairness (any combination)

Sections (see bench/README.md for what each number means):

  throughput   the same closed-loop load (one load generator, supervisor/client/loadgen.py)
               against (a) a bare pyzmq ROUTER echo in one process, (b) the C
               zmq.proxy with as many Python REP echo workers as corral has workers,
               (c) the real corral daemon serving guests/echo.wat; req/s, p50, p99,
               and the ratios c/a and c/b
  half-load    an open-loop (fixed-rate) load at half of (c)'s measured maximum,
               against all three: p50/p90/p99 (the target: corral's p99 <= 2 ms)
  hops         one request at a time (--hops-rate, default 1000 req/s) through (a), (b)
               and corral with 1 worker each: round trips, and corral's split into its
               4 ZeroMQ hops and the time inside the broker and the worker (a tracer,
               bench/tracer/sitecustomize.py, stamps every message in both processes)
  host         host overhead per Wasm call: corral's call path (Guest.run,
               CorralEntry.handle_request) against wasmtime-py's Func.__call__ +
               Memory.read/write doing the same corral/1 request by hand
  instantiate  the time to make a fresh instance of the echo guest (Guest.instantiate)
  abort        abort-to-serving-again through the real daemon, for on_abort =
               "reinstantiate" (keyed counter guest) and "respawn" (workers = 1)
  fairness     a light client's p99 (open loop) beside a client flooding the same
               service, and another service on the same workers, against its p99
               alone: the ratios
  unwind       the cost of saving __stack_pointer before every call (Rust echo guest,
               against the same entry with the save turned off), and the time to
               answer an escaped Rust panic (500 with its message) against a 200
               and against a panic=abort panic plus the fresh instance after it
  security     CURVE's cost: the same load against corral on loopback tcp with and
               without CURVE (interleaved rounds), the broker's drain with and without
               reading each message's User-Id, and the module check in its child
               process against the same check in-process

Everything it starts runs in its own process group under one private
directory in /tmp; all of it is stopped and removed at the end, on an error,
on Ctrl-C, SIGTERM and SIGHUP (and if this script is SIGKILLed, its children
die with it: parent-death signal; the next run removes the directory).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))   # measure this checkout, installed or not

import zmq  # noqa: E402

from corral.client import loadgen  # noqa: E402
from corral.config import to_toml  # noqa: E402

GUESTS = REPO / "guests"
ECHO = GUESTS / "echo.wat"
COUNTER = GUESTS / "counter.wat"
BASELINES = Path(__file__).resolve().parent / "baselines.py"
SECTIONS = ("throughput", "half-load", "hops", "host", "instantiate", "abort", "storage", "fairness", "unwind", "security")
COUNTER_DURABLE = GUESTS / "counter_durable.wat"
TRACER = Path(__file__).resolve().parent / "tracer"   # the hops section's sitecustomize.py
P99_TARGET_MS = 2.0


class BenchError(Exception):
    """Something the benchmark needs did not happen (a server did not start, a daemon failed)."""


# --- processes: each in its own group, all stopped at the end ----------------------------

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


# --- the systems under load --------------------------------------------------------------

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
                 standby: int = 0, env: dict | None = None, label: str = "c  corral"):
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
        doc = {"supervisor": supervisor, "restart": restart or {},
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


# --- sections ------------------------------------------------------------------------------

@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def out(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


@dataclass
class Cpu:
    """CPU seconds used during one load run: by role of the system under load, by the
    load generator, and by the whole machine (so what other processes took shows)."""
    roles: dict[str, float]
    client: float
    machine_busy: float
    wall: float

    def per_request_us(self, requests: int) -> dict[str, float]:
        out = {role: seconds / requests * 1e6 for role, seconds in self.roles.items()}
        out["client"] = self.client / requests * 1e6
        return out

    @property
    def machine_busy_pct(self) -> float:
        """How busy the whole machine was, in % of all its cores."""
        return 100 * self.machine_busy / self.wall / (os.cpu_count() or 1) if self.wall > 0 else 0.0

    @property
    def others_cores(self) -> float:
        """Cores' worth of CPU that neither the system nor the load generator used."""
        ours = sum(self.roles.values()) + self.client
        return max(0.0, self.machine_busy - ours) / self.wall if self.wall > 0 else 0.0


def _cpu_of(pids: list[int]) -> float:
    import psutil
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _snapshot(system) -> tuple[dict[str, float], float, float, float]:
    import psutil
    roles = {role: _cpu_of(pids) for role, pids in system.roles().items()}
    own = os.times()
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq + \
        getattr(machine, "steal", 0.0)
    return roles, own.user + own.system + own.children_user + own.children_system, busy, time.monotonic()


def load(system, opts, requests: int, rate: float | None = None) -> loadgen.Result:
    before = _snapshot(system)
    result = loadgen.run(system.endpoint, b"echo", opts.body.encode(), requests=requests,
                         concurrency=opts.concurrency, clients=opts.clients, key=None,
                         progress=opts.progress, framing_name=system.framing, rate=rate)
    after = _snapshot(system)
    result.cpu = Cpu({role: after[0][role] - before[0].get(role, 0.0) for role in after[0]},
                     after[1] - before[1], after[2] - before[2], after[3] - before[3])
    return result


def check(result: loadgen.Result, label: str) -> None:
    if result.failed:
        raise BenchError(f"{label}: {result.failed} of {result.requests} requests failed\n{result.report()}")


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


def section_throughput(opts, procs: Processes, endpoints: Endpoints, report: Report) -> float:
    every = {"a": EchoServer, "b": ProxyServer, "c": Corral, "d": compared_corral}
    systems = [every[name](procs, endpoints, opts) for name in opts.systems]
    corral = dict(zip(opts.systems, systems)).get("c")   # None when --systems leaves it out
    results: dict[str, list[loadgen.Result]] = {s.label: [] for s in systems}
    half: dict[str, list[loadgen.Result]] = {s.label: [] for s in systems}
    profiles: list[tuple[str, Path]] = []
    try:
        for system in systems:
            system.start()
        for _ in range(opts.rounds):
            for system in systems:
                result = load(system, opts, opts.requests)
                check(result, system.label)
                results[system.label].append(result)
        med = {label: median_result(rs) for label, rs in results.items()}
        reference = corral or systems[-1]
        corral_max = med[reference.label].throughput
        if opts.run_half_load:
            rate = corral_max / 2
            for _ in range(opts.rounds):
                for system in systems:
                    result = load(system, opts, opts.half_requests, rate=rate)
                    check(result, system.label)
                    half[system.label].append(result)
        if opts.profile and corral is not None:
            profiles = profile_corral(corral, opts, procs)
    finally:
        errors = []
        for system in systems:
            try:
                system.stop()
            except BenchError as exc:
                errors.append(str(exc))
        if errors and sys.exc_info()[0] is None:
            raise BenchError("\n".join(errors))

    report.out(f"== Throughput: closed loop, {opts.clients} client(s) x {opts.concurrency} in flight, "
               f"{opts.requests} requests per run, {opts.rounds} round(s), median round shown")
    report.out(f"{'system':<40} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}   all rounds req/s")
    for system in systems:
        r = med[system.label]
        rounds = " ".join(f"{x.throughput:,.0f}" for x in results[system.label])
        report.out(f"{system.label:<40} {r.throughput:>9,.0f} {r.pct(50):>8.3f} {r.pct(99):>8.3f} "
                   f"{r.max_ms:>8.3f}   {rounds}")
    report.out("")
    report.out("CPU per request in the median round (us of CPU time, all processes of each role; "
               "'others': cores' worth used by\nprocesses outside the benchmark during the run, "
               "the noise in these figures)")
    for system in systems:
        r = med[system.label]
        per = r.cpu.per_request_us(r.requests)
        parts = "  ".join(f"{role} {us:.1f}" for role, us in per.items())
        server = sum(us for role, us in per.items() if role != "client")
        report.out(f"{system.label:<40} server {server:6.1f}  =  {parts}   machine busy "
                   f"{r.cpu.machine_busy_pct:.0f}%, others {r.cpu.others_cores:.2f} cores")
    by_name = {name: med[system.label] for name, system in zip(opts.systems, systems)}
    report.data["throughput"] = {s.label: {"median": summary(med[s.label]),
                                           "rounds": [summary(x) for x in results[s.label]]}
                                 for s in systems}
    report.data["ratios"] = {}
    c = by_name.get("c")
    for name, what in (("a", "one-hop pyzmq echo"), ("b", "zmq.proxy + REP workers"),
                       ("d", "corral as --compare has it")):
        if c is not None and name in by_name:
            ratio = c.throughput / by_name[name].throughput
            report.data["ratios"][f"c/{name}"] = ratio
            report.out(f"ratio c/{name} = {ratio:.3f}   (corral / {what}, throughput)")
    if any(half.values()):
        rate = corral_max / 2
        med_half = {label: median_result(rs, by=lambda r: r.pct(99)) for label, rs in half.items()}
        report.out("")
        report.out(f"== Latency at half of {reference.label[3:].split(',')[0]}'s max load: open loop (fixed schedule), "
                   f"{rate:,.0f} req/s offered, {opts.half_requests} requests per run, {opts.rounds} round(s), "
                   f"median round (by p99) shown")
        report.out(f"{'system':<40} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
                   f" {'lag ms':>7} {'CPU us/req':>10} {'busy':>5}   all rounds p99 ms")
        for system in systems:
            r = med_half[system.label]
            per = r.cpu.per_request_us(r.requests)
            server = sum(us for role, us in per.items() if role != "client")
            rounds = " ".join(f"{x.pct(99):.2f}" for x in half[system.label])
            report.out(f"{system.label:<40} {r.throughput:>9,.0f} {r.pct(50):>8.3f} {r.pct(90):>8.3f} "
                       f"{r.pct(99):>8.3f} {r.max_ms:>8.3f} {r.max_lag_ms:>7.2f} {server:>10.1f} "
                       f"{r.cpu.machine_busy_pct:>4.0f}%   {rounds}")
        report.out("(lag: how late the load generator itself sent its latest request; CPU us/req: the "
                   "system's, client excluded;\n busy: the whole machine, all cores)")
        if corral is not None:
            label = corral.label
            p99 = med_half[label].pct(99)
            worst = max(x.pct(99) for x in half[label])
            verdict = "met" if p99 <= P99_TARGET_MS else "NOT met"
            report.out(f"corral p99 at half load = {p99:.3f} ms in the median round, {worst:.3f} ms in the worst   "
                       f"(target: at most {P99_TARGET_MS:g} ms: {verdict})")
        report.data["half_load"] = {"offered_req_per_s": rate,
                                    **{s.label: {"median": summary(med_half[s.label]),
                                                 "rounds": [summary(x) for x in half[s.label]]}
                                       for s in systems}}
    for role, raw in profiles:
        report.out("")
        report.out(f"py-spy profile of corral's {role} under the same load (an extra run, not counted "
                   f"above): {raw.with_suffix('.svg')}")
        report.out(f"{'self %':>7} {'incl %':>7}  function (most self time first; GIL-holding "
                   f"C calls count to the line that made them)")
        for self_pct, incl_pct, name in top_functions(raw, 12):
            report.out(f"{self_pct:>7.1f} {incl_pct:>7.1f}  {name}")
    return corral_max


def profile_corral(corral: "Corral", opts, procs: Processes) -> list[tuple[str, Path]]:
    """Run corral's load once more with py-spy sampling the broker and every worker."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    opts.profile.mkdir(parents=True, exist_ok=True)
    roles = corral.roles()
    targets = [("broker", roles["broker"][0])] + [(f"worker-{i}", pid) for i, pid in enumerate(roles["workers"])]
    spies = []
    for role, pid in targets:
        for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
            out = opts.profile / f"{role}{suffix}"
            spies.append((role, out, procs.start([spy, "record", "--pid", str(pid), "--rate", "200",
                                                  "--nonblocking", "--gil", "--format", fmt, "--output", str(out)])))
    time.sleep(1.0)   # py-spy attaches
    try:
        check(load(corral, opts, opts.requests), corral.label)
    finally:
        for _, _, process in spies:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)   # py-spy writes its output on SIGINT
        for _, _, process in spies:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
            procs.stop(process)
    return [(role, out) for role, out, _ in spies if out.suffix == ".txt" and out.exists()
            and role in ("broker", "worker-0")]


def top_functions(raw: Path, count: int) -> list[tuple[float, float, str]]:
    """Self and inclusive shares of the functions in a py-spy raw (collapsed stacks) file."""
    import re
    from collections import Counter
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        total += samples
        names = []
        for frame in stack.split(";"):
            match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
            names.append(f"{match.group(1)} ({match.group(2).rsplit('/', 1)[-1]})" if match else frame)
        self_time[names[-1]] += samples
        for name in set(names):
            inclusive[name] += samples
    if not total:
        return []
    return [(100 * n / total, 100 * inclusive[name] / total, name) for name, n in self_time.most_common(count)]


def summary(result: loadgen.Result) -> dict:
    cpu = getattr(result, "cpu", None)
    extra = {"cpu_us_per_request": cpu.per_request_us(result.requests), "others_cores": cpu.others_cores} \
        if cpu else {}
    return {**result.summary(), **extra}


# --- hops: one request at a time, and where corral's time goes ----------------------------

HOP_PARTS = (("client -> broker", True), ("broker: request in -> out to the worker", False),
             ("broker -> worker", True), ("worker: request in -> reply out (Wasm call included)", False),
             ("worker -> broker", True), ("broker: reply in -> out to the client", False),
             ("broker -> client", True))


def one_at_a_time(endpoint: str, framing: str, requests: int, rate: float) -> list[tuple[int, int]]:
    """(sent, answered) CLOCK_MONOTONIC ns of `requests` echo requests, never two in flight."""
    context = zmq.Context()
    client = loadgen.Client(context, endpoint, loadgen.framing(framing, b"echo", b"hello"), timeout_s=10.0)
    try:
        send, receive = client._sender(), client._receiver()

        def call(i: int) -> None:
            send(b"%d" % i)
            receive(True)

        for i in range(200):   # warm-up: connections, caches, the guest's first calls
            call(i)
        clock, interval, out = time.monotonic_ns, 1e9 / rate, []
        start = clock()
        for i in range(requests):
            sent = clock()
            call(i)
            out.append((sent, clock()))
            wait = (start + (i + 1) * interval - clock()) / 1e9
            if wait > 0:
                time.sleep(wait)
        return out
    except zmq.Again:
        raise BenchError(f"hops: no reply from {endpoint} within 10 s") from None
    finally:
        client.close()
        context.destroy(linger=0)


def _trace(path: Path) -> tuple[list[int], list[tuple[str, str]]]:
    times, what = [], []
    for line in path.read_text().splitlines():
        stamp, direction, kind = line.split()
        times.append(int(stamp))
        what.append((direction, kind))
    return times, what


def _within(trace, start: int, end: int, direction: str, kind: str) -> list[int]:
    times, what = trace
    lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
    return [times[i] for i in range(lo, hi) if what[i] == (direction, kind)]


def hop_parts(calls: list[tuple[int, int]], broker, worker) -> list[list[float]]:
    """Per part of HOP_PARTS, the microseconds of every request the traces saw whole."""
    parts: list[list[float]] = [[] for _ in HOP_PARTS]
    request, reply = "02", "03"   # worker protocol: W_REQUEST, W_REPLY
    for sent, answered in calls:
        stamps = [_within(broker, sent, answered, "in", "c")[:1],
                  _within(broker, sent, answered, "out", request)[:1],
                  _within(worker, sent, answered, "in", request)[:1],
                  _within(worker, sent, answered, "out", reply)[-1:],
                  _within(broker, sent, answered, "in", reply)[-1:],
                  _within(broker, sent, answered, "out", "c")[-1:]]
        if not all(stamps):
            continue  # a heartbeat or a retry in the window: not one straight walk
        points = [sent] + [s[0] for s in stamps] + [answered]
        for i, part in enumerate(parts):
            part.append((points[i + 1] - points[i]) / 1000)
    return parts


def section_hops(opts, procs: Processes, endpoints: Endpoints, report: Report) -> None:
    one_worker = argparse.Namespace(**{**vars(opts), "workers": 1})
    trace_dir = procs.root / "hops-trace"
    trace_dir.mkdir()
    env = {"CORRAL_HOPS_TRACE": str(trace_dir),
           "PYTHONPATH": os.pathsep.join([str(TRACER), procs.env["PYTHONPATH"]])}
    a, b = EchoServer(procs, endpoints, one_worker), ProxyServer(procs, endpoints, one_worker)
    c = Corral(procs, endpoints, one_worker, name="hops", env=env)
    totals: dict[str, list[float]] = {}
    corral_calls: list[tuple[int, int]] = []
    for system in (a, b, c):
        try:
            system.start()
            calls = one_at_a_time(system.endpoint, system.framing, opts.hops_requests, opts.hops_rate)
            totals[system.label] = sorted((end - start) / 1000 for start, end in calls)
            if system is c:
                corral_calls = calls
        finally:
            daemon_pid = system.process.pid if system is c and system.process else None
            system.stop()
    # Processes that moved no message (the daemon's module-check child) leave empty traces.
    traces = {int(p.stem): _trace(p) for p in trace_dir.glob("*.txt") if p.stat().st_size}
    broker = traces.pop(daemon_pid, None)
    if broker is None or len(traces) != 1:
        raise BenchError(f"hops: expected the traces of the daemon and one worker, found {sorted(traces)}")
    parts = hop_parts(corral_calls, broker, traces.popitem()[1])

    def pcts(values: list[float]) -> str:
        ordered = sorted(values)
        return " ".join(f"{loadgen.percentile(ordered, p):>8.1f}" for p in (50, 90, 99))

    report.out(f"== One request at a time, {opts.hops_rate:,.0f} req/s, {opts.hops_requests} requests, "
               f"1 worker: round trips, and corral's hop by hop (us)")
    report.out(f"{'':<58} {'p50':>8} {'p90':>8} {'p99':>8}")
    hops = {a.label: 2, b.label: 4, c.label: 4}
    for label, values in totals.items():
        report.out(f"{label + f' ({hops[label]} ZeroMQ hops)':<58} {pcts(values)}")
    for (name, is_hop), values in zip(HOP_PARTS, parts):
        report.out(f"{'   ' + name + ('  [hop]' if is_hop else ''):<58} {pcts(values)}")
    medians = [statistics.median(v) for v in parts]
    on_hops = sum(m for m, (_, is_hop) in zip(medians, HOP_PARTS) if is_hop)
    report.out(f"corral at p50: {on_hops:.0f} us in its 4 hops, {sum(medians) - on_hops:.0f} us in the broker "
               f"and the worker ({len(parts[0])} of {len(corral_calls)} requests traced whole; medians of the "
               f"parts need not add up to the total's)")
    report.data["hops"] = {"rate": opts.hops_rate, "requests": opts.hops_requests,
                           "totals_us": {label: {"p50": loadgen.percentile(v, 50), "p99": loadgen.percentile(v, 99)}
                                         for label, v in totals.items()},
                           "corral_parts_p50_us": dict(zip((n for n, _ in HOP_PARTS), medians))}


def median_result(results: list[loadgen.Result], by=lambda r: r.throughput) -> loadgen.Result:
    ordered = sorted(results, key=by)
    return ordered[(len(ordered) - 1) // 2]


def timed(fn, iterations: int, repeats: int) -> list[float]:
    """Microseconds per call of fn(), one figure per repeat."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        out.append((time.perf_counter_ns() - start) / iterations / 1000)
    return out


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


def section_host(opts, root: Path, report: Report) -> None:
    import wasmtime
    from corral.workers.outcome import Outcome
    body = opts.body.encode()
    host = make_host(root / "cache")
    guest = host.guests[b"echo"]
    timeout_ms = 1000
    entry = guest.instances[None]

    # The same corral/1 request done by hand with wasmtime-py's public API, on the
    # same engine (epoch interruption on: the deadline is set before each request,
    # as corral sets it).
    store = wasmtime.Store(host.engine)
    store.set_limits(memory_size=64 * 1024 * 1024)
    instance = guest.pre.instantiate(store)
    exports = instance.exports(store)
    alloc, handle, memory = exports["corral_alloc"], exports["corral_handle"], exports["memory"]
    ticks = timeout_ms // 5 + 1

    def by_hand() -> tuple[int, bytes]:
        store.set_epoch_deadline(ticks)
        size = len(body)
        at = alloc(store, size)
        memory.write(store, body, at)
        packed = handle(store, at, size) & 0xFFFFFFFFFFFFFFFF
        start, length = packed >> 32, packed & 0xFFFFFFFF
        response = memory.read(store, start, start + length)
        return response[0], bytes(response[1:])

    def corral_run() -> Outcome:
        return guest.run(None, body, timeout_ms)

    def corral_entry() -> Outcome:
        return entry.handle_request(body, timeout_ms)

    def one_func_call() -> int:   # the deadline is set once, before its loop
        return alloc(store, len(body))

    assert by_hand() == (0, body), by_hand()
    assert corral_run().body == body and corral_entry().body == body
    n, reps = opts.host_iterations, opts.reps
    for fn in (by_hand, corral_run, corral_entry):   # warm up
        timed(fn, min(n, 1000), 1)
    rows = [("corral       Guest.run: instance lookup, handle_request, outcome", timed(corral_run, n, reps)),
            ("corral       CorralEntry.handle_request", timed(corral_entry, n, reps)),
            ("wasmtime-py  Func.__call__ + Memory.read/write, by hand", timed(by_hand, n, reps))]
    store.set_epoch_deadline(1 << 40)
    timed(one_func_call, min(n, 1000), 1)
    rows.append(("wasmtime-py  one Func.__call__ (corral_alloc), for scale", timed(one_func_call, n, reps)))
    report.out(f"== Host overhead per Wasm call: echo guest, {len(body)}-byte body, in-process, "
               f"median of {reps} x {n} requests")
    report.out(f"{'path':<64} {'us/request':>10} {'min':>8}")
    for label, times in rows:
        report.out(f"{label:<64} {statistics.median(times):>10.2f} {min(times):>8.2f}")
    corral_us, hand_us = statistics.median(rows[0][1]), statistics.median(rows[2][1])
    report.out(f"ratio by-hand/corral = {hand_us / corral_us:.2f}   "
               f"(wasmtime-py's public API per request / corral's Guest.run per request)")
    report.data["host"] = {label: {"median_us": statistics.median(t), "min_us": min(t), "runs_us": t}
                           for label, t in rows}
    report.data["host"]["ratio_by_hand_over_corral"] = hand_us / corral_us


def rust_guests() -> dict[str, Path]:
    """The Rust example guests, both panic strategies, built by guests/build.py (kept and
    reused when fresh; a cold build takes about a minute)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("corral_guest_build", GUESTS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        return build.build_rust(build.OUT)
    except (build.ToolchainMissing, build.BuildFailed) as exc:
        raise BenchError(f"unwind section: the Rust guests did not build: {exc}") from None


def unwind_guest(engine, path: Path, cache_dir: Path, instances: str):
    from corral.workers import modules
    from corral.workers.host import Guest
    from corral.workers.spec import AppSpec
    module, artifact = modules.compile_cached(engine, path, cache_dir)
    app = AppSpec(name=path.stem, module=str(path), artifact=str(artifact), instances=instances,
                  timeout_ms=1000, max_memory_mib=64, on_abort="reinstantiate")
    return Guest(engine, app, cache_dir, restart_intensity=1_000_000, restart_period_s=30.0, bounded=False,
                 module=module)


def section_unwind(opts, root: Path, report: Report) -> None:
    from corral.workers import abi, modules
    from corral.workers.host import EpochTicker
    built = rust_guests()
    engine = modules.make_engine()
    ticker = EpochTicker(engine)
    ticker.start()
    try:
        cache_dir = root / "cache"
        body, timeout_ms = opts.body.encode(), 1000
        n, reps = opts.host_iterations, opts.reps

        echo = unwind_guest(engine, built["rust_echo_unwind"], cache_dir, "reuse")
        entry = echo.instantiate(timeout_ms)
        stack = entry.stack
        assert stack and entry.handle_request(body, timeout_ms).body == body

        def request() -> object:
            return entry.handle_request(body, timeout_ms)

        def save_only() -> None:
            abi._global_get(entry.context, stack, entry.saved_stack_at)

        saved, unsaved = [], []
        timed(request, min(n, 1000), 1)
        # short runs, interleaved, each going first in turn: drift on a busy machine hits both alike
        for turn in range(reps * 5):
            for on in ((True, False) if turn % 2 else (False, True)):
                entry.stack = stack if on else 0
                (saved if on else unsaved).extend(timed(request, max(n // 5, 100), 1))
        entry.stack = stack
        save_us = timed(save_only, n, reps)

        counter = unwind_guest(engine, built["rust_counter_unwind"], cache_dir, "keyed")
        aborting = unwind_guest(engine, built["rust_counter"], cache_dir, "keyed")
        assert counter.run(b"k", b"panic", timeout_ms).status == 500

        def ok() -> object:
            return counter.run(b"k", b"incr", timeout_ms)

        def unwind() -> object:
            return counter.run(b"k", b"panic", timeout_ms)

        def abort_and_fresh() -> object:
            aborting.run(b"k", b"panic", timeout_ms)
            return aborting.run(b"k", b"incr", timeout_ms)

        assert unwind().body.startswith(b"unwind: panicked at") and abort_and_fresh().body == b"1"
        for fn in (ok, unwind, abort_and_fresh):
            timed(fn, min(n, 500), 1)
        rows = [
            ("CorralEntry.handle_request, Rust echo (panic=unwind), __stack_pointer saved", saved),
            ("the same entry with the save turned off (baseline)", unsaved),
            ("one wasmtime_global_get of __stack_pointer alone", save_us),
            ("Guest.run, Rust counter (panic=unwind): a 200 (incr)", timed(ok, n, reps)),
            ("Guest.run, the same: an escaped panic, 500 with its message", timed(unwind, n, reps)),
            ("Guest.run, Rust counter (panic=abort): 502, then a 200 on a fresh instance",
             timed(abort_and_fresh, max(n // 10, 100), reps)),
        ]
    finally:
        ticker.stop()
    report.out(f"== Unwind: the stack-pointer save and escaped panics, Rust guests, in-process, "
               f"median of {reps} runs ({reps * 5} short ones for the save)")
    report.out(f"{'path':<78} {'us/request':>10} {'min':>8}")
    for label, times in rows:
        report.out(f"{label:<78} {statistics.median(times):>10.2f} {min(times):>8.2f}")
    medians = [statistics.median(times) for _, times in rows]
    lows = [min(times) for _, times in rows]
    report.out(f"ratio saved/baseline = {medians[0] / medians[1]:.3f} (medians), {lows[0] / lows[1]:.3f} (minima)"
               f"   save per call: {(medians[0] - medians[1]) / 2:.2f} us (medians), "
               f"{(lows[0] - lows[1]) / 2:.2f} us (minima), two calls per request")
    report.out(f"ratio panic/200 = {medians[4] / medians[3]:.2f}   "
               f"ratio abort+fresh/panic = {medians[5] / medians[4]:.2f}")
    report.data["unwind"] = {label: {"median_us": statistics.median(t), "min_us": min(t), "runs_us": t}
                             for label, t in rows}


def section_instantiate(opts, root: Path, report: Report) -> None:
    host = make_host(root / "cache")
    guest, counter = host.guests[b"echo"], host.guests[b"counter"]
    n, reps = opts.instantiate_iterations, opts.reps
    made = guest.instantiate(1000)
    assert made.handle_request(b"x", 1000).body == b"x"
    timed(lambda: guest.instantiate(1000), min(n, 50), 1)   # warm up
    times = timed(lambda: guest.instantiate(1000), n, reps)

    # In-process, what the worker does on an abort with on_abort = "reinstantiate":
    # the trapping call (the instance is dropped), then the next call on the key
    # makes a fresh instance. Against: two ordinary calls on a live instance.
    keys = iter(range(10**9))

    def trap_then_next() -> None:
        key = b"%d" % next(keys)
        counter.run(key, b"", 1000)          # the key's instance exists (not timed apart)
        start = time.perf_counter_ns()
        trapped = counter.run(key, b"trap", 1000)
        fresh = counter.run(key, b"", 1000)
        elapsed.append((time.perf_counter_ns() - start) / 1000)
        assert trapped.status == 502 and fresh.body == b"1", (trapped, fresh)
        del counter.instances[key]

    def two_plain() -> None:
        key = b"%d" % next(keys)
        counter.run(key, b"", 1000)
        start = time.perf_counter_ns()
        counter.run(key, b"", 1000)
        counter.run(key, b"", 1000)
        elapsed.append((time.perf_counter_ns() - start) / 1000)
        del counter.instances[key]

    rounds = max(50, n // 5)
    elapsed: list[float] = []
    for _ in range(rounds):
        trap_then_next()
    trap_us = statistics.median(elapsed)
    elapsed = []
    for _ in range(rounds):
        two_plain()
    plain_us = statistics.median(elapsed)

    report.out(f"== Instance recreation: echo guest, in-process, median of {reps} x {n}")
    report.out(f"fresh instance = {statistics.median(times):.1f} us   (min {min(times):.1f} us; Guest.instantiate: "
               f"a new Store, limits, epoch deadline, instance, export handles)")
    report.out(f"trap + next call on a fresh instance = {trap_us:.1f} us   (counter guest, keyed, Guest.run "
               f"twice; two ordinary calls: {plain_us:.1f} us; median of {rounds})")
    report.data["instantiate"] = {"median_us": statistics.median(times), "min_us": min(times),
                                  "runs_us": times, "trap_then_next_us": trap_us, "two_plain_calls_us": plain_us}


def section_abort(opts, procs: Processes, endpoints: Endpoints, report: Report) -> None:
    from corral.client import Client
    reps = opts.reps
    # Deliberate traps, repeated: keep the circuit closed (intensity) and the
    # trapping body out of quarantine (3 aborts within period_s), so that every
    # repetition walks the same path. Repetitions are spaced well over period_s.
    restart = {"intensity": 1_000_000, "period_s": 0.01}
    gap_s = 0.05
    out: dict[str, dict] = {}

    # on_abort = "reinstantiate": the keyed counter guest (its default), opts.workers workers.
    daemon = Corral(procs, endpoints, opts, name="abort-reinstantiate", restart=restart,
                    apps={"counter": {"module": str(COUNTER), "instances": "keyed"}})
    daemon.start()
    try:
        context = zmq.Context()
        try:
            with Client(daemon.endpoint, context) as client:
                trap_ms, plain_ms = [], []
                for i in range(reps):
                    key = f"k{i}"
                    assert client.call("counter", b"", key=key).body == b"1"
                    assert client.call("counter", b"", key=key).body == b"2"
                    # Reference: two ordinary requests on the key, sent together.
                    start = time.perf_counter_ns()
                    first = client.send("counter", b"", key=key)
                    second = client.send("counter", b"", key=key)
                    got = client.gather([first, second], timeout=10)
                    plain_ms.append((time.perf_counter_ns() - start) / 1e6)
                    assert got[second].body == b"4", got
                    # The trap, and the next request on the same key sent right behind it.
                    start = time.perf_counter_ns()
                    trap = client.send("counter", b"trap", key=key)
                    after = client.send("counter", b"", key=key)
                    got = client.gather([trap, after], timeout=10)
                    trap_ms.append((time.perf_counter_ns() - start) / 1e6)
                    if got[trap].status != 502 or got[after].status != 200 or got[after].body != b"1":
                        raise BenchError(f"reinstantiate: expected 502 then a fresh count of 1, got "
                                         f"{got[trap]} and {got[after]}")
                    time.sleep(gap_s)
        finally:
            context.destroy(linger=0)
    finally:
        daemon.stop()
    out["reinstantiate"] = {"trap_to_next_answered_ms": trap_ms, "two_plain_requests_ms": plain_ms}

    # on_abort = "respawn": one worker, so the service is served by that worker alone;
    # then again with a standby worker waiting to be promoted into its slot.
    respawn_ms, ready_ms = _measure_respawn(procs, endpoints, opts, restart, reps, gap_s, standby=0)
    standby_ms, _ = _measure_respawn(procs, endpoints, opts, restart, reps, gap_s, standby=1)
    out["respawn"] = {"trap_reply_to_new_worker_answered_ms": respawn_ms, "worker_startup_ms": ready_ms,
                      "with_standby_ms": standby_ms}

    def stats(values: list[float]) -> str:
        return f"{statistics.median(values):>9.3f} {min(values):>8.3f} {max(values):>8.3f}"

    report.out(f"== Abort to serving again, through the real daemon ({reps} repetitions)")
    report.out(f"{'on_abort':<15} {'measured':<58} {'median ms':>9} {'min':>8} {'max':>8}")
    report.out(f"{'reinstantiate':<15} {'trap sent -> next request on the same key answered':<58} "
               f"{stats(trap_ms)}")
    report.out(f"{'  (reference)':<15} {'two ordinary requests on one key, sent together':<58} "
               f"{stats(plain_ms)}")
    report.out(f"{'respawn':<15} {'trap reply -> a request answered by the new worker':<58} "
               f"{stats(respawn_ms)}")
    if ready_ms:
        report.out(f"{'  (of which)':<15} {'the new worker process: spawned -> ready (pool log)':<58} "
                   f"{stats(ready_ms)}")
    report.out(f"{'respawn':<15} {'with standby = 1: trap reply -> answered by the promoted one':<58} "
               f"{stats(standby_ms)}")
    report.data["abort"] = out


def section_storage(opts, procs: Processes, endpoints: Endpoints, report: Report) -> None:
    """Durable state (DESIGN 3b): a counter that does one kv_get and one kv_put per request,
    committed with fsync and with os durability, beside the same counter kept in memory."""
    services = {"memory": {"module": str(COUNTER)},
                "fsync": {"module": str(COUNTER_DURABLE), "state_durability": "fsync"},
                "os": {"module": str(COUNTER_DURABLE), "state_durability": "os"}}
    daemon = Corral(procs, endpoints, opts, name="storage", apps=services)
    daemon.start()
    requests = max(opts.requests // 4, 1000)
    results: dict[str, list[loadgen.Result]] = {name: [] for name in services}
    try:
        for name in services:   # warm: instances made, databases open
            check(loadgen.run(daemon.endpoint, name.encode(), b"incr", requests=200, concurrency=opts.concurrency,
                              clients=1, key=None, progress=False, framing_name="native"), name)
        for _ in range(opts.rounds):
            for name in services:
                result = loadgen.run(daemon.endpoint, name.encode(), b"incr", requests=requests,
                                     concurrency=opts.concurrency, clients=opts.clients, key=None,
                                     progress=opts.progress, framing_name="native")
                check(result, f"storage {name}")
                results[name].append(result)
        state = {s["name"]: s.get("state", {}) for s in daemon.status()["services"]}
    finally:
        daemon.stop()
    medians = {name: median_result(runs) for name, runs in results.items()}
    base = medians["memory"].throughput
    report.out(f"== Durable state: a counter, one kv_get + one kv_put per request, {opts.workers} workers "
               f"({opts.rounds} rounds of {requests} requests, median; {opts.concurrency} in flight)")
    report.out(f"{'state kept':<36} {'req/s':>9} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8} {'commits':>9}")
    labels = {"memory": "in memory (counter.wat)", "os": "durable, state_durability = os",
              "fsync": "durable, state_durability = fsync"}
    for name in ("memory", "os", "fsync"):
        result = medians[name]
        commits = state.get(name, {}).get("commits", "-")
        report.out(f"{labels[name]:<36} {result.throughput:>9.0f} {result.throughput / base:>6.2f}x "
                   f"{result.pct(50):>8.2f} {result.pct(99):>8.2f} {commits:>9}")
    report.data["storage"] = {name: summary(result) for name, result in medians.items()}


def section_security(opts, procs: Processes, endpoints: Endpoints, report: Report) -> None:
    import tomllib
    import zmq.auth
    from corral.client import CurveKeys
    keys_dir = procs.root / "keys"
    (keys_dir / "clients").mkdir(parents=True)
    zmq.auth.create_certificates(keys_dir, "server")
    zmq.auth.create_certificates(keys_dir, "bench")
    shutil.copy(keys_dir / "bench.key", keys_dir / "clients" / "bench.key")
    keys = CurveKeys.load(str(keys_dir / "bench.key_secret"), str(keys_dir / "server.key"))
    tcp = lambda name: f"tcp://127.0.0.1:{free_port()}"   # CURVE covers tcp only: both on tcp
    plain = Corral(procs, tcp, opts, name="tcp-plain", label="c  corral, tcp")
    curve = Corral(procs, tcp, opts, name="tcp-curve", label="c  corral, tcp + CURVE")
    doc = tomllib.loads(curve.config.read_text())
    doc["security"] = {"curve_secret_key": str(keys_dir / "server.key_secret"),
                       "client_keys": str(keys_dir / "clients")}
    curve.config.write_text(to_toml(doc))
    runs: dict[str, list[loadgen.Result]] = {plain.label: [], curve.label: []}
    try:
        plain.start()
        curve.start()
        for _ in range(opts.rounds):
            for system, with_keys in ((plain, None), (curve, keys)):
                result = loadgen.run(system.endpoint, b"echo", opts.body.encode(), requests=opts.requests,
                                     concurrency=opts.concurrency, clients=opts.clients, progress=opts.progress,
                                     keys=with_keys)
                check(result, system.label)
                runs[system.label].append(result)
    finally:
        plain.stop()
        curve.stop()
    med = {label: median_result(rs) for label, rs in runs.items()}
    base, secured = med[plain.label], med[curve.label]
    per_request_us = lambda r: 1e6 / r.throughput
    report.out(f"== Security: CURVE on a loopback tcp frontend, {opts.requests} requests per run, "
               f"{opts.rounds} round(s), median shown")
    report.out(f"{'system':<40} {'req/s':>9} {'us/req':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, result in med.items():
        report.out(f"{label:<40} {result.throughput:>9.0f} {per_request_us(result):>8.1f} "
                   f"{result.pct(50):>8.3f} {result.pct(99):>8.3f}")
    report.out(f"CURVE / plain tcp throughput: {secured.throughput / base.throughput:.2f}x; "
               f"CURVE adds {per_request_us(secured) - per_request_us(base):.1f} us per request")
    drain_us = _measure_drains(keys_dir, opts)
    report.out(f"broker drain per 6-frame request (frames.{_frames_impl()}): {drain_us['drain']:.2f} us; "
               f"reading each User-Id too: {drain_us['drain_with_user']:.2f} us "
               f"({drain_us['drain_with_user'] / drain_us['drain']:.1f}x), through pyzmq Frames: "
               f"{drain_us['pyzmq_with_user']:.2f} us")
    check_ms = _measure_check(procs.root, opts)
    report.out(f"module check of the echo guest (cache warm), median of {opts.reps}: in a child "
               f"{check_ms['child']:.0f} ms, in-process (as before) {check_ms['in_process']:.1f} ms "
               f"(+{check_ms['child'] - check_ms['in_process']:.0f} ms at each start-up and reload)")
    report.data["security"] = {"req_s": {label: r.throughput for label, r in med.items()},
                               "ratio_curve_over_plain": secured.throughput / base.throughput,
                               "drain_us": drain_us, "check_ms": check_ms}


def _frames_impl() -> str:
    from corral.wire import frames
    return frames.IMPLEMENTATION


def _measure_drains(keys_dir: Path, opts) -> dict[str, float]:
    """drain() against drain_with_user() on the same CURVE connection, per message."""
    import zmq.auth
    from corral.broker import BATCH
    from corral.wire.frames import _drain_with_user, drain, drain_with_user
    from zmq.auth.thread import ThreadAuthenticator
    context = zmq.Context()
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys_dir / "clients"))
    try:
        server_public, server_secret = zmq.auth.load_certificate(keys_dir / "server.key_secret")
        public, secret = zmq.auth.load_certificate(keys_dir / "bench.key_secret")
        router = context.socket(zmq.ROUTER)
        router.curve_server, router.curve_secretkey = True, server_secret
        router.setsockopt(zmq.RCVHWM, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = context.socket(zmq.DEALER)
        dealer.curve_secretkey, dealer.curve_publickey, dealer.curve_serverkey = secret, public, server_public
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        count = 2000 if opts.quick else 20000
        results: dict[str, list[float]] = {"drain": [], "drain_with_user": [], "pyzmq_with_user": []}
        for _ in range(opts.reps):
            for name, fn in (("drain", drain), ("drain_with_user", drain_with_user),
                             ("pyzmq_with_user", _drain_with_user)):
                for i in range(count):
                    dealer.send_multipart([b"CORRAL1", b"%d" % i, b"echo", b"", b"hello"])
                got, spent = 0, 0
                while got < count:
                    router.poll(1000)
                    start = time.perf_counter_ns()
                    got += len(fn(router, BATCH))
                    spent += time.perf_counter_ns() - start
                results[name].append(spent / count / 1000)
        dealer.close(0)
        router.close(0)
    finally:
        auth.stop()
        context.term()
    return {name: statistics.median(values) for name, values in results.items()}


def _measure_check(root: Path, opts) -> dict[str, float]:
    """The start-up/reload module check: run_check's child against the same work in-process."""
    from corral.daemon import run_check
    from corral.workers import modules
    from corral.workers.host import EpochTicker, first_instance_fault
    from corral.workers.spec import AppSpec, CheckRequest
    cache = root / "check-cache"
    cache.mkdir()
    app = AppSpec("echo", str(ECHO), "", "reuse", 1000, 64, "respawn")
    request = CheckRequest(str(cache), 4096, 0, "", "", [app])
    run_check(request)   # fills the cache: both measure a warm start
    child, in_process = [], []
    for _ in range(opts.reps):
        start = time.perf_counter()
        run_check(request)
        child.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        engine = modules.make_engine(False)
        ticker = EpochTicker(engine)
        ticker.start()
        module, artifact = modules.compile_cached(engine, ECHO, cache, False)
        modules.inspect(module)
        first_instance_fault(engine, AppSpec(**{**app.__dict__, "artifact": str(artifact)}), module, cache, False)
        ticker.stop()
        in_process.append((time.perf_counter() - start) * 1000)
    return {"child": statistics.median(child), "in_process": statistics.median(in_process)}


def _measure_respawn(procs, endpoints, opts, restart: dict, reps: int, gap_s: float,
                     standby: int) -> tuple[list[float], list[float]]:
    """Trap reply -> a request answered by another worker, `reps` times (and startup times)."""
    from corral.client import Client
    daemon = Corral(procs, endpoints, opts, name=f"abort-respawn-{standby}", workers=1, restart=restart,
                    apps={"counter": {"module": str(COUNTER), "instances": "keyed", "on_abort": "respawn"},
                          "echo": {"module": str(ECHO)}}, standby=standby)
    daemon.start()
    respawn_ms, ready_ms = [], []
    try:
        context = zmq.Context()
        try:
            with Client(daemon.endpoint, context) as client:
                for i in range(reps):
                    if standby:
                        daemon.wait_for_standby()
                    before = daemon.ready_pids()
                    assert client.call("echo", b"x").status == 200
                    trap = client.call("counter", b"trap", key=f"r{i}", timeout=10)
                    replied = time.perf_counter_ns()
                    if trap.status != 502:
                        raise BenchError(f"respawn: the trap got {trap.status} {trap.body!r}, not 502")
                    # A request of a service only that worker serves: it waits in the
                    # broker's queue until the new worker is ready, then is answered.
                    poll = client.call("echo", b"again", timeout=30)
                    answered = time.perf_counter_ns()
                    if poll.status != 200:
                        raise BenchError(f"respawn: the request after the trap got {poll.status} {poll.body!r}")
                    respawn_ms.append((answered - replied) / 1e6)
                    after = daemon.ready_pids()
                    if not after or set(after) & set(before):
                        raise BenchError(f"respawn: the worker was not replaced ({before} -> {after})")
                    time.sleep(gap_s)
        finally:
            context.destroy(linger=0)
        # The pool logs each worker's spawn-to-ready time: the respawned ones are generation > 1.
        for event in _events(daemon.log, "worker.ready"):
            if "startup_ms" in event and not str(event.get("worker", "")).endswith(".1"):
                ready_ms.append(event["startup_ms"])
    finally:
        daemon.stop()
    return respawn_ms, ready_ms


FLOOD_WINDOW = 1000   # requests a flooding client keeps in flight: the default max_inflight_per_client


def flood(endpoint: str, service: str, window: int) -> None:
    """A flooding client (a process of its own, killed when done): `window` requests always
    in flight, each reply read and replaced at once."""
    from corral.wire.frames import NOBLOCK, drain, send_frames
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(endpoint)
    request = [b"CORRAL1", b"0", service.encode(), b"", b"flood"]
    for _ in range(window):
        send_frames(socket, request, 0)
    while True:
        socket.poll(1000)
        for _ in drain(socket, 1000):
            send_frames(socket, request, NOBLOCK)


def section_fairness(opts, procs: Processes, endpoints: Endpoints, report: Report) -> None:
    """A light client's latency beside a flood, same service and another, against it alone."""
    apps = {"echo": {"module": str(ECHO)}, "echo2": {"module": str(ECHO)}}
    daemon = Corral(procs, endpoints, opts, name="fairness", apps=apps)
    requests, rate = (300, 300.0) if opts.quick else (3000, 500.0)
    daemon.start()
    results: dict[str, list[loadgen.Result]] = {"alone": [], "echo": [], "echo2": []}
    try:
        for _ in range(opts.rounds):
            for flooded in results:
                flooder = None
                if flooded != "alone":
                    flooder = procs.start([sys.executable, "-c",
                                           f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                           f"import run; run.flood({daemon.endpoint!r}, {flooded!r}, "
                                           f"{FLOOD_WINDOW})"])
                    end = time.monotonic() + 30
                    while not any(s["name"] == flooded and s["queued"] > FLOOD_WINDOW // 2
                                  for s in daemon.status()["services"]):
                        if time.monotonic() > end or flooder.poll() is not None:
                            raise BenchError(f"fairness: the flood on {flooded} did not build a queue")
                        time.sleep(0.05)
                try:
                    results[flooded].append(loadgen.run(daemon.endpoint, b"echo", opts.body.encode(),
                                                        requests=requests, concurrency=1, rate=rate,
                                                        warmup=20))
                finally:
                    if flooder is not None:
                        procs.stop(flooder, sig=signal.SIGKILL)
                end = time.monotonic() + 30
                while daemon.status()["in_flight"]:   # the flood's leftovers, before the next run
                    if time.monotonic() > end:
                        raise BenchError("fairness: the flood's requests were not all answered")
                    time.sleep(0.05)
    finally:
        daemon.stop()
    medians = {name: median_result(runs, by=lambda r: -r.pct(99)) for name, runs in results.items()}
    alone = medians["alone"].pct(99)
    report.out(f"== Fairness: a light client ({rate:.0f} req/s open loop, {requests} requests, on echo) "
               f"beside a flooding one ({FLOOD_WINDOW} in flight), {opts.workers} workers, "
               f"median of {opts.rounds}")
    report.out(f"{'light client on echo':<36} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  {'not 200':>7}")
    labels = {"alone": "alone", "echo": "flood on echo (same service)", "echo2": "flood on echo2 (other service)"}
    for name, result in medians.items():
        report.out(f"{labels[name]:<36} {result.pct(50):>8.3f} {result.pct(99):>8.3f} {result.max_ms:>8.3f}  "
                   f"{result.failed:>7}")
    for name in ("echo", "echo2"):
        ratio = medians[name].pct(99) / alone if alone > 0 else float("inf")
        report.out(f"ratio p99 beside a flood on {name} / alone = {ratio:.2f}")
    report.data["fairness"] = {name: [r.summary() for r in runs] for name, runs in results.items()}


def _events(log: Path, name: str) -> list[dict]:
    events = []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return events
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            events.append(event)
    return events


# --- main ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    pick = parser.add_argument_group("sections (all when none is named)")
    for name in SECTIONS:
        pick.add_argument(f"--{name}", action="store_true", dest=name.replace("-", "_"))
    parser.add_argument("--quick", action="store_true",
                        help="small everything (a few thousand requests, few repetitions): a CI smoke run")
    parser.add_argument("--workers", type=int, default=2, help="corral workers = REP workers of (b) (default 2)")
    parser.add_argument("-n", "--requests", type=int, help="requests per throughput run (default 60000; quick 3000)")
    parser.add_argument("--half-requests", type=int, help="requests of each half-load run (default requests/2)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per client (default 32)")
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes (default 1: on 2 cores a second client mostly takes CPU "
                             "from the server)")
    parser.add_argument("--rounds", type=int, help="throughput and half-load rounds, a b c interleaved; "
                                                   "the median is shown (default 3; quick 1)")
    parser.add_argument("--reps", type=int, help="repetitions of the host, instantiate and abort measures "
                                                 "(default 7; quick 3)")
    parser.add_argument("--systems", default="abc",
                        help="which of a, b, c (and d, with --compare) to load (default abc, or abcd with "
                             "--compare); half load is half of c's max, or of the last one's without c")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="also load (d): corral from another checkout, e.g. a `git worktree` of an "
                             "older commit, in the same interleaved rounds (throughput and half-load)")
    parser.add_argument("--body", default="hello", help="request body (default 'hello')")
    parser.add_argument("--hops-rate", type=float, default=1000.0,
                        help="hops section: requests per second, one at a time (default 1000)")
    parser.add_argument("--transport", choices=("ipc", "tcp"), default="ipc",
                        help="client endpoints of all three systems (default ipc)")
    parser.add_argument("--set", dest="corral_set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [supervisor] setting for corral's config, e.g. --set pipeline=8 (repeatable)")
    parser.add_argument("--baseline-multipart", action="store_true",
                        help="baseline servers use recv_multipart/send_multipart instead of frame calls")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON to FILE")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the throughput rounds, load corral once more under py-spy and write "
                             "flame graphs (DIR/broker.svg, DIR/worker-N.svg) and collapsed stacks")
    opts = parser.parse_args(argv)
    chosen = [name for name in SECTIONS if getattr(opts, name.replace("-", "_"))]
    opts.sections = chosen or list(SECTIONS)
    if opts.compare is not None:
        if not (opts.compare / "supervisor" / "__init__.py").is_file():
            parser.error(f"--compare {opts.compare}: not a corral checkout (no supervisor/__init__.py)")
        opts.compare = opts.compare.resolve()
        sources = [opts.compare / "supervisor" / "wire" / "_zmqframes.c", opts.compare / "supervisor" / "_zmqframes.c"]
        source = next((path for path in sources if path.is_file()), None)
        if source is not None and not list(source.parent.glob("_zmqframes*.so")):
            parser.error(f"--compare {opts.compare}: its C extension is not built (it would run on pyzmq "
                         f"alone): build it with  cd {opts.compare} && {sys.executable} setup.py build_ext "
                         f"--inplace")
        if opts.systems == "abc":
            opts.systems += "d"
    opts.systems = "".join(sorted(set(opts.systems)))
    if not opts.systems or set(opts.systems) - set("abcd"):
        parser.error("--systems takes letters among a, b, c, d")
    if "d" in opts.systems and opts.compare is None:
        parser.error("--systems d needs --compare DIR")
    quick = opts.quick
    opts.requests = opts.requests or (3000 if quick else 60000)
    opts.half_requests = opts.half_requests or max(opts.requests // 2, 500)
    opts.rounds = opts.rounds or (1 if quick else 3)
    opts.reps = opts.reps or (3 if quick else 7)
    opts.host_iterations = 2000 if quick else 10000
    opts.instantiate_iterations = 100 if quick else 500
    opts.hops_requests = 300 if quick else 2000
    opts.run_half_load = "half-load" in opts.sections
    settings = {}
    for item in opts.corral_set:
        name, sep, raw = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            settings[name.strip()] = json.loads(raw)
        except ValueError:
            settings[name.strip()] = raw
    fixed = {"workers": "--workers", "frontend": "--transport", "control": None, "cache_dir": None}
    for name in set(settings) & set(fixed):
        parser.error(f"--set {name}: set by the benchmark itself" + (f"; use {fixed[name]}" if fixed[name] else ""))
    opts.corral_set = settings
    return opts


def remove_stale_dirs() -> None:
    """Private directories of earlier runs that were killed outright (SIGKILL: no clean-up)."""
    for path in Path("/tmp").glob("crlb-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def machine_line(opts) -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"
    load1, load5, _ = os.getloadavg()
    return (f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
            f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), wasmtime-py {version('wasmtime')}; "
            f"transport {opts.transport}; load average {load1:.2f} (1 min), {load5:.2f} (5 min) at start")


def busy_others() -> list[str]:
    """Other processes using a lot of CPU right now (they make every number here noisier)."""
    try:
        import psutil
    except ImportError:
        return []
    mine = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.pid != mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
            if cpu >= 20:
                busy.append(f"pid {p.pid} {p.info['name']} {cpu:.0f}%")
        except psutil.Error:
            pass
    return busy


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # SIGTERM and SIGHUP end the run like Ctrl-C does: through every finally below.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    remove_stale_dirs()
    root = Path(tempfile.mkdtemp(prefix=f"crlb-{os.getpid()}-", dir="/tmp"))
    (root / "cache").mkdir()
    procs = Processes(root)
    endpoints = Endpoints(root, opts.transport)
    report = Report()
    started = time.monotonic()
    try:
        report.out(f"corral bench ({'quick' if opts.quick else 'full'}): sections {', '.join(opts.sections)}")
        report.out(machine_line(opts))
        busy = busy_others()
        if busy:
            report.out("warning: other processes are busy, the figures will be noisy: " + "; ".join(busy))
        report.out(f"load: body {len(opts.body.encode())} bytes; corral and (b) with {opts.workers} workers")
        report.out("")
        if "throughput" in opts.sections or "half-load" in opts.sections:
            section_throughput(opts, procs, endpoints, report)
            report.out("")
        if "hops" in opts.sections:
            section_hops(opts, procs, endpoints, report)
            report.out("")
        if "abort" in opts.sections:
            section_abort(opts, procs, endpoints, report)
            report.out("")
        if "storage" in opts.sections:
            section_storage(opts, procs, endpoints, report)
            report.out("")
        if "fairness" in opts.sections:
            section_fairness(opts, procs, endpoints, report)
            report.out("")
        if "security" in opts.sections:
            section_security(opts, procs, endpoints, report)
            report.out("")
        if "host" in opts.sections:
            section_host(opts, root, report)
            report.out("")
        if "instantiate" in opts.sections:
            section_instantiate(opts, root, report)
            report.out("")
        if "unwind" in opts.sections:
            section_unwind(opts, root, report)
            report.out("")
        report.out(f"done in {time.monotonic() - started:.1f} s")
        if opts.json:
            opts.json.write_text(json.dumps({"argv": sys.argv[1:], **report.data}, indent=1, default=str))
        return 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"\nbench: interrupted ({str(exc) or 'SIGINT'}); cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # let the clean-up finish
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
