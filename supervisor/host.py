"""`corral host [-c FILE]`: a worker host (docs/cluster.md).

    start:  read [host]; ask the broker (tcp+CURVE, the cluster endpoint) for the spec and
            each module by content hash; compile them in the checked child
            (corral.workers.check) into this host's cache; spawn the workers
    loop:   signals (SIGCHLD reaps and respawns; SIGTERM/SIGINT drain) -> the broker's
            answers (which of our workers joined: READY=1 once all have) -> timers (the
            pool's kills and respawns, rss limits, asking who joined)
    stop:   ask the broker to retire our workers (they finish, reply and leave), wait
            graceful_timeout_s at most, kill what is left, exit 0

The workers are the daemon's (`python -m corral.workers`), spawned, limited, reaped and
respawned by the same Pool (corral.pool); they confine themselves as local ones do and
connect to the broker over tcp with CURVE (the host's key pair: its name is the host's
name). The host keeps one DEALER of its own to the broker for its requests
(corral.cluster). A host holds no copy of the apps: modules live in its cache under
their sha256, and the compiled code beside them, keyed by that content too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections import deque
from dataclasses import dataclass, fields, replace
from pathlib import Path

import zmq

from corral import paths
from corral.cluster import CONTROL_SUFFIX, H_JOINED, H_LEAVE, H_MODULE, H_SPEC
from corral.config import CONFINEMENT_MODES, LOG_FORMATS, LOG_LEVELS, ConfigError
from corral.notify import Notifier
from corral.pool import Pool, WorkerState
from corral.wire import logs
from corral.wire.exits import EX_CONFIG, EX_SOFTWARE
from corral.workers.spec import AppSpec, CheckRequest, WorkerSpec

ASK_EVERY_S = 1.0        # the spec and modules: asked again until the broker answers
JOINED_EVERY_S = 0.25    # who of ours has joined: asked this often
RSS_CHECK_S = 1.0
CHECK_TIMEOUT_S = 300


@dataclass(frozen=True)
class HostSettings:
    """[host] (docs/cluster.md), and the host's [state] dsn and [logging]."""
    path: Path
    broker: str                       # the broker's cluster endpoint, tcp://HOST:PORT
    broker_key: Path                  # the broker's public certificate
    secret_key: Path                  # this host's NAME.key_secret: NAME is the host's name
    workers: int = 2
    max_rss_mib: int = 512
    user: str = ""
    group: str = ""
    confinement: str = ""             # "" -> as the daemon's default
    cache_dir: str = ""
    graceful_timeout_s: float = 10.0
    max_open_files: int = 4096
    max_address_space_mib: int = 0
    max_requests: int = 0
    dsn: str = ""                     # [state] dsn: how this host reaches the broker's database
    log_level: str = "info"
    log_format: str = "json"

    @property
    def name(self) -> str:
        return self.secret_key.name.removesuffix(".key_secret")


_HOST_KEYS = {
    "broker": str, "broker_key": str, "secret_key": str, "workers": int, "max_rss_mib": int, "user": str,
    "group": str, "confinement": str, "cache_dir": str, "graceful_timeout_s": (int, float),
    "max_open_files": int, "max_address_space_mib": int, "max_requests": int,
}


