"""TOML config to typed, validated settings (docs/config.md).

Every problem is collected, not just the first: `corral check` prints them
all, each naming the file, the key and what is wrong.
"""

from __future__ import annotations

import grp
import importlib.util
import json
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from corral import paths

INSTANCE_MODES = ("reuse", "per-request", "keyed")
ABORT_POLICIES = ("respawn", "reinstantiate")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
STATE_DURABILITIES = ("fsync", "os")
STATE_BACKENDS = ("sqlite", "postgresql")
RESERVED_SERVICE_PREFIX = "mmi."
# A [security] path may start with it: systemd's credentials directory (LoadCredential=), where
# a unit's dynamic user can read a secret key that only root may read on disk (docs/operating.md).
CREDENTIALS = "$CREDENTIALS_DIRECTORY"
CREDENTIALS_UNSET = "$CREDENTIALS_DIRECTORY is not set"
CONFINEMENT_MODES = ("require", "best-effort", "off")   # corral.workers.confine.MODES


class ConfigError(Exception):
    """One or more problems in a config file; `problems` lists them all.

    `partial`: the config made of every part that was read without a problem (the
    apps among them), when there is one: `corral check` still compiles and tries
    those modules, so that one run names every problem of the file."""

    def __init__(self, problems: list[str], partial: "Config | None" = None):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.partial = partial


@dataclass(frozen=True)
class SupervisorSettings:
    frontend: tuple[str, ...] = ("tcp://127.0.0.1:5555",)
    control: str = ""  # filled in from the runtime directory when empty
    workers: int = 2
    graceful_timeout_s: float = 10.0
    heartbeat_ms: int = 500
    liveness: int = 3
    max_rss_mib: int = 512  # 0: no limit
    max_queue: int = 10000
    max_message_kib: int = 16384
    max_inflight_per_client: int = 1000   # accepted and not yet answered, queued or running; more: 429
    max_client_backlog_mib: int = 64      # replies one client has not read yet; over it: dropped, 429
    # Requests a worker may hold at once (credit-based flow).
    pipeline: int = 16
    # Planned recycling (gunicorn's max_requests / max_requests_jitter); 0: off.
    max_requests: int = 0
    max_requests_jitter: int = 0
    # Pre-spawned workers that take the place of a retiring one at once.
    standby: int = 0
    cache_dir: str = ""  # compiled-module cache; default under XDG/systemd dirs
    # Worker OS limits.
    max_open_files: int = 4096
    # RLIMIT_AS of workers; 0: none. Set, it makes wasmtime reserve only the
    # memory guests use (with explicit bounds checks) so that the limit fits.
    max_address_space_mib: int = 0
    user: str = ""  # drop to this user/group when started as root
    group: str = ""
    state_dir: str = ""  # durable state (docs/state.md); default: paths.state_dir()
    # Workers' seccomp and Landlock (docs/confinement.md): "require" | "best-effort" | "off";
    # empty: "require" where the kernel offers both, else "best-effort" (with_defaults).
    confinement: str = ""


@dataclass(frozen=True)
class RestartSettings:
    intensity: int = 5
    period_s: float = 30.0
    backoff_initial_ms: int = 100
    backoff_max_ms: int = 10000


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = ""  # "host:port"; empty: no metrics endpoint


@dataclass(frozen=True)
class SecuritySettings:
    curve_secret_key: Path | None = None   # the server's NAME.key_secret; None: no CURVE
    client_keys: Path | None = None        # directory of allowed clients' NAME.key
    insecure_tcp: bool = False             # allow a non-loopback tcp frontend without CURVE

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None


@dataclass(frozen=True)
class StateSettings:
    """Where durable state lives (docs/state.md, docs/cluster.md)."""
    backend: str = "sqlite"   # one database file per service under state_dir
    dsn: str = ""             # postgresql: a libpq connection string; passwords from PGPASSFILE


