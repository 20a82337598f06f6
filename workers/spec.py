"""What a worker is told at start: written by the supervisor, read by `python -m corral.workers`;
and what the check child (`python -m corral.workers.check`) is asked.

One spec file per config generation; slot and generation come on the
command line, so every worker of a generation shares the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AppSpec:
    name: str
    module: str       # source path (.wat or .wasm)
    artifact: str     # the compiled module in the cache
    instances: str    # "reuse" | "per-request" | "keyed"
    timeout_ms: int
    max_memory_mib: int
    on_abort: str     # "respawn" | "reinstantiate"
    state_durability: str = "fsync"   # durable state (docs/state.md): "fsync" | "os"
    max_state_mib: int = 64
    max_state_value_kib: int = 128
    max_state_key_bytes: int = 2048


@dataclass(frozen=True)
class WorkerSpec:
    backend: str
    config_generation: int
    heartbeat_ms: int
    capacity: int
    restart_intensity: int
    restart_period_s: float
    log_level: str
    log_format: str
    cache_dir: str
    max_open_files: int
    max_address_space_mib: int = 0
    user: str = ""
    group: str = ""
    state_dir: str = ""   # one SQLite database per service that uses durable state
    state_backend: str = "sqlite"   # or "postgresql" (docs/cluster.md): one database for all
    state_dsn: str = ""             # postgresql: libpq connection string
    run_id: str = ""      # the broker's run: its tokens and its fences are named by it
    apps: list[AppSpec] = field(default_factory=list)
    confinement: str = "off"   # "require" | "best-effort" | "off" (docs/confinement.md)
    cordon: str = "default"    # its apps' cordon: cache_dir and state_dir are that cordon's
    # A remote host's worker (docs/cluster.md): its host's name, the prefix of its routing id
    # ("NAME:RUN/"), and CURVE (z85): the broker's public key, the host's pair.
    host: str = ""
    identity_prefix: str = ""
    curve_server_key: str = ""
    curve_public_key: str = ""
    curve_secret_key: str = ""

    def dump(self, path: Path) -> None:
        # Read by the worker before it drops to its user: no other user needs it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "WorkerSpec":
        values = json.loads(path.read_text())
        values["apps"] = [AppSpec(**app) for app in values["apps"]]
        return cls(**values)


@dataclass(frozen=True)
class CheckRequest:
    cache_dir: str
    max_open_files: int
    max_address_space_mib: int = 0
    user: str = ""
    group: str = ""
    apps: list[AppSpec] = field(default_factory=list)  # their artifact: "" (the check finds it)
    confinement: str = "off"   # the check child confines itself as a worker does

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str) -> "CheckRequest":
        values = json.loads(text)
        values["apps"] = [AppSpec(**app) for app in values["apps"]]
        return cls(**values)


def resolve(user: str, group: str) -> tuple[int, int]:
    """The uid and gid of a configured user and group (the user's own group by default):
    the arbiter hands the workers' socket to them, a worker becomes them."""
    import grp
    import os
    import pwd
    entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user) if user else None
    uid = entry.pw_uid if entry else os.getuid()
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    else:
        gid = entry.pw_gid if entry else os.getgid()
    return uid, gid
