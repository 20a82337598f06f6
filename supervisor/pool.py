"""The process manager: spawn, reap, stop and kill worker processes, one per slot.

A slot is a place for one serving worker; each worker that fills it gets the
next generation number, and its routing id b"w<slot>.<generation>" with it.
A worker that leaves its slot (it retired, died, or was killed) is replaced
at once, unless the slot is crash-looping: workers that die before they
become ready are respawned after a backoff that doubles each time.

Standby slots (numbered from STANDBY_BASE) hold workers that are started and
ready but take no requests; when a serving slot is vacated, a ready standby
is promoted into it at once (keeping its routing id) and its standby slot is
refilled: an abort costs no capacity while a new process starts.

Every state change is logged: spawned, ready, retiring, stopping, killed,
exited (with its code or signal).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import psutil

from corral.wire.protocol import worker_identity

STANDBY_BASE = 1000
STANDBY_END = 2000   # beyond: other cordons' serving slots (corral.cordons)


def is_standby(slot: int) -> bool:
    return STANDBY_BASE <= slot < STANDBY_END
# Set in every worker's environment: the run directory of the daemon that started it.
WORKER_MARKER = "CORRAL_WORKER_OF"
# A promoted standby's spare is started this much later: a starting worker takes
# a core for ~200 ms, which the promoted one needs for the requests it takes over.
STANDBY_REFILL_S = 0.5


class WorkerState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"   # leaving on its own after a fault; killed if it lingers
    STOPPING = "stopping"   # asked to leave by the daemon; killed if it lingers
    KILLED = "killed"       # SIGKILL sent, waiting to reap


@dataclass(eq=False)
class WorkerProcess:
    slot: int                      # the slot it fills now
    generation: int
    config_generation: int
    process: subprocess.Popen
    started: float
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None
    kill_at: float | None = None   # SIGKILL when still here at this time
    cause: str | None = None       # why the daemon is making it leave
    exit_kind: str = "crashed"     # for metrics: why it exited, in one word
    psutil: psutil.Process | None = None
    home: int = -1                 # the slot it was spawned for: part of its routing id
    cordon: str = "default"        # whose apps it serves (docs/confinement.md)

    def __post_init__(self) -> None:
        if self.home < 0:
            self.home = self.slot

    @property
    def standby(self) -> bool:
        return is_standby(self.slot)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def identity(self) -> bytes:
        return worker_identity(self.home, self.generation)

    @property
    def name(self) -> str:
        """How logs name it: its routing id, as the broker's lines and the worker's own do."""
        return self.identity.decode()


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        if -returncode == signal.SIGSYS:   # the kernel's answer to a call off the allowlist
            name += ": a system call its seccomp filter forbids"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


def confinement_refused(config, log) -> None:
    """At start-up, before any worker: with `require`, a kernel that lacks a mechanism is a
    config error naming it (exit 78); with `best-effort`, what is missing is logged once.
    (Each worker checks again for itself: docs/confinement.md.)"""
    from corral.config import ConfigError
    from corral.workers.confine import offered
    mode = config.supervisor.confinement
    missing = offered().missing() if mode != "off" else []
    if missing and mode == "require":
        raise ConfigError([f"{config.path}: [supervisor] confinement = \"require\", but workers cannot "
                           f"confine themselves here: {problem}" for problem in missing])
    if missing:
        log.warning("daemon.confinement_partial", mode=mode, missing=missing)


class Pool:
    def __init__(self, log, backoff_initial_s: float, backoff_max_s: float):
        self.log = log
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.slots: dict[int, WorkerProcess | None] = {}
        self.processes: dict[int, WorkerProcess] = {}     # every live process, by pid
        self.generations: dict[int, int] = {}
        self.failures: dict[int, int] = {}                 # consecutive start failures per slot
        self.respawn_at: dict[int, float] = {}             # vacant slots and when to fill them
        self.exits: Counter = Counter()                    # exit kinds, for metrics
        self.spec_path: Path | None = None
        self.config_generation = 0
        self.max_requests = 0
        self.max_requests_jitter = 0
        # Cordons (docs/confinement.md): each has its own spec; the daemon says whose a slot is.
        self.cordon_specs: dict[str, Path] = {}
        self.cordon_of = lambda slot: "default"

    def use_spec(self, spec_path: Path, config_generation: int, max_requests: int, jitter: int) -> None:
        self.spec_path = spec_path
        self.config_generation = config_generation
        self.max_requests = max_requests
        self.max_requests_jitter = jitter

    # --- spawning ------------------------------------------------------------

    def spawn(self, slot: int) -> WorkerProcess:
        assert self.spec_path is not None
        generation = self.generations.get(slot, 0) + 1
        self.generations[slot] = generation
        max_requests = self.max_requests
        if max_requests and self.max_requests_jitter:
            max_requests += random.randint(0, self.max_requests_jitter)
        # -P: the working directory is not put first on sys.path, so a
        # `corral/` folder there cannot stand in for ours. PYTHONPATH is still
        # honoured, as it is by the daemon itself: whoever sets it is trusted.
        cordon = self.cordon_of(slot)
        spec_path = self.cordon_specs.get(cordon, self.spec_path)
        command = [os.path.abspath(sys.executable), "-P", "-m", "corral.workers", str(spec_path),
                   "--slot", str(slot),
                   "--generation", str(generation), "--parent", str(os.getpid()),
                   "--max-requests", str(max_requests)]
        if is_standby(slot):
            command.append("--standby")
        env = {**os.environ, WORKER_MARKER: str(self.spec_path.parent)}
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)
        worker = WorkerProcess(slot, generation, self.config_generation, process, time.monotonic(), cordon=cordon)
        try:
            worker.psutil = psutil.Process(process.pid)
        except psutil.Error:
            pass
        self.processes[process.pid] = worker
        self.slots[slot] = worker
        self.respawn_at.pop(slot, None)
        self.log.info("worker.spawned", worker=worker.name, pid=worker.pid, cordon=cordon,
                      config_generation=self.config_generation)
        return worker

    def fill(self, slots: range) -> None:
        for slot in slots:
            if self.slots.get(slot) is None and slot not in self.respawn_at:
                self.spawn(slot)

    def vacate(self, worker: WorkerProcess, respawn: bool = True) -> None:
        """The worker no longer fills its slot; schedule its replacement."""
        if self.slots.get(worker.slot) is not worker:
            return
        self.slots[worker.slot] = None
        if not respawn:
            return
        delay = 0.0
        if worker.ready_at is None and worker.cause is None:
            failures = self.failures[worker.slot] = self.failures.get(worker.slot, 0) + 1
            delay = min(self.backoff_initial_s * 2 ** (failures - 1), self.backoff_max_s)
            self.log.warning("worker.respawn_backoff", slot=worker.slot, failures=failures,
                             delay_ms=int(delay * 1000))
        self.respawn_at[worker.slot] = time.monotonic() + delay

    def promote(self, slot: int) -> WorkerProcess | None:
        """Move a ready standby worker into the vacant serving `slot`; refill its standby slot."""
        for home, worker in self.slots.items():
            if is_standby(home) and worker is not None and worker.state is WorkerState.READY:
                self.slots[home] = None
                self.respawn_at[home] = time.monotonic() + STANDBY_REFILL_S
                worker.slot = slot
                self.slots[slot] = worker
                self.respawn_at.pop(slot, None)
                self.log.info("worker.promoted", worker=worker.name, pid=worker.pid, slot=slot)
                return worker
        return None

    def remove_slot(self, slot: int) -> None:
        self.slots.pop(slot, None)
        self.respawn_at.pop(slot, None)

    # --- state changes -------------------------------------------------------

    def by_identity(self, identity: bytes) -> WorkerProcess | None:
        for worker in self.processes.values():
            if worker.identity == identity:
                return worker
        return None

    def mark_ready(self, worker: WorkerProcess) -> None:
        worker.state = WorkerState.READY
        worker.ready_at = time.monotonic()
        self.failures.pop(worker.slot, None)
        self.log.info("worker.ready", worker=worker.name, pid=worker.pid,
                      startup_ms=int((worker.ready_at - worker.started) * 1000))

    def retiring(self, worker: WorkerProcess, reason: str, timeout_s: float) -> None:
        worker.state = WorkerState.RETIRING
        worker.cause = f"retired ({reason})"
        worker.exit_kind = reason
        worker.kill_at = time.monotonic() + timeout_s
        self.log.warning("worker.retiring", worker=worker.name, pid=worker.pid, cause=reason)

    def stop(self, worker: WorkerProcess, cause: str, timeout_s: float) -> None:
        """The broker asked the worker to leave; kill it if it is not gone in time."""
        if worker.state in (WorkerState.STOPPING, WorkerState.KILLED):
            return
        worker.state = WorkerState.STOPPING
        worker.cause = cause
        worker.exit_kind = "stopped"
        worker.kill_at = time.monotonic() + timeout_s
        self.log.info("worker.stopping", worker=worker.name, pid=worker.pid, cause=cause)

    def kill(self, worker: WorkerProcess, cause: str, kind: str | None = None) -> None:
        if worker.state is WorkerState.KILLED:
            return
        if kind is not None:
            worker.exit_kind = kind
        worker.state = WorkerState.KILLED
        worker.cause = worker.cause or cause
        worker.kill_at = None
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.warning("worker.killed", worker=worker.name, pid=worker.pid, cause=cause)

    def reap(self) -> list[tuple[WorkerProcess, int]]:
        """Collect every exited child: (worker, returncode as subprocess gives it)."""
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.processes.pop(pid, None)
            if worker is None:
                continue
            code = worker.process.returncode = os.waitstatus_to_exitcode(status)
            self.exits[worker.exit_kind] += 1
            how = describe_exit(code)
            if worker.cause is None and code != 0:
                # Nobody here asked it to go: a signal from outside, or a crash.
                cause = f"{how}, not by corral" if code < 0 else f"{how}, unasked"
                self.log.warning("worker.exited", worker=worker.name, pid=pid, how=how, cause=cause)
            else:
                self.log.info("worker.exited", worker=worker.name, pid=pid, how=how, cause=worker.cause)
            exited.append((worker, worker.process.returncode))
        return exited

    # --- timers --------------------------------------------------------------

    def due(self, now: float) -> None:
        """SIGKILL the workers that outstayed their time; fill the slots whose backoff ran out."""
        for worker in list(self.processes.values()):
            if worker.kill_at is not None and now >= worker.kill_at:
                self.kill(worker, f"still running {worker.cause or 'after its time'}")
        for slot, when in list(self.respawn_at.items()):
            if now >= when:
                self.spawn(slot)

    def next_due(self) -> float | None:
        times = [w.kill_at for w in self.processes.values() if w.kill_at is not None]
        times += self.respawn_at.values()
        return min(times) if times else None

    def rss_over(self, limit_bytes: int) -> list[tuple[WorkerProcess, int]]:
        over = []
        for worker in self.processes.values():
            if worker.psutil is None or worker.state is WorkerState.KILLED:
                continue
            try:
                rss = worker.psutil.memory_info().rss
            except psutil.Error:
                continue
            if rss > limit_bytes:
                over.append((worker, rss))
        return over

    def serving_slots(self) -> list[int]:
        return sorted(s for s in self.slots if not is_standby(s))

    def all_ready(self, slots: int) -> bool:
        return all((w := self.slots.get(s)) is not None and w.state is WorkerState.READY
                   and w.config_generation == self.config_generation for s in range(slots))

    def kill_all(self) -> None:
        for worker in list(self.processes.values()):
            self.kill(worker, "daemon exiting")


def kill_stale_workers(runtime_dir: Path, log) -> None:
    """Kill workers left by an earlier daemon of ours that died (they hold our sockets' names).

    Workers die with their daemon (parent-death signal), so this finds
    something only if that failed. A worker is known by the marker its
    daemon put in its environment (WORKER_MARKER: the daemon's run
    directory), read through psutil, never by its command line, which any
    process can imitate. Called before this daemon spawns any worker, so a
    marker naming our own pid's directory is a dead namesake's (pid reuse).
    """
    me = os.getuid()
    prefix = str(runtime_dir) + os.sep
    for process in psutil.process_iter(["pid", "uids"]):
        try:
            if process.info["uids"] is None or process.info["uids"].real != me or process.pid == os.getpid():
                continue
            marker = process.environ().get(WORKER_MARKER)
            if not marker or not marker.startswith(prefix):
                continue
            owner = _daemon_pid(marker)
            if owner is not None and owner != os.getpid() and psutil.pid_exists(owner):
                continue
            process.kill()
            log.warning("worker.stale_killed", pid=process.pid, parent=owner)
        except (psutil.Error, ValueError):
            continue


def _daemon_pid(run_dir: str) -> int | None:
    """The pid in a run directory's name (daemon-<pid>, host-<pid>), or None."""
    name = os.path.basename(run_dir.rstrip(os.sep))
    for prefix in ("daemon-", "host-"):   # `corral host`'s run directory too (docs/cluster.md)
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None