@dataclass(frozen=True)
class ClusterSettings:
    """The broker's endpoint for remote worker hosts (docs/cluster.md): tcp, CURVE always."""
    listen: str
    host_keys: Path       # directory of allowed hosts' public keys, NAME.key


@dataclass(frozen=True)
class AppSettings:
    name: str
    module: Path
    instances: str = "reuse"
    timeout_ms: int = 1000
    max_memory_mib: int = 64
    on_abort: str = "respawn"
    idempotent: bool = False
    max_keys: int = 1024   # keyed: instances per worker; the least recently used one beyond goes
    state_durability: str = "fsync"   # durable state (docs/state.md): synchronous=FULL; "os": NORMAL
    max_state_mib: int = 64           # key + value bytes of one scope's live entries
    max_state_value_kib: int = 128
    max_state_key_bytes: int = 2048
    allow: tuple[str, ...] | None = None   # CURVE key names that may call it; None: any allowed key
    cordon: str = "default"   # whose workers, user, cache and state dir serve it (docs/confinement.md)


@dataclass(frozen=True)
class CordonSettings:
    """[cordons.NAME] (docs/confinement.md): apps that share workers, a user and a state
    directory with each other and with no other cordon. Unset keys are [supervisor]'s."""
    name: str
    workers: int
    user: str = ""
    group: str = ""


DEFAULT_CORDON = "default"


@dataclass(frozen=True)
class Config:
    path: Path
    supervisor: SupervisorSettings
    restart: RestartSettings
    logging: LoggingSettings
    metrics: MetricsSettings
    apps: dict[str, AppSettings] = field(default_factory=dict)
    security: SecuritySettings = SecuritySettings()
    state: StateSettings = StateSettings()
    cluster: ClusterSettings | None = None
    cordons: dict[str, CordonSettings] = field(default_factory=dict)   # as configured, without "default"


def cordons(config: Config) -> dict[str, CordonSettings]:
    """The cordons some app names, each with its settings filled in from [supervisor]
    (the default cordon's are [supervisor]'s own), the default cordon first. A cordon no
    app names is not here: it spawns no workers."""
    sup = config.supervisor
    named = {app.cordon for app in config.apps.values()}
    found = {}
    if DEFAULT_CORDON in named:
        found[DEFAULT_CORDON] = CordonSettings(DEFAULT_CORDON, sup.workers, sup.user, sup.group)
    for name in sorted(named - {DEFAULT_CORDON}):
        cordon = config.cordons.get(name) or CordonSettings(name, sup.workers)
        user = cordon.user if cordon.user or cordon.group else sup.user
        group = cordon.group if cordon.user or cordon.group else sup.group
        found[name] = CordonSettings(name, cordon.workers, user, group)
    return found


# Per key: (accepted types, check returning a problem or None).
def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _one_of(choices: tuple[str, ...]):
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}, not {v!r}"
    return check


def _between(lo: int, hi: int):
    def check(v: int) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}"
    return check


def _a_path(v: str) -> str | None:
    return "must not contain a NUL character (no file name can)" if "\0" in v else None


_INT = (int,)
_NUM = (int, float)
_STR = (str,)

