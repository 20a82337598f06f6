"""The arbiter: one loop that owns every socket, signal, timer and child process.

    start:  load config, compile modules, bind sockets, spawn the workers
    loop:   poll sockets and the signal pipe
            -> broker intake and replies -> queued signals -> dispatch
            -> what the broker learned (ready, retiring, silent workers)
            -> timers (heartbeats, deadlines, kills, respawns, rss, sd_notify)
    stop:   on SIGTERM/SIGINT drain: refuse new requests, finish the ones in
            flight, let the workers go, exit 0 within graceful_timeout_s

Signals are queued by their handlers and handled here in the loop, never in
the handler (gunicorn's arbiter does the same): SIGCHLD reaps, SIGHUP
reloads, SIGTERM and SIGINT drain (a second one stops at once). The one
other thread waits for the check child (corral.workers.check) that compiles
a reloaded config's modules and makes their first instances, and hands the
result back through the same wake-up pipe. Neither guest code nor wasmtime
is ever loaded into this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import zmq

from corral import config as config_module
from corral import cordons, paths
from corral.alarms import AlarmRunner
from corral.wire import frames, logs
from corral.broker import Broker
from corral.broker_ledger import Event
from corral.config import DEFAULT_CORDON, AppSettings, Config, ConfigError
from corral.cordons import Cordon, SlotPlan
from corral.control import Control
from corral.frontend_watch import FrontendWatch
from corral.metrics import MetricsServer
from corral.notify import Notifier
from corral.rollout import Rollout
from corral.snapshot import Board, Facts, Snapshot, take as take_snapshot
from corral.verbs import Arbiter
from corral.wire.tuning import quiet_garbage_collector
from corral.pool import (STANDBY_BASE, Pool, WorkerProcess, WorkerState, confinement_refused, describe_exit,
                             is_standby, kill_stale_workers)
from corral.workers import state
from corral.workers.spec import AppSpec, CheckRequest, WorkerSpec, resolve
from corral.wire.exits import EX_CONFIG, EX_NOPERM, EX_SOFTWARE, EX_UNAVAILABLE, UntestedWasmtime

RSS_CHECK_S = 1.0
STATUS_EVERY_S = 2.0
STOP_WORKERS_S = 2.0  # of graceful_timeout_s, kept for workers to leave after the drain
SIGCHLD = signal.SIGCHLD
POLL_EVERY = 16       # busy loop turns between polls (see Daemon.loop)
CHECK_TIMEOUT_S = 120        # the module check child: compiling is most of it
CHECK_TIMEOUT_PER_APP_S = 15  # first instances are interrupted after 10 s each


class Daemon:
    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.log = logs.get(component="daemon")
        self.notifier = Notifier()
        self.signals: deque[int] = deque()
        self.started = time.monotonic()
        self.config_generation = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.workers_released = False
        self.announced_ready = False
        self.rollout: Rollout[WorkerProcess] = Rollout()
        self.next_rss = 0.0
        self.next_status = 0.0
        self.next_tick = 0.0
        self.next_timer = 0.0    # the earliest of the timers below and the pool's
        self.compiling: threading.Thread | None = None   # a reload's compile thread
        self.reload_result: tuple[Config, list[AppSpec]] | ConfigError | None = None
        self.reload_again = False
        self.reload_warnings: list[str] = []   # told to whoever asked for the reload, when it is over
        self.board = Board(self.wake)          # the Snapshot the metrics thread reads
        self.run_id = os.urandom(8).hex()   # names this run's tokens and fences in a shared store
        self.slot_plan = SlotPlan()            # each cordon's slots (docs/confinement.md)

    # --- start -------------------------------------------------------------

    def run(self) -> int:
        try:
            config = config_module.with_defaults(config_module.load(self.config_path))
            logs.configure(config.logging.level, config.logging.format)
            self.cache_dir = paths.cache_dir(config.supervisor.cache_dir)
            confinement_refused(config, self.log)   # docs/confinement.md
            runtime = paths.runtime_dir()
            kill_stale_workers(runtime, self.log)   # before the state files: none may still commit
            spec_inputs = self.compile(config, mode="start")
            self.clean_stale_run_dirs(runtime)
            self.run_dir = paths.private_dir(runtime / f"daemon-{os.getpid()}")
        except ConfigError as exc:
            logs.configure()
            for problem in exc.problems:
                self.log.error("config.invalid", problem=problem)
            return EX_CONFIG
        except UntestedWasmtime as exc:
            logs.configure()
            self.log.error("daemon.start_failed", error=str(exc))
            return EX_SOFTWARE
        except PermissionError as exc:  # the cache or runtime directory belongs to someone else
            self.log.error("daemon.directory_refused", error=str(exc))
            return EX_NOPERM
        self.config = config
        self.pool = Pool(self.log, config.restart.backoff_initial_ms / 1000, config.restart.backoff_max_ms / 1000)
        self.context = zmq.Context()
        self.metrics = None
        try:
            self.broker = Broker(self.context, config, f"ipc://{self.run_dir / 'workers.sock'}", self.log)
            self.control = Control(self.context, config.supervisor.control, Arbiter(
                status=self.status, slots=lambda: sorted(self.pool.slots), scale=self.scale,
                restart=self.restart_slots, reload=self.reload))
            self.frontend_watch = FrontendWatch(self.broker.frontend, self.log, config.supervisor.max_message_kib)
            if config.metrics.listen:
                self.metrics = MetricsServer(config.metrics.listen, self.board, self.state_stats)
        except (zmq.ZMQError, OSError, ValueError) as exc:   # ValueError: a CURVE key unreadable since check
            self.log.error("daemon.bind_failed", error=str(exc), frontend=list(config.supervisor.frontend),
                           control=config.supervisor.control, metrics=config.metrics.listen)
            self.context.destroy(linger=0)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return EX_UNAVAILABLE
        self.hand_run_dir_to_worker_user(config)
        self.alarms = self.broker.core.alarms = AlarmRunner(self.log)
        self.broker.core.expected = self.expects
        self.load_alarms(config)
        for warning in config_module.warnings(config):
            self.log.warning("config.warning", problem=warning)
        self.use_config(config, spec_inputs)
        self.install_signals()
        self.log.info("daemon.started", pid=os.getpid(), config=str(self.config_path), frames=frames.IMPLEMENTATION,
                      frontend=list(config.supervisor.frontend),
                      control=config.supervisor.control,
                      workers={c.name: c.workers for c in self.cordons()}, apps=sorted(config.apps))
        for cordon in self.cordons():
            self.pool.fill(cordon.slots)
        self.pool.fill(self.standby_slots())
        quiet_garbage_collector()
        if config.supervisor.workers == 0:   # a broker for remote hosts only: READY once bound
            self.announced_ready = True
            self.notifier.ready(self.status_line())
            self.log.info("daemon.ready", workers=0, cluster=self.broker.cluster.listen)
        try:
            self.loop()
        finally:
            self.shutdown()
        return 0

    def compile(self, config: Config, mode: str = "serve") -> list[AppSpec]:
        """Compile (or find in the cache) every module and make one instance of each, as a
        worker would, in a child process under a worker's limits and user (guest code never
        runs in the arbiter); ConfigError names the modules that fail either.

        `mode` says what becomes of state files (docs/state.md): "start" makes them and
        forgets every recorded token, "serve" (a reload) makes them, "check" (`corral
        check`) makes nothing. Runs on the reload thread too: it keeps nothing on self."""
        sup = config.supervisor
        apps = [AppSpec(app.name, str(app.module), "", app.instances, app.timeout_ms, app.max_memory_mib,
                        app.on_abort, app.state_durability, app.max_state_mib, app.max_state_value_kib,
                        app.max_state_key_bytes) for app in config.apps.values()]
        results = []
        for cordon in config_module.cordons(config).values():   # each into its own cache, as its user
            cache = paths.private_dir(cordons.cache_dir(self.cache_dir, cordon.name))
            request = CheckRequest(str(cache), sup.max_open_files, sup.max_address_space_mib, cordon.user,
                                   cordon.group, [a for a in apps if config.apps[a.name].cordon == cordon.name],
                                   confinement=sup.confinement)
            results += run_check(request)
        by_name = {app.name: app for app in apps}
        problems = [f"{config.path}: [apps.{r['name']}] module: {r['problem']}" for r in results if "problem" in r]
        for r in results:
            if "problem" not in r and r.get("uses_state"):
                problem = self.check_state_file(config, config.apps[r["name"]], mode)
                if problem:
                    problems.append(f"{config.path}: [apps.{r['name']}] module: {problem}")
        if problems:
            raise ConfigError(problems)
        return [replace(by_name[r["name"]], artifact=r["artifact"]) for r in results]

    def state_dir(self, config: Config) -> Path:
        return paths.state_dir(config.supervisor.state_dir, self.cache_dir)

    def state_path(self, config: Config, service: str) -> Path:
        """A service's sqlite file, in its cordon's directory (docs/confinement.md)."""
        app = config.apps.get(service)
        folder = cordons.state_dir(self.state_dir(config), app.cordon if app else DEFAULT_CORDON)
        return state.database_path(folder, service)

    def check_state_file(self, config: Config, app: AppSettings, mode: str) -> str | None:
        """A state file that cannot be served is a config problem: named now, not a crash loop later.

        corral.workers.state and state_pg import no wasmtime: no guest code runs here."""
        if config.cluster is not None and config.state.backend == "sqlite":
            return ("durable state: with [cluster], remote hosts serve this app too, and a sqlite file on "
                    "the broker's disk is reachable from no other host: set [state] backend = \"postgresql\" "
                    "(docs/cluster.md)")
        if config.state.backend == "postgresql":   # one shared database (docs/cluster.md)
            from corral.workers import state_pg
            return state_pg.prepare(config.state.dsn) if mode != "check" else None
        root = self.state_dir(config)
        path = self.state_path(config, app.name)
        try:
            if mode != "check":
                # Ours, and others may only pass through it to their own cordon's directory.
                paths.private_dir(root)
                os.chmod(root, 0o711)
                elsewhere = self.state_elsewhere(root, app, mode)
                if elsewhere:
                    return elsewhere
            state.check_file(path, create=mode != "check", prune_tokens=mode == "start")
            if mode != "check":
                cordon = config_module.cordons(config)[app.cordon]
                ids = resolve(cordon.user, cordon.group) if os.getuid() == 0 else None
                cordons.own(path.parent, app.name, ids)
        except (state.StateProblem, OSError) as exc:
            return f"durable state: {exc}"
        return None

    def state_elsewhere(self, root: Path, app: AppSettings, mode: str) -> str | None:
        """A service's state file found outside its cordon's directory (from before cordons,
        or its app moved cordon): moved in at start-up; on a reload, another cordon's workers
        still hold it, so the move waits for a restart, and the reload is refused."""
        others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != app.cordon)
        if mode == "start":
            came_from = cordons.adopt_state_file(root, app.cordon, app.name, others)
            if came_from:
                self.log.warning("state.moved", service=app.name, cordon=app.cordon, came_from=came_from)
            return None
        name = state.database_path(root, app.name).name
        if (cordons.state_dir(root, app.cordon) / name).exists():
            return None
        for other in others:
            if (cordons.state_dir(root, other) / name).exists():
                return (f"durable state: its file is in cordon {other!r}'s directory, whose workers hold it: "
                        f"moving an app with durable state to cordon {app.cordon!r} takes a restart "
                        f"(the file moves with it then)")
        return None

    def load_alarms(self, config: Config) -> None:
        """Every service's pending alarms, read once from its store (read-only): at start-up
        and on a reload; from then on the workers report what they commit."""
        self.alarms.keep_only(config.apps)
        for name in config.apps:
            try:
                self.alarms.load(name, self.read_alarms(config, name))
            except Exception as exc:   # sqlite3.Error or psycopg.Error: the store is down, not the daemon
                self.log.error("alarms.unreadable", service=name, error=str(exc).strip())
        self.next_timer = 0.0

    def read_alarms(self, config: Config, service: str) -> list[tuple[bytes, int]]:
        if config.state.backend == "postgresql":
            from corral.workers import state_pg
            return state_pg.read_alarms(config.state.dsn, service)
        return state.read_alarms(self.state_path(config, service))

    def read_alarm(self, service: str, scope: bytes) -> int | None:
        """One scope's alarm from its service's store (read-only); raise what the store raises."""
        if self.config.state.backend == "postgresql":
            from corral.workers import state_pg
            return state_pg.read_alarm(self.config.state.dsn, service, scope)
        return state.read_alarm(self.state_path(self.config, service), scope)

    def hand_run_dir_to_worker_user(self, config: Config) -> None:
        """Workers that drop to their cordon's user must still reach the backend socket: each
        cordon through a file of its own (cordons.backend_socket), its user's and 0600, so no
        cordon's user can use, or replace, another's. The run directory stays ours."""
        users = any(c.user or c.group for c in self.cordons(config))
        if os.getuid() != 0:
            if users:
                self.log.warning("daemon.not_root", detail="user/group ignored: not started as root")
            return
        for cordon in self.cordons(config):
            path = cordons.backend_socket(self.run_dir, cordon.name, separate=True)
            if not path.exists():
                self.broker.backend.bind(f"ipc://{path}")
            os.chown(path, *resolve(cordon.user, cordon.group))
            os.chmod(path, 0o600)
        if users:
            # Let the users through the runtime and run directories (search only, no listing).
            for folder in (self.run_dir.parent, self.run_dir):
                os.chmod(folder, folder.stat().st_mode & 0o777 | 0o011)

    def cordons(self, config: Config | None = None) -> list[Cordon]:
        """The cordons some app names, with their slots (docs/confinement.md)."""
        return self.slot_plan.place(config_module.cordons(config or self.config))

    def serving_slots(self) -> list[int]:
        """Every cordon's serving slots (not the standbys)."""
        return [slot for cordon in self.cordons() for slot in cordon.slots]

    def use_config(self, config: Config, apps: list[AppSpec]) -> None:
        self.config = config
        self.config_generation += 1
        sup = config.supervisor
        specs = {}
        for cordon in self.cordons(config):   # one spec per cordon: its apps, user, cache and state
            backend = cordons.backend_socket(self.run_dir, cordon.name, separate=os.getuid() == 0)
            spec = WorkerSpec(backend=f"ipc://{backend}",
                              config_generation=self.config_generation, heartbeat_ms=sup.heartbeat_ms,
                              capacity=sup.pipeline, restart_intensity=config.restart.intensity,
                              restart_period_s=config.restart.period_s, log_level=config.logging.level,
                              log_format=config.logging.format,
                              cache_dir=str(cordons.cache_dir(self.cache_dir, cordon.name)),
                              max_open_files=sup.max_open_files,
                              max_address_space_mib=sup.max_address_space_mib, user=cordon.user, group=cordon.group,
                              state_dir=str(cordons.state_dir(self.state_dir(config), cordon.name)),
                              state_backend=config.state.backend, state_dsn=config.state.dsn, run_id=self.run_id,
                              confinement=sup.confinement, cordon=cordon.name,
                              apps=[app for app in apps if config.apps[app.name].cordon == cordon.name])
            specs[cordon.name] = self.run_dir / f"spec-{self.config_generation}.{cordon.name}.json"
            spec.dump(specs[cordon.name])
        self.pool.cordon_specs = specs
        self.pool.cordon_of = self.slot_plan.cordon_of
        self.pool.use_spec(specs.get(DEFAULT_CORDON) or next(iter(specs.values())), self.config_generation,
                           sup.max_requests, sup.max_requests_jitter)
        if self.broker.cluster is not None:   # what joining hosts are sent: every app (docs/cluster.md)
            self.broker.cluster.use_spec(replace(spec, apps=apps, cordon=DEFAULT_CORDON))
            self.broker.fence.use(config.state.dsn if config.state.backend == "postgresql" else "", self.run_id)

    def install_signals(self) -> None:
        self.wakeup_read, wakeup_write = socket.socketpair()
        self.wakeup_read.setblocking(False)
        wakeup_write.setblocking(False)
        self.wakeup_write = wakeup_write
        signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, lambda signum, frame: self.signals.append(signum))

    def clean_stale_run_dirs(self, runtime: Path) -> None:
        for run_dir in runtime.glob("daemon-*"):
            pid = run_dir.name.removeprefix("daemon-")
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(run_dir, ignore_errors=True)

    # --- the loop ----------------------------------------------------------

    def loop(self) -> None:
        """One turn: read the sockets -> dispatch -> the broker's timers -> what the broker
        learned (its events, drained once, here) -> signals (reap, reload, stop) -> the
        other timers. docs/internals.md tells the turn and who owns which worker fact."""
        broker = self.broker
        poller = zmq.Poller()
        frontend, backend, control = broker.frontend, broker.backend, self.control.socket
        wakeup = self.wakeup_read.fileno()
        for item in (frontend, backend, control, wakeup):
            poller.register(item, zmq.POLLIN)
        busy_turns = 0
        while True:
            if busy_turns and busy_turns % POLL_EVERY:
                # The last turn found messages, so more are likely: drain again
                # without the poll (a system call); poll every POLL_EVERY turns
                # all the same, for the control socket and the signal pipe.
                found = broker.on_backend() + broker.on_frontend()
            else:
                found = 0
                now = time.monotonic()
                timeout = 0 if busy_turns or self.signals else \
                    max(0, min(1000, int((self.next_timer - now) * 1000) + 1))
                for item, _ in poller.poll(timeout):
                    if item is backend:
                        found += broker.on_backend()
                    elif item is frontend:
                        found += broker.on_frontend()
                    elif item is control:
                        self.control.serve()
                        self.next_timer = 0.0  # a verb may have started or stopped workers
                    elif item == wakeup:
                        self.drain_wakeup()
            if self.signals and SIGCHLD in self.signals:
                # Before a reap, every message waiting on the backend: a killed worker's last
                # replies are answered as sent, not as lost, a worker's RETIRING still finds
                # it (it exits as soon as it is told to), and a clean exit's goodbye is
                # usually in already (if not, the broker waits for it: BrokerCore.worker_gone).
                while broker.on_backend():
                    found += 1
            signals = len(self.signals)   # this turn's; any later one is the next turn's
            busy_turns = busy_turns + 1 if found else 0
            broker.dispatch()
            if self.alarms.changed:
                self.alarms.changed = False
                self.next_timer = 0.0   # an alarm may now be due sooner than the next timer
            now = time.monotonic()
            if now >= self.next_tick:
                self.tick_broker(now)
            self.handle_broker_events()
            if signals or self.reload_result is not None:
                self.handle_signals(signals)
            if now >= self.next_timer and self.timers(now):
                return
            if self.board.wanted:
                self.board.publish(self.snapshot())

    def handle_signals(self, count: int) -> None:
        for _ in range(count):
            self.handle_signal(self.signals.popleft())
        if self.reload_result is not None:
            self.finish_reload()
        self.next_timer = 0.0  # what the signal changed may be due at once

    def drain_wakeup(self) -> None:
        try:
            while self.wakeup_read.recv(512):
                pass
        except BlockingIOError:
            pass

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.begin_stop(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            self.reload()

    def reap(self) -> None:
        """The workers that exited (the loop read the backend and the broker's events first)."""
        for worker, returncode in self.pool.reap():
            self.broker.worker_gone(worker.identity, worker.cause or describe_exit(returncode), reaped=True,
                                    clean=returncode == 0)
            self.alarms.recheck(worker.identity, self.read_alarm)
            self.vacate(worker)

    def vacate(self, worker: WorkerProcess) -> None:
        """The worker no longer serves its slot: promote a standby into it, or respawn one."""
        slot = worker.slot
        sup = self.config.supervisor
        wanted = not self.stopping and (slot in self.serving_slots() or slot in self.standby_slots())
        serving = self.pool.slots.get(slot) is worker and slot < STANDBY_BASE   # the default cordon's
        self.rollout.gone(worker)
        self.pool.vacate(worker, respawn=wanted)
        if serving and wanted and self.rollout.may_promote(slot):
            promoted = self.pool.promote(slot)
            if promoted is not None:
                self.broker.unpark(promoted.identity)

    def handle_broker_events(self) -> None:
        """What the broker learned about workers this turn: the pool and the roll act on it."""
        events = self.broker.take_events()
        if not events:
            return
        self.next_timer = 0.0  # kills and respawns may have been scheduled
        for event, link, *detail in events:
            worker = self.pool.by_identity(link.identity)
            if worker is None:
                continue  # already reaped
            if event is Event.READY:
                self.worker_ready(worker, link)
            elif event is Event.RETIRING:
                self.pool.retiring(worker, detail[0], self.config.supervisor.graceful_timeout_s)
                self.vacate(worker)
            elif event is Event.SILENT:
                self.pool.kill(worker, detail[0], kind=detail[0].replace(" ", "_"))
                self.vacate(worker)

    def expects(self, identity: bytes, ready: dict) -> str | None:
        """The broker's question on a READY: is it a worker this daemon started? None if so,
        else why not (a protocol violation: docs/worker-protocol.md)."""
        if self.broker.cluster is not None and identity == self.broker.cluster.vouching:
            return None   # a remote host's worker: its identity was checked against its CURVE key
        worker = self.pool.by_identity(identity)
        if worker is None:
            return "no worker of this daemon has that identity"
        if ready.get("pid") != worker.pid:
            return f"pid {str(ready.get('pid'))[:20]} is not that of worker {worker.name} ({worker.pid})"
        return None

    def worker_ready(self, worker: WorkerProcess, link) -> None:
        if worker.state is WorkerState.STOPPING:
            self.broker.retire(worker.identity)  # told to leave before it could hear it
            return
        if worker.state is not WorkerState.STARTING:
            return
        self.pool.mark_ready(worker)
        if self.stopping or self.pool.slots.get(worker.slot) is not worker:
            self.release(worker, "not needed")  # scaled down or stopping meanwhile
            return
        step = self.rollout.ready(worker.slot)
        if step is not None:
            if step.old is not None:
                self.release(step.old, "replaced")
            self.roll_next()
        if not self.announced_ready and self.all_ready():
            self.announced_ready = True
            self.notifier.ready(self.status_line())
            self.log.info("daemon.ready", workers=len(self.serving_slots()),
                          startup_ms=int((time.monotonic() - self.started) * 1000))

    def all_ready(self) -> bool:
        return all((w := self.pool.slots.get(s)) is not None and w.state is WorkerState.READY
                   and w.config_generation == self.config_generation for s in self.serving_slots())

    def release(self, worker: WorkerProcess, cause: str) -> None:
        """Ask a worker to finish what it holds and leave (killed if it lingers)."""
        self.broker.retire(worker.identity)
        self.pool.stop(worker, cause, self.config.supervisor.graceful_timeout_s)

    # --- timers ------------------------------------------------------------

    def tick_broker(self, now: float) -> None:
        """Heartbeats, silent workers, expired requests: often while work waits, else twice a heartbeat."""
        self.broker.tick(now)
        self.next_tick = now + (0.01 if self.broker.busy else self.broker.heartbeat_s / 2)

    def timers(self, now: float) -> bool:
        """Run what is due, note when the next thing is; True when the daemon is done."""
        self.pool.due(now)
        if self.alarms.fire(self.broker.core, now):
            self.broker.dispatch()
        if now >= self.next_rss:
            self.next_rss = now + RSS_CHECK_S
            self.check_rss()
        if now >= self.next_status:
            self.next_status = now + STATUS_EVERY_S
            self.notifier.status(self.status_line())
            self.broker.forget_old_faults(now)
        self.notifier.watchdog(now)
        if self.stopping and self.stop_progress(now):
            return True
        times = [self.next_tick, self.next_rss, self.next_status]
        alarm_in = self.alarms.next_due()
        for when in (self.pool.next_due(), self.notifier.next_watchdog(),
                     self.stop_deadline if self.stopping else None,
                     now + alarm_in if alarm_in is not None else None):
            if when is not None:
                times.append(when)
        self.next_timer = min(times)
        return False

    def check_rss(self) -> None:
        limit = self.config.supervisor.max_rss_mib
        if not limit:
            return
        for worker, rss in self.pool.rss_over(limit * 1024 * 1024):
            cause = f"rss limit: {rss // 1048576} MiB over max_rss_mib = {limit}"
            self.broker.worker_gone(worker.identity, cause)
            self.pool.kill(worker, cause, kind="rss_limit")
            self.vacate(worker)

    # --- reload, scale, restart ------------------------------------------

    def reload(self) -> dict | None:
        """SIGHUP or `corral reload`: validate now, compile in a thread, then roll the workers.

        Compiling a large module can take seconds; the loop keeps serving,
        heartbeating and pinging the watchdog meanwhile. Returns the problems
        of a config refused at once, or None: the reload is under way, and
        control clients waiting for it are answered when it is over."""
        if self.compiling is not None:
            self.reload_again = True
            return None
        self.notifier.reloading()
        self.log.info("reload.started", config=str(self.config_path))
        try:
            config = config_module.with_defaults(config_module.load(self.config_path))
        except ConfigError as exc:
            self.reload_refused(exc)
            return {"ok": False, "problems": exc.problems}
        self.compiling = threading.Thread(target=self.compile_for_reload, args=(config,),
                                          name="reload-compile", daemon=True)
        self.compiling.start()
        return None

    def compile_for_reload(self, config: Config) -> None:
        """In the compile thread: hand the loop a (config, apps) or a ConfigError, and wake it."""
        try:
            self.reload_result = (config, self.compile(config, mode="serve"))
        except ConfigError as exc:
            self.reload_result = exc
        except Exception as exc:  # never let a reload kill the daemon
            self.reload_result = ConfigError([f"{config.path}: compiling failed: {exc}"])
        try:
            self.wakeup_write.send(b"r")
        except OSError:
            pass

    def finish_reload(self) -> None:
        result, self.reload_result, self.compiling = self.reload_result, None, None
        if self.stopping:
            return
        if isinstance(result, ConfigError):
            self.reload_refused(result)
        else:
            self.apply_config(*result)
        if self.reload_again:
            self.reload_again = False
            self.reload()

    def reload_refused(self, exc: ConfigError) -> None:
        for problem in exc.problems:
            self.log.error("reload.config_invalid", problem=problem)
        self.notifier.ready(self.status_line())
        if not self.reload_again:
            self.control.reload_over({"ok": False, "problems": exc.problems})

    def apply_config(self, config: Config, apps: list[AppSpec]) -> None:
        problem = self.rebind(config)
        if problem:
            self.reload_refused(ConfigError([f"{config.path}: {problem}"]))
            return
        for warning in config_module.warnings(config):   # what `corral check` warns about, too
            self.log.warning("config.warning", problem=warning)
            self.reload_warnings.append(warning)
        for name in ("control", "cache_dir"):
            if getattr(config.supervisor, name) != getattr(self.config.supervisor, name):
                self.log.warning("reload.needs_restart", key=f"supervisor.{name}")
                self.reload_warnings.append(f"{config.path}: [supervisor] {name}: "
                                            f"changed, but takes effect only on a restart")
        self.pool.backoff_initial_s = config.restart.backoff_initial_ms / 1000
        self.pool.backoff_max_s = config.restart.backoff_max_ms / 1000
        self.hand_run_dir_to_worker_user(config)   # a new cordon's socket, a changed user
        logs.configure(config.logging.level, config.logging.format)
        self.use_config(config, apps)
        self.broker.configure(config)
        self.frontend_watch.use(config.supervisor.max_message_kib)
        self.load_alarms(config)
        for name in list(self.slot_plan.bases):   # cordons no app names any more go to 0
            self.resize(name)
        for slot in [s for s in self.pool.slots if is_standby(s) and s not in self.standby_slots()]:
            worker = self.pool.slots.get(slot)
            self.pool.remove_slot(slot)
            for leaving in (worker, self.rollout.drop(slot)):
                if leaving is not None:
                    self.release(leaving, "standby no longer wanted")
        self.pool.fill(self.standby_slots())
        # Only now: roll_next() ends the reload (READY=1) when nothing is left to roll. A slot
        # whose worker already runs this config (just spawned by scale() or fill()) has nothing
        # to roll: queued all the same, it was replaced once its worker was ready before its turn.
        slots = self.serving_slots() + list(self.standby_slots())
        self.rollout.reload([slot for slot in slots if not self.on_current_config(self.pool.slots.get(slot))])
        self.roll_next()

    def on_current_config(self, worker: WorkerProcess | None) -> bool:
        return worker is not None and worker.config_generation == self.config_generation

    def rebind(self, config: Config) -> str | None:
        """A reload's listeners: the frontend's endpoints and the metrics endpoint. Everything
        new is bound before anything old is let go; what cannot be bound is named, with
        nothing changed."""
        if config.security.curve_secret_key != self.config.security.curve_secret_key:
            # Listeners keep the security they were bound with: never mix on a reload.
            return "[security] curve_secret_key: changed; it takes effect only on a restart"
        listen = config.metrics.listen
        moved = listen != self.config.metrics.listen
        metrics = None
        if moved and listen:
            try:
                metrics = MetricsServer(listen, self.board, self.state_stats)
            except OSError as exc:
                return f"[metrics] listen {listen}: {exc.strerror or exc}"
        try:
            self.broker.rebind_frontend(config.supervisor.frontend)
        except zmq.ZMQError as exc:
            if metrics is not None:
                metrics.close()
            return f"[supervisor] {exc}"
        if moved:
            if self.metrics is not None:
                self.metrics.close()
            self.metrics = metrics
        return None

    def standby_slots(self) -> range:
        """The default cordon's standbys; none when no app is in the default cordon."""
        if DEFAULT_CORDON not in config_module.cordons(self.config):
            return range(0)
        return range(STANDBY_BASE, STANDBY_BASE + self.config.supervisor.standby)

    def scale(self, workers: int, cordon: str = DEFAULT_CORDON) -> dict:
        """`corral scale [CORDON] N`: the default cordon's count is [supervisor] workers."""
        if cordon == DEFAULT_CORDON:
            self.config = _with_workers(self.config, workers)
        elif cordon in self.config.cordons:
            self.config = replace(self.config, cordons={**self.config.cordons,
                                                        cordon: replace(self.config.cordons[cordon], workers=workers)})
        else:
            known = ", ".join([DEFAULT_CORDON, *sorted(self.config.cordons)])
            return {"ok": False, "error": f"no cordon {cordon!r} (cordons: {known})"}
        old = self.resize(cordon)
        self.log.info("daemon.scaled", cordon=cordon, workers=workers, before=old)
        answer = {"ok": True, "workers": workers, "cordon": cordon}
        if cordon not in config_module.cordons(self.config):
            answer["warning"] = f"no app is in cordon {cordon!r}: it spawns no workers"
        return answer

    def resize(self, name: str) -> int:
        """Give a cordon the workers its config asks for (0 when no app names it any more):
        fill its new slots, let the workers of its removed ones go. Returns the count before."""
        base = self.slot_plan.bases[name]
        cordon = next((c for c in self.cordons() if c.name == name), None)
        target = cordon.workers if cordon is not None else 0
        block = range(base, STANDBY_BASE if base == 0 else base + cordons.CORDON_STRIDE)
        old = max([s - base for s in self.pool.serving_slots() if s in block] + [-1]) + 1
        scaling = self.rollout.scale(old, target, base)
        for slot in scaling.removed:
            worker = self.pool.slots.get(slot)
            self.pool.remove_slot(slot)
            if worker is not None:
                self.release(worker, "scaled down")
        if scaling.release is not None:
            self.release(scaling.release, "scaled down")
        self.pool.fill(range(base, base + target))
        self.roll_next()
        return old

    def restart_slots(self, slots: list[int]) -> dict:
        """Replace the workers of `slots` one at a time: a new one first, then the old leaves."""
        self.rollout.restart(slots)
        self.roll_next()
        return {"ok": True, "restarting": slots}

    def roll_next(self) -> None:
        slot = self.rollout.next(self.pool.slots, self.fresh)
        if slot is not None:
            self.pool.spawn(slot)
        if self.rollout.reload_over():
            self.log.info("reload.done", config_generation=self.config_generation)
            self.notifier.ready(self.status_line())
            if self.compiling is None:
                answer = {"ok": True, "config_generation": self.config_generation}
                if self.reload_warnings:
                    answer["warnings"] = self.reload_warnings
                self.control.reload_over(answer)
                self.reload_warnings = []

    def fresh(self, worker: WorkerProcess) -> bool:
        """Already starting on the current config: nothing to roll."""
        return worker.config_generation == self.config_generation and worker.state is WorkerState.STARTING

    @property
    def reloading(self) -> bool:
        return self.rollout.reloading

    # --- stop --------------------------------------------------------------

    def begin_stop(self, why: str) -> None:
        now = time.monotonic()
        if self.stopping:
            self.log.warning("daemon.stop_now", signal=why)
            self.stop_deadline = now
            return
        self.stopping = True
        self.stop_deadline = now + max(self.config.supervisor.graceful_timeout_s - STOP_WORKERS_S,
                                       self.config.supervisor.graceful_timeout_s / 2)
        self.notifier.stopping()
        self.control.reload_over({"ok": False, "error": "the daemon is stopping"})
        self.broker.drain()
        self.rollout.stop()
        self.log.info("daemon.draining", signal=why, in_flight=self.broker.open_requests)

    def stop_progress(self, now: float) -> bool:
        """Drain, then let the workers go; True once every worker is gone."""
        if not self.workers_released:
            if self.broker.open_requests and now < self.stop_deadline:
                return False
            if self.broker.open_requests:
                self.log.warning("daemon.drain_timeout", abandoned=self.broker.open_requests)
                self.broker.abandon(b"the daemon stopped before this request was served")
            self.workers_released = True
            self.stop_deadline = now + STOP_WORKERS_S
            for worker in list(self.pool.processes.values()):
                self.release(worker, "daemon stopping")
                worker.kill_at = self.stop_deadline
        if self.pool.processes and now < self.stop_deadline:
            return False
        return True

    def shutdown(self) -> None:
        self.pool.kill_all()
        deadline = time.monotonic() + 2.0
        while self.pool.processes and time.monotonic() < deadline:
            self.pool.reap()
            time.sleep(0.01)
        if self.metrics is not None:
            self.metrics.close()
        self.frontend_watch.close()
        self.broker.close()
        self.control.close()
        self.context.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.notifier.close()
        self.log.info("daemon.stopped", uptime_s=round(time.monotonic() - self.started, 3))

    # --- status ------------------------------------------------------------

    def snapshot(self, measure: bool = False, stored: bool = False) -> Snapshot:
        facts = Facts(self.started, str(self.config_path), self.config_generation,
                      "stopping" if self.stopping else "reloading" if self.reloading else "running",
                      len(self.serving_slots()))
        return take_snapshot(self.broker.core, self.pool, facts, measure=measure,
                             state_stats=self.state_stats if stored else None, alarm_counts=self.alarms.counts)

    def status_line(self) -> str:
        return self.snapshot().status_line()

    def status(self) -> dict:
        return self.snapshot(measure=True, stored=True).to_json()

    def wake(self) -> None:
        """From another thread: let the loop's poll return (a reader waits on the Board)."""
        try:
            self.wakeup_write.send(b"w")
        except (OSError, AttributeError):   # (not yet made, or closed: the reader times out)
            pass

    def state_stats(self, service: str) -> dict | None:
        """Commits, rollbacks and bytes of a service's durable state, as its database says."""
        if self.config.state.backend == "postgresql":
            from corral.workers import state_pg
            return state_pg.read_stats(self.config.state.dsn, service) or None
        return state.read_stats(self.state_path(self.config, service)) or None


def run_check(request: CheckRequest) -> list[dict]:
    """The check child's answer, one result per app; ConfigError when the child itself fails."""
    command = [os.path.abspath(sys.executable), "-P", "-m", "corral.workers.check", "--parent", str(os.getpid())]
    timeout_s = CHECK_TIMEOUT_S + CHECK_TIMEOUT_PER_APP_S * len(request.apps)
    try:
        done = subprocess.run(command, input=request.dumps(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ConfigError([f"checking the modules took more than {timeout_s} s"]) from None
    try:
        # Judged by what it wrote, not its exit status: the loop's SIGCHLD handler
        # may reap this child before subprocess does.
        answer = json.loads(done.stdout)
        if "untested" in answer:
            raise UntestedWasmtime(answer["untested"])
        if "refused" in answer:   # confinement = "require" and the child could not confine itself
            raise ConfigError([f"[supervisor] confinement = \"require\": {answer['refused']}"])
        results = answer["apps"]
        if sorted(r["name"] for r in results) != sorted(app.name for app in request.apps):
            raise ValueError("not one result per app")
    except (ValueError, KeyError, TypeError):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError([f"the module check process failed ({describe_exit(done.returncode)}): {last}"]) from None
    return results


def _with_workers(config: Config, workers: int) -> Config:
    return replace(config, supervisor=replace(config.supervisor, workers=workers))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