def load(path: Path) -> HostSettings:
    """A host config file; ConfigError lists every problem."""
    file = path.absolute()
    try:
        doc = tomllib.loads(file.read_text())
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None
    problems: list[str] = []
    for name in doc:
        if name not in ("host", "state", "logging"):
            problems.append(f"{file}: [{name}]: unknown section for a host (known: host, state, logging)")
    table = doc.get("host")
    if not isinstance(table, dict):
        raise ConfigError(problems + [f"{file}: [host]: missing (broker, broker_key, secret_key)"])
    values = {}
    for key, value in table.items():
        kind = _HOST_KEYS.get(key)
        if kind is None:
            problems.append(f"{file}: [host] {key}: unknown key (known: {', '.join(_HOST_KEYS)})")
        elif isinstance(value, bool) or not isinstance(value, kind):
            problems.append(f"{file}: [host] {key}: {value!r} has the wrong type")
        else:
            values[key] = value
    for key in ("broker", "broker_key", "secret_key"):
        if key not in table:
            problems.append(f"{file}: [host] {key}: missing")
    broker = values.get("broker", "")
    if broker and not broker.startswith("tcp://"):
        problems.append(f"{file}: [host] broker: {broker!r} is not a tcp://HOST:PORT endpoint (the broker's "
                        "[cluster] listen)")
    for key in ("broker_key", "secret_key"):
        if key in values:
            # systemd's LoadCredential= (systemd/corral-host.service): $CREDENTIALS_DIRECTORY/NAME.key_secret
            values[key] = (file.parent / os.path.expandvars(values[key])).resolve()
            if not values[key].is_file():
                problems.append(f"{file}: [host] {key}: {values[key]}: no such file")
    if "secret_key" in values and not values["secret_key"].name.endswith(".key_secret"):
        problems.append(f"{file}: [host] secret_key: name the NAME.key_secret file (corral keygen NAME)")
    if not 1 <= values.get("workers", 2) <= 256:
        problems.append(f"{file}: [host] workers: must be between 1 and 256")
    if values.get("confinement", "") not in ("",) + CONFINEMENT_MODES:
        problems.append(f"{file}: [host] confinement: must be one of {', '.join(CONFINEMENT_MODES)}")
    state = doc.get("state", {})
    if not isinstance(state, dict) or set(state) - {"dsn"}:
        problems.append(f"{file}: [state]: a host may set only dsn (the rest is the broker's)")
    logging = doc.get("logging", {})
    level, fmt = logging.get("level", "info"), logging.get("format", "json")
    if level not in LOG_LEVELS or fmt not in LOG_FORMATS or set(logging) - {"level", "format"}:
        problems.append(f"{file}: [logging]: level one of {LOG_LEVELS}, format one of {LOG_FORMATS}")
    if problems:
        raise ConfigError(problems)
    settings = HostSettings(file, dsn=str(state.get("dsn", "")) if isinstance(state, dict) else "",
                            log_level=level, log_format=fmt, **values)
    if not settings.confinement:
        from corral.workers.confine import default_mode
        settings = replace(settings, confinement=default_mode())
    return settings


class Host:
    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.log = logs.get(component="host")
        self.notifier = Notifier()
        self.signals: deque[int] = deque()
        self.started = time.monotonic()
        self.stopping = False
        self.stop_deadline = 0.0
        self.announced_ready = False
        self.run_id = os.urandom(4).hex()   # a restarted host joins with new identities
        self.next_joined = 0.0
        self.next_rss = 0.0

    # --- start -------------------------------------------------------------

    def run(self) -> int:
        try:
            settings = load(self.config_path)
        except ConfigError as exc:
            logs.configure()
            for problem in exc.problems:
                self.log.error("config.invalid", problem=problem)
            return EX_CONFIG
        logs.configure(settings.log_level, settings.log_format)
        self.settings = settings
        self.name = settings.name
        self.prefix = f"{self.name}:{self.run_id}/"
        self.log = logs.get(component="host", host=self.name)
        import zmq.auth
        try:
            broker_public, _ = zmq.auth.load_certificate(settings.broker_key)
            self.public, self.secret = zmq.auth.load_certificate(settings.secret_key)
            if not self.secret:
                raise ValueError(f"{settings.secret_key} has no secret key")
        except (OSError, ValueError) as exc:
            self.log.error("config.invalid", problem=f"{settings.path}: [host] keys: {exc}")
            return EX_CONFIG
        self.cache_dir = paths.private_dir(paths.cache_dir(settings.cache_dir))
        (self.cache_dir / "modules").mkdir(exist_ok=True)
        self.run_dir = paths.private_dir(paths.runtime_dir() / f"host-{os.getpid()}")
        self.context = zmq.Context()
        self.ctl = self.context.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.ROUTING_ID, self.prefix.encode()[:-1] + CONTROL_SUFFIX)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.CURVE_SERVERKEY, broker_public)
        self.ctl.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        self.ctl.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        self.ctl.connect(settings.broker)
        self.broker_public = broker_public
        self.install_signals()
        self.log.info("host.started", pid=os.getpid(), broker=settings.broker, workers=settings.workers,
                      run=self.run_id)
        try:
            code = self.join()
            if code is None:
                self.pool.fill(range(settings.workers))
                code = self.loop()
        finally:
            self.shutdown()
        return code

    def join(self) -> int | None:
        """The spec and the modules from the broker, compiled here: None when the pool can start."""
        answer = self.ask(H_SPEC, H_SPEC)
        if answer is None:
            return 0   # stopped while waiting for the broker
        shipped = json.loads(answer)
        apps = []
        for app in shipped.pop("apps"):
            digest, suffix = app["module"][:64], app["module"][64:]
            path = self.cache_dir / "modules" / (digest + suffix)
            if not path.exists():
                data = self.ask(H_MODULE + digest.encode(), H_MODULE)
                if data is None:
                    return 0
                if data[:64].decode() != digest or hashlib.sha256(data[64:]).hexdigest() != digest:
                    self.log.error("host.module_refused", app=app["name"], sha256=digest,
                                   detail="the bytes sent do not have the hash asked for")
                    return EX_SOFTWARE
                partial = path.with_suffix(path.suffix + ".part")
                partial.write_bytes(data[64:])
                partial.replace(path)
            apps.append(AppSpec(**{**app, "module": str(path)}))
        self.log.info("host.modules", apps=[a.name for a in apps])
        compiled = self.compile(apps)
        if compiled is None:
            return EX_CONFIG
        s = self.settings
        known = {f.name for f in fields(WorkerSpec)}
        spec = WorkerSpec(**{**{k: v for k, v in shipped.items() if k in known},
                             "backend": s.broker, "cache_dir": str(self.cache_dir), "state_dir": "",
                             "user": s.user, "group": s.group, "confinement": s.confinement,
                             "max_open_files": s.max_open_files, "max_address_space_mib": s.max_address_space_mib,
                             "state_dsn": s.dsn or shipped.get("state_dsn", ""), "apps": compiled,
                             "host": self.name, "identity_prefix": self.prefix,
                             "curve_server_key": self.broker_public.decode(),
                             "curve_public_key": self.public.decode(), "curve_secret_key": self.secret.decode()})
        spec_path = self.run_dir / f"spec-{spec.config_generation}.json"
        spec_path.touch(mode=0o600)
        spec.dump(spec_path)
        self.spec = spec
        self.pool = Pool(self.log, 0.1, 10.0)
        self.pool.use_spec(spec_path, spec.config_generation, s.max_requests, 0)
        return None

    def ask(self, request: bytes, command: bytes) -> bytes | None:
        """Send `request` to the broker until it answers (its payload) or we are told to stop (None)."""
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        poller.register(self.wakeup_read.fileno(), zmq.POLLIN)
        waited = 0
        while True:
            if self.ctl.poll(0, zmq.POLLOUT):   # (not yet connected: the next round)
                self.ctl.send(request, zmq.NOBLOCK)
            give_up = time.monotonic() + ASK_EVERY_S
            while time.monotonic() < give_up:
                for item, _ in poller.poll(100):
                    if item is self.ctl:
                        answer = self.ctl.recv()
                        if answer[:1] == command:
                            return answer[1:]
                    else:
                        self.drain_wakeup()
                if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals):
                    self.log.info("host.stopped_before_joining")
                    return None
            waited += 1
            if waited in (3, 10) or waited % 60 == 0:
                self.log.warning("host.broker_silent", broker=self.settings.broker, waited_s=waited,
                                 detail="no answer yet: is the broker up, and this host's key in its host_keys?")

    def compile(self, apps: list[AppSpec]) -> list[AppSpec] | None:
        """The modules compiled (or found compiled) in the checked child, as a worker's limits
        and confinement have it: the apps with their artifacts, or None (logged)."""
        s = self.settings
        request = CheckRequest(str(self.cache_dir), s.max_open_files, s.max_address_space_mib, s.user, s.group,
                               apps, confinement=s.confinement)
        command = [os.path.abspath(sys.executable), "-P", "-m", "corral.workers.check", "--parent", str(os.getpid())]
        try:
            done = subprocess.run(command, input=request.dumps(), capture_output=True, text=True,
                                  timeout=CHECK_TIMEOUT_S)
            results = json.loads(done.stdout)["apps"]
        except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
            self.log.error("host.check_failed", detail=(done.stderr.strip().splitlines() or ["?"])[-1]
                           if "done" in locals() else "timed out")
            return None
        problems = [f"{r['name']}: {r['problem']}" for r in results if "problem" in r]
        if problems:
            self.log.error("host.modules_refused", problems=problems)
            return None
        artifacts = {r["name"]: r["artifact"] for r in results}
        return [replace(app, artifact=artifacts[app.name]) for app in apps]

    def install_signals(self) -> None:
        self.wakeup_read, wakeup_write = socket.socketpair()
        self.wakeup_read.setblocking(False)
        wakeup_write.setblocking(False)
        self.wakeup_write = wakeup_write
        signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, lambda signum, frame: self.signals.append(signum))

    def drain_wakeup(self) -> None:
        try:
            while self.wakeup_read.recv(512):
                pass
        except BlockingIOError:
            pass

    # --- the loop ----------------------------------------------------------

    def loop(self) -> int:
        """One turn: wait for the broker or a signal -> signals -> answers -> timers."""
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        poller.register(self.wakeup_read.fileno(), zmq.POLLIN)
        while True:
            for item, _ in poller.poll(100):
                if item is self.ctl:
                    self.on_broker()
                else:
                    self.drain_wakeup()
            while self.signals:
                self.handle_signal(self.signals.popleft())
            if self.timers(time.monotonic()):
                return 0

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.begin_stop(signal.Signals(signum).name)

    def reap(self) -> None:
        for worker, returncode in self.pool.reap():
            self.pool.vacate(worker, respawn=not self.stopping)

    def on_broker(self) -> None:
        """The broker's answers: which of our workers it has linked."""
        while self.ctl.poll(0):
            answer = self.ctl.recv()
            if answer[:1] != H_JOINED:
                continue
            joined = set(json.loads(answer[1:])["workers"])
            for worker in list(self.pool.processes.values()):
                if worker.state is WorkerState.STARTING and self.prefix + worker.name in joined:
                    self.pool.mark_ready(worker)
            if not self.announced_ready and self.pool.all_ready(self.settings.workers):
                self.announced_ready = True
                self.notifier.ready(f"{self.settings.workers} workers joined {self.settings.broker}")
                self.log.info("host.ready", workers=self.settings.workers,
                              startup_ms=int((time.monotonic() - self.started) * 1000))

    def timers(self, now: float) -> bool:
        """The pool's kills and respawns, rss limits, asking who joined; True when done."""
        self.pool.due(now)
        if now >= self.next_joined and not self.stopping:
            self.next_joined = now + JOINED_EVERY_S
            if self.ctl.poll(0, zmq.POLLOUT):
                self.ctl.send(H_JOINED, zmq.NOBLOCK)
        if now >= self.next_rss:
            self.next_rss = now + RSS_CHECK_S
            self.check_rss()
        if self.stopping:
            if not self.pool.processes:
                return True
            if now >= self.stop_deadline:
                self.pool.kill_all()
                self.stop_deadline = now + 2.0   # reaped by the next turns
        return False

    def check_rss(self) -> None:
        limit = self.settings.max_rss_mib
        if limit:
            for worker, rss in self.pool.rss_over(limit * 1024 * 1024):
                # The broker learns it as any worker death: its heartbeats stop.
                self.pool.kill(worker, f"rss limit: {rss // 1048576} MiB over max_rss_mib = {limit}", "rss_limit")

    # --- stop --------------------------------------------------------------

    def begin_stop(self, why: str) -> None:
        """Drain: the broker retires our workers (each finishes what it holds and leaves)."""
        if self.stopping:
            self.log.warning("host.stop_now", signal=why)
            self.stop_deadline = time.monotonic()
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.graceful_timeout_s
        self.notifier.stopping()
        if self.ctl.poll(0, zmq.POLLOUT):
            self.ctl.send(H_LEAVE, zmq.NOBLOCK)
        for worker in list(self.pool.processes.values()):
            self.pool.stop(worker, "host stopping", self.settings.graceful_timeout_s)
        self.log.info("host.draining", signal=why, workers=len(self.pool.processes))

    def shutdown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.kill_all()
            deadline = time.monotonic() + 2.0
            while pool.processes and time.monotonic() < deadline:
                pool.reap()
                time.sleep(0.01)
        self.ctl.close(linger=0)
        self.context.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.notifier.close()
        self.log.info("host.stopped", uptime_s=round(time.monotonic() - self.started, 3))