_SUPERVISOR_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "frontend": ((str, list), None),
    "control": (_STR, None),
    "workers": (_INT, _between(0, 256)),   # 0 only with [cluster] (parse)
    "graceful_timeout_s": (_NUM, _positive),
    "heartbeat_ms": (_INT, _between(10, 60_000)),
    "liveness": (_INT, _between(1, 100)),
    "max_rss_mib": (_INT, _non_negative),
    "max_queue": (_INT, _positive),
    "max_message_kib": (_INT, _between(1, 1024 * 1024)),
    "max_inflight_per_client": (_INT, _between(1, 1_000_000)),
    "max_client_backlog_mib": (_INT, _between(1, 1024 * 1024)),
    "pipeline": (_INT, _between(1, 256)),
    "max_requests": (_INT, _non_negative),
    "max_requests_jitter": (_INT, _non_negative),
    "standby": (_INT, _between(0, 16)),
    "cache_dir": (_STR, _a_path),
    "max_open_files": (_INT, _between(64, 1 << 20)),
    "max_address_space_mib": (_INT, lambda v: None if v == 0 or v >= 512 else "must be 0 (no limit) or at least 512"),
    "user": (_STR, _a_path),   # a NUL in a name is refused as in a path
    "group": (_STR, _a_path),
    "state_dir": (_STR, None),
    "confinement": (_STR, _one_of(CONFINEMENT_MODES)),
}
_RESTART_KEYS = {
    "intensity": (_INT, _non_negative),
    "period_s": (_NUM, _positive),
    "backoff_initial_ms": (_INT, _positive),
    "backoff_max_ms": (_INT, _positive),
}
_LOGGING_KEYS = {
    "level": (_STR, _one_of(LOG_LEVELS)),
    "format": (_STR, _one_of(LOG_FORMATS)),
}
_METRICS_KEYS = {"listen": (_STR, None)}
_CLUSTER_KEYS = {
    "listen": (_STR, None),
    "host_keys": (_STR, _a_path),
}
_STATE_KEYS = {
    "backend": (_STR, _one_of(STATE_BACKENDS)),
    "dsn": (_STR, None),
}
_SECURITY_KEYS = {
    "curve_secret_key": (_STR, _a_path),
    "client_keys": (_STR, _a_path),
    "insecure_tcp": ((bool,), None),
}
_APP_KEYS = {
    "module": (_STR, _a_path),
    "instances": (_STR, _one_of(INSTANCE_MODES)),
    "timeout_ms": (_INT, _between(1, 24 * 3600 * 1000)),
    "max_memory_mib": (_INT, _between(1, 4096)),
    "on_abort": (_STR, _one_of(ABORT_POLICIES)),
    "idempotent": ((bool,), None),
    "max_keys": (_INT, _non_negative),
    "state_durability": (_STR, _one_of(STATE_DURABILITIES)),
    "max_state_mib": (_INT, _between(1, 1024 * 1024)),
    "max_state_value_kib": (_INT, _between(0, 1024 * 1024)),
    "max_state_key_bytes": (_INT, _between(1, 65535)),
    "allow": ((list,), None),
    "cordon": (_STR, None),
}
_CORDON_KEYS = {
    "workers": (_INT, _between(1, 256)),
    "user": (_STR, _a_path),
    "group": (_STR, _a_path),
}
# Short: a cordon's name is part of its socket's and state directory's paths.
_CORDON_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,31}$")

_TCP_ENDPOINT = re.compile(r"^tcp://(\*|[A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d+)$")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_LISTEN = re.compile(r"^(?:([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):|:)?(\d+)$")  # no host: loopback


def endpoint_problem(endpoint: str) -> str | None:
    """Why `endpoint` is not a well-formed tcp:// or ipc:// endpoint, or None.

    An ipc:// directory need not exist yet: systemd creates RuntimeDirectory
    when the service starts; `corral run` names it if binding fails."""
    if endpoint.startswith("ipc://"):
        where = endpoint[len("ipc://"):]
        if not where or where == "@":
            return "ipc:// endpoint has no path"
        if len(where.encode()) > 107:
            return "ipc:// path is longer than a unix socket allows (107 bytes)"
        return None
    match = _TCP_ENDPOINT.match(endpoint)
    if match:
        port = int(match.group(2))
        return None if 0 < port < 65536 else f"port {port} out of range"
    return f"{endpoint!r} is not a tcp://HOST:PORT or ipc://PATH endpoint"


