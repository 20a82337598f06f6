"""Where corral keeps its files: packaged config and guests, runtime sockets, cache."""

from __future__ import annotations

import hashlib
import os
import site
import socket
import sys
import sysconfig
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def share_dir() -> Path:
    """The folder holding `config/` and `guests/`: the checkout, or <prefix>/share/corral."""
    if (_CHECKOUT / "config" / "corral.toml").is_file():
        return _CHECKOUT
    for prefix in (sysconfig.get_path("data"), sys.prefix, site.getuserbase()):
        candidate = Path(prefix) / "share" / "corral"
        if (candidate / "config" / "corral.toml").is_file():
            return candidate
    raise FileNotFoundError("the packaged config/corral.toml is not installed")


def default_config() -> Path:
    return share_dir() / "config" / "corral.toml"


def runtime_dir(create: bool = True) -> Path:
    """A private (0700) folder for sockets: systemd's RuntimeDirectory when set.

    Only the daemon makes it; clients just need to know where it is."""
    if os.environ.get("RUNTIME_DIRECTORY"):
        path = Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "corral"
    else:
        path = Path("/tmp") / f"corral-{os.getuid()}"
    return private_dir(path) if create else path


def cache_dir(configured: str = "") -> Path:
    """The compiled-module cache: owner-only, as deserializing is trusted input."""
    if configured:
        path = Path(configured)
    elif os.environ.get("CACHE_DIRECTORY"):
        path = Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    elif os.environ.get("XDG_CACHE_HOME"):
        path = Path(os.environ["XDG_CACHE_HOME"]) / "corral"
    else:
        path = Path.home() / ".cache" / "corral"
    return private_dir(path)


def state_dir(configured: str = "", cache: Path | None = None) -> Path:
    """Where services keep durable state (docs/state.md), not made here: systemd's StateDirectory
    when set, else a folder beside the module cache (never inside it: a cache may be wiped)."""
    if configured:
        return Path(configured)
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    cache = cache if cache is not None else cache_dir()
    return cache.parent / f"{cache.name}-state"


def private_dir(path: Path) -> Path:
    """`path`, made if missing, owned by us and closed to others (0700).

    A folder someone else owns (say a /tmp/corral-UID made by another user
    to catch our sockets) is refused, not used."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = path.stat().st_uid
    if owner != os.getuid():
        raise PermissionError(f"{path} belongs to uid {owner}, not to us (uid {os.getuid()})")
    os.chmod(path, 0o700)
    return path


def default_control_endpoint(config_path: Path) -> str:
    """One control socket per config file, so that two daemons with two configs
    never meet on it; `corral status -c FILE` finds it from the same file."""
    digest = hashlib.sha256(str(Path(config_path).resolve()).encode()).hexdigest()[:12]
    return f"ipc://{runtime_dir(create=False) / f'control-{digest}.sock'}"


def ipc_path(endpoint: str) -> str | None:
    """The file an ipc:// endpoint lives at; None for other transports and abstract `ipc://@` names."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[len("ipc://"):]
    return None


def ipc_in_use(endpoint: str) -> bool:
    """Is a live process listening on this ipc:// path?

    libzmq's bind unlinks an existing path and takes it over silently, so a
    second daemon would steal the first one's clients. A listener accepts a
    plain AF_UNIX connect; a stale file refuses it. (Abstract `ipc://@`
    names need no check: binding a taken one fails by itself.)"""
    path = ipc_path(endpoint)
    if path is None:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def remove_ipc_file(endpoint: str) -> None:
    """After the socket stopped listening on an ipc:// path: libzmq leaves the file behind."""
    path = ipc_path(endpoint)
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass
