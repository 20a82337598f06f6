"""Who may reach the frontend, and call what: CURVE keys, their names, loopback addresses.

    frontend_exposure(endpoint)     "loopback" | "network" | "ipc" (where a frontend listens)
    forbidden(allow, key_name)      the ACL: a refusal detail, or None
    KeyNames                        public key -> name, from a directory of NAME.key certificates
    KeyAuthenticator                pyzmq's ZAP handler, answering each CURVE client with its key's name

CURVE covers tcp frontends: libzmq authenticates each connection (ZAP, on a
thread of pyzmq's), and every message from it carries the key's name as its
`User-Id` property. ipc frontends rely on file permissions: their clients
have no key, and the ACL does not apply to them.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

LOOPBACK_NAMES = ("localhost",)


def frontend_exposure(endpoint: str) -> str:
    """Where clients of `endpoint` can come from: "ipc" (file permissions), "loopback"
    (127.0.0.0/8, ::1, localhost) or "network" (anything else, 0.0.0.0 and * too)."""
    if not endpoint.startswith("tcp://"):
        return "ipc"
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return "loopback" if is_loopback(host) else "network"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name, a host name: could be any address


def forbidden(allow: tuple[str, ...] | None, key_name: str | None) -> str | None:
    """Why a client with `key_name` (None: no key, an ipc client) may not call a service
    whose `allow` list this is (None: any allowed key), or None when it may."""
    if key_name is None or allow is None or key_name in allow:
        return None
    return f"key {key_name!r} is not allowed to call this service"


def server_keys(secret_file: Path) -> tuple[bytes, bytes]:
    """(public, secret) of the server's certificate; ValueError says what is wrong with it."""
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the certificate: {exc}") from None
    if not secret:
        raise ValueError("is a public certificate: it has no secret-key (name the NAME.key_secret file)")
    return public, secret


class KeyNames:
    """The allowed client keys of a directory: each NAME.key is a public certificate."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.names: dict[bytes, str] = {}   # z85 public key -> name
        self.problems: list[str] = []
        for path in sorted(directory.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as exc:
                self.problems.append(f"{path.name}: not a certificate ({exc})")
                continue
            if public in self.names:
                self.problems.append(f"{path.name}: the same key as {self.names[public]}.key")
                continue
            self.names[public] = path.stem

    def name(self, public_key: bytes) -> str | None:
        return self.names.get(z85.encode(public_key))


class KeyAuthenticator(ThreadAuthenticator):
    """ZAP for the frontend: a CURVE client is let in when its key is one of KeyNames,
    and its messages carry the key's name. Everything else (unknown keys, NULL or
    PLAIN clients on a CURVE endpoint) is refused by libzmq before a message comes."""

    def __init__(self, context: zmq.Context, keys: KeyNames):
        super().__init__(context, log=logging.getLogger("corral.zap"))
        self.keys = keys

    def use(self, keys: KeyNames) -> None:
        """Take a (re)loaded directory: connections made from now on are judged by it."""
        self.keys = keys
        self.certs["*"] = {public: True for public in keys.names}
        self.allow_any = False

    def start(self) -> None:
        super().start()
        self.use(self.keys)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.keys.name(client_public_key) or "?"