class _Reader:
    """Reads one table of the TOML document, collecting problems."""

    def __init__(self, file: Path, problems: list[str]):
        self.file = file
        self.problems = problems

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.file}: {where}: {message}")

    def table(self, doc: dict, name: str) -> dict:
        value = doc.get(name, {})
        if not isinstance(value, dict):
            self.problem(f"[{name}]", "must be a table")
            return {}
        return value

    def read(self, section: str, table: dict, spec: dict) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, value in table.items():
            where = f"[{section}] {key}"
            if key not in spec:
                known = ", ".join(sorted(spec))
                self.problem(where, f"unknown key (known keys: {known})")
                continue
            types, check = spec[key]
            # bool is an int in Python; a TOML `true` is never a number here.
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                wanted = " or ".join(_type_name(t) for t in types)
                self.problem(where, f"must be {wanted}, not {_type_name(type(value))} {value!r}")
                continue
            if check is not None:
                message = check(value)
                if message:
                    self.problem(where, message)
                    continue
            values[key] = value
        return values


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
            list: "a list", dict: "a table"}.get(t, t.__name__)


def load(path: str | os.PathLike[str]) -> Config:
    """Load and validate a config file; raise ConfigError listing every problem."""
    file = Path(path).absolute()
    try:
        with open(file, "rb") as stream:
            doc = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None
    return parse(doc, file)


def parse(doc: dict[str, Any], file: Path) -> Config:
    problems: list[str] = []
    reader = _Reader(file, problems)
    known_tables = ("supervisor", "restart", "logging", "metrics", "security", "state", "cluster", "apps",
                    "cordons")
    for name in doc:
        if name not in known_tables:
            reader.problem(f"[{name}]", f"unknown section (known: {', '.join(known_tables)})")

    sup = reader.read("supervisor", reader.table(doc, "supervisor"), _SUPERVISOR_KEYS)
    frontend = sup.pop("frontend", None)
    if frontend is not None:
        endpoints = (frontend,) if isinstance(frontend, str) else tuple(frontend)
        if not endpoints:
            reader.problem("[supervisor] frontend", "needs at least one endpoint")
        for endpoint in endpoints:
            if not isinstance(endpoint, str):
                reader.problem("[supervisor] frontend", f"{endpoint!r} is not a string")
            elif message := endpoint_problem(endpoint):
                reader.problem("[supervisor] frontend", message)
        sup["frontend"] = endpoints
    if "control" in sup and (message := endpoint_problem(sup["control"])):
        reader.problem("[supervisor] control", message)
    elif sup.get("control", "").startswith("tcp://"):
        # Its verbs (scale, restart, reload) are the daemon's owner's: only a file can say who.
        reader.problem("[supervisor] control", "must be an ipc:// endpoint: the control socket is "
                       "owner-only (0600), and a tcp endpoint has no owner")
    _check_ids(reader, "supervisor", sup)
    supervisor = SupervisorSettings(**sup)

    restart = RestartSettings(**reader.read("restart", reader.table(doc, "restart"), _RESTART_KEYS))
    if restart.backoff_initial_ms > restart.backoff_max_ms:
        reader.problem("[restart] backoff_initial_ms", "must not exceed backoff_max_ms")
    logging = LoggingSettings(**reader.read("logging", reader.table(doc, "logging"), _LOGGING_KEYS))
    metrics = MetricsSettings(**reader.read("metrics", reader.table(doc, "metrics"), _METRICS_KEYS))
    if metrics.listen and not _LISTEN.match(metrics.listen):
        reader.problem("[metrics] listen", f"{metrics.listen!r} is not HOST:PORT (or PORT: on loopback)")
    security = _read_security(reader, file, reader.table(doc, "security"))
    _check_exposure(reader, supervisor.frontend, security)
    state = _read_state(reader, reader.table(doc, "state"))
    cluster = _read_cluster(reader, file, doc["cluster"], security) if "cluster" in doc else None
    if supervisor.workers == 0 and cluster is None and "cluster" not in doc:
        reader.problem("[supervisor] workers", "must be between 1 and 256 (0 only with [cluster]: a broker "
                       "whose remote hosts serve, docs/cluster.md)")

    apps: dict[str, AppSettings] = {}
    for name, table in reader.table(doc, "apps").items():
        app = _read_app(reader, file, name, table)
        if app is not None:
            if app.allow is not None and not security.curve:
                reader.problem(f"[apps.{name}] allow", "needs [security] curve_secret_key: without CURVE "
                               "clients have no key names")
            apps[name] = app
    if not apps and not problems:
        reader.problem("[apps]", "no apps configured: nothing to serve")
    cordon_settings = _read_cordons(reader, reader.table(doc, "cordons"), supervisor)
    for app in apps.values():
        if app.cordon != DEFAULT_CORDON and app.cordon not in cordon_settings:
            known = ", ".join(repr(n) for n in [DEFAULT_CORDON, *sorted(cordon_settings)])
            reader.problem(f"[apps.{app.name}] cordon", f"no cordon {app.cordon!r}: add a [cordons.{app.cordon}] "
                           f"table (known: {known})")

    config = Config(path=file, supervisor=supervisor, restart=restart, logging=logging,
                    metrics=metrics, apps=apps, security=security, state=state, cluster=cluster,
                    cordons=cordon_settings)
    if problems:
        raise ConfigError(problems, partial=config)
    return config


def _read_cordons(reader: _Reader, tables: dict, sup: SupervisorSettings) -> dict[str, CordonSettings]:
    """[cordons.NAME] tables: workers, user, group ([supervisor]'s where unset; a user
    without a group: that user's own group). The default cordon is [supervisor]'s."""
    found = {}
    for name, table in tables.items():
        section = f"cordons.{name}"
        if name == DEFAULT_CORDON:
            reader.problem(f"[{section}]", "the default cordon is set in [supervisor] (workers, user, group)")
            continue
        if not _CORDON_NAME.match(name):
            reader.problem(f"[{section}]", "cordon names are 1-32 lower-case letters, digits, '_' and '-', "
                           "starting with a letter or digit")
            continue
        if not isinstance(table, dict):
            reader.problem(f"[{section}]", "must be a table")
            continue
        values = reader.read(section, table, _CORDON_KEYS)
        _check_ids(reader, section, values)
        found[name] = CordonSettings(name, values.get("workers", sup.workers), values.get("user", ""),
                                     values.get("group", ""))
    return found


def _check_ids(reader: _Reader, section: str, values: dict) -> None:
    for name, lookup in (("user", pwd.getpwnam), ("group", grp.getgrnam)):
        value = values.get(name, "")
        if value and not value.isdigit():
            try:
                lookup(value)
            except KeyError:
                reader.problem(f"[{section}] {name}", f"no such {name}: {value!r}")


# A password in a DSN: key/value form (password=..., any spacing) or URI form (://user:secret@).
_DSN_PASSWORD = re.compile(r"(?:^|\s)password\s*=|^postgres(?:ql)?://[^/@]*:[^/@]*@", re.IGNORECASE)


def _read_cluster(reader: _Reader, file: Path, table: Any, security: SecuritySettings) -> ClusterSettings | None:
    if not isinstance(table, dict):
        reader.problem("[cluster]", "must be a table")
        return None
    values = reader.read("cluster", table, _CLUSTER_KEYS)
    for key in ("listen", "host_keys"):
        if key not in values and key not in table:
            reader.problem(f"[cluster] {key}", "missing")
    if "listen" not in values or "host_keys" not in values:
        return None
    listen = values["listen"]
    if not _TCP_ENDPOINT.match(listen) or endpoint_problem(listen):
        reader.problem("[cluster] listen", f"{listen!r} is not a tcp://HOST:PORT endpoint (hosts are other "
                       "machines; there is no ipc cluster endpoint)")
    if not security.curve:
        reader.problem("[cluster] listen", "needs [security] curve_secret_key: the cluster endpoint is CURVE "
                       "always (the broker's key pair; hosts authenticate with theirs)")
    host_keys = (file.parent / values["host_keys"]).resolve()
    if not host_keys.is_dir():
        reader.problem("[cluster] host_keys", f"{host_keys} is not a directory (of hosts' NAME.key files)")
    return ClusterSettings(listen, host_keys)


def _read_state(reader: _Reader, table: dict) -> StateSettings:
    values = reader.read("state", table, _STATE_KEYS)
    settings = StateSettings(**values)
    if settings.backend == "postgresql" and not settings.dsn.strip():
        reader.problem("[state] dsn", 'missing: backend = "postgresql" needs a libpq connection string, '
                       'e.g. "host=db.internal dbname=corral user=corral"')
    elif settings.backend == "sqlite" and "dsn" in values:
        reader.problem("[state] dsn", 'only with backend = "postgresql" (sqlite keeps its files in '
                       '[supervisor] state_dir)')
    if settings.backend == "postgresql" and importlib.util.find_spec("psycopg") is None:
        reader.problem("[state] backend", '"postgresql" needs its driver, psycopg 3: '
                       "pip install 'corral[postgresql]'")
    if _DSN_PASSWORD.search(settings.dsn):
        reader.problem("[state] dsn", "must not hold a password (config files are read by many): put it "
                       "in a PGPASSFILE (libpq's password file) for the user corral runs as")
    return settings


def _read_security(reader: _Reader, file: Path, table: dict) -> SecuritySettings:
    values = reader.read("security", table, _SECURITY_KEYS)
    unset = False
    for name in ("curve_secret_key", "client_keys"):
        if name in values:
            values[name] = _security_path(file, values[name])
            if str(values[name]).startswith(CREDENTIALS):
                unset = True
                reader.problem(f"[security] {name}", f"{values[name]}: {CREDENTIALS_UNSET}; systemd sets it in a "
                               "unit with LoadCredential= (docs/operating.md). To check this file by hand, set it "
                               "to the folder that holds the key: CREDENTIALS_DIRECTORY=/etc/corral/keys corral check")
    secret, clients = values.get("curve_secret_key"), values.get("client_keys")
    if (secret is None) != (clients is None):
        have, missing = ("curve_secret_key", "client_keys") if clients is None else ("client_keys", "curve_secret_key")
        if have in values:
            reader.problem(f"[security] {missing}", f"missing: {have} needs it (CURVE takes both)")
        return SecuritySettings(insecure_tcp=values.get("insecure_tcp", False))
    if secret is not None:
        import zmq
        from corral.security import server_keys
        if not zmq.has("curve"):
            reader.problem("[security] curve_secret_key", f"this libzmq ({zmq.zmq_version()}) has no CURVE "
                           "support (zmq.has('curve') is false): corral will not serve without it")
        try:
            if not unset:
                server_keys(secret)
        except ValueError as exc:
            reader.problem("[security] curve_secret_key", f"{secret}: {exc}")
        if not clients.is_dir() and not unset:
            reader.problem("[security] client_keys", f"{clients} is not a directory")
    return SecuritySettings(**values)


def _security_path(file: Path, value: str) -> Path:
    """Relative to the config file; or in $CREDENTIALS_DIRECTORY (left as written when it is not set)."""
    for spelling in (CREDENTIALS, "${CREDENTIALS_DIRECTORY}"):
        if value.startswith(spelling + "/"):
            where = os.environ.get("CREDENTIALS_DIRECTORY")
            rest = value[len(spelling) + 1:]
            return Path(where) / rest if where else Path(CREDENTIALS) / rest
    return (file.parent / value).resolve()


def _check_exposure(reader: _Reader, frontends: tuple[str, ...], security: SecuritySettings) -> None:
    """A tcp frontend others can reach is encrypted and authenticated, or explicitly not."""
    from corral.security import frontend_exposure
    if security.curve or security.insecure_tcp:
        return
    for endpoint in frontends:
        if isinstance(endpoint, str) and frontend_exposure(endpoint) == "network":
            reader.problem("[supervisor] frontend", f"{endpoint} is not a loopback address, and without "
                           "[security] curve_secret_key its clients would be unauthenticated and in clear "
                           "text: set curve_secret_key and client_keys, or insecure_tcp = true")


def warnings(config: Config) -> list[str]:
    """What is allowed but worth a word from `corral check` and at start-up."""
    from corral.security import frontend_exposure, is_loopback
    found = []
    listen = config.metrics.listen
    if listen and not is_loopback(metrics_address(listen)[0]):
        found.append(f"{config.path}: [metrics] listen: {listen} is not a loopback address: anyone who can "
                     f"reach it reads the service names and counts")
    if config.security.curve and config.security.client_keys.is_dir():
        known = {path.stem for path in config.security.client_keys.glob("*.key")}
        for app in config.apps.values():
            for name in sorted(set(app.allow or ()) - known):
                found.append(f"{config.path}: [apps.{app.name}] allow: no key {name!r} in "
                             f"{config.security.client_keys} (no client can use that name yet)")
    if config.security.insecure_tcp:
        for endpoint in config.supervisor.frontend:
            if frontend_exposure(endpoint) == "network" and not config.security.curve:
                found.append(f"{config.path}: [supervisor] frontend: {endpoint} serves without CURVE "
                             f"(insecure_tcp = true)")
    return found


def metrics_address(listen: str) -> tuple[str, int]:
    """[metrics] listen as (host, port); no host is loopback."""
    match = _LISTEN.match(listen)
    return (match.group(1) or "127.0.0.1").strip("[]"), int(match.group(2))


def _read_app(reader: _Reader, file: Path, name: str, table: Any) -> AppSettings | None:
    section = f"apps.{name}"
    if not isinstance(table, dict):
        reader.problem(f"[{section}]", "must be a table")
        return None
    if not _SERVICE_NAME.match(name) or name.startswith(RESERVED_SERVICE_PREFIX):
        reader.problem(f"[{section}]", "service names are 1-128 letters, digits, '_', '.', '-'"
                       f" and must not start with {RESERVED_SERVICE_PREFIX!r}")
        return None
    values = reader.read(section, table, _APP_KEYS)
    if "module" not in values:
        if "module" not in table:
            reader.problem(f"[{section}] module", "missing (path of a .wasm or .wat file)")
        return None
    module = (file.parent / values.pop("module")).resolve()
    if module.suffix not in (".wasm", ".wat"):
        reader.problem(f"[{section}] module", f"{str(module)!r} is not a .wasm or .wat file")
        return None
    if not module.is_file():
        reader.problem(f"[{section}] module", f"file {str(module)!r} does not exist")
        return None
    if "allow" in values:
        names = values.pop("allow")
        if not all(isinstance(n, str) and n for n in names):
            reader.problem(f"[{section}] allow", "must be a list of key names (strings)")
        else:
            values["allow"] = tuple(names)
    if "on_abort" not in values and values.get("instances") == "keyed":
        # Respawning a process would wipe every other key's state it holds.
        values["on_abort"] = "reinstantiate"
    return AppSettings(name=name, module=module, **values)


def with_defaults(config: Config) -> Config:
    """Fill in the defaults that depend on the environment."""
    sup = config.supervisor
    if not sup.confinement:
        from corral.workers.confine import default_mode
        sup = replace(sup, confinement=default_mode())
    if not sup.control:
        sup = replace(sup, control=paths.default_control_endpoint(config.path))
    return replace(config, supervisor=sup)


def to_toml(doc: dict[str, Any]) -> str:
    """Write a config document (tables of scalars and lists, and [apps.NAME]
    tables) as TOML: for tests, benchmarks and tools that generate configs."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(item) for item in v) + "]"
        return json.dumps(str(v))
    lines = []
    for section, table in doc.items():
        if section in ("apps", "cordons"):
            for name, app in table.items():
                lines.append(f"[{section}.{json.dumps(name) if '.' in name else name}]")
                lines += [f"{k} = {value(v)}" for k, v in app.items()]
        elif table:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
