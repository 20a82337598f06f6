"""The broker's side of many hosts (docs/cluster.md): the cluster endpoint, who may join it,
what a host is sent when it joins, and the fence asked before a gone remote worker's work moves.

    ClusterAuthenticator   ZAP for the frontend (client_keys) and the cluster endpoint (host_keys)
    ClusterEndpoint        the tcp+CURVE listener on the backend ROUTER; checks each remote
                           message against its key; answers the hosts' own requests
    StoreFence             the broker_ledger.Fence of remote workers: fenced in the store first

The cluster endpoint is a second listener of the workers' backend ROUTER (the same
socket, the same worker protocol: docs/worker-protocol.md). The listener is bound with
CURVE_SERVER and the ZAP domain CLUSTER_DOMAIN, so libzmq refuses any peer that is not
CURVE (a plain tcp peer never gets a message through) and asks ZAP for each key:
only keys in `host_keys` are let in, and each connection's messages carry the key's
name (the host's name) as their User-Id.

A remote worker's routing id is `NAME:RUN/w<slot>.<generation>`: NAME is its host's
key name, RUN is the host process's run (a host that restarts joins with new
identities, so a fence of its earlier run never meets them). Its host's own requests
come from `NAME:RUN/ctl`. A message whose identity does not start with its key's name,
or a READY whose "host" is not that name, is a protocol violation: dropped, and the
worker (if linked) is dropped and fenced.

The host's requests (one frame, a command byte first; the answer repeats the byte):

    H_SPEC      -> json: the worker spec, apps' modules named by sha256 (no paths)
    H_MODULE h  -> h (64 hex) + the module's bytes, or h + nothing when unknown
    H_JOINED    -> json {"workers": [identity, ...]}: this host run's linked workers
    H_LEAVE     -> json {"retiring": n}: its workers are asked to finish and leave (drain)
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

import zmq

from corral import security
from corral.broker_ledger import Event, LocalFence, WorkerLink
from corral.wire.protocol import W_DISCONNECT, W_READY

CLUSTER_DOMAIN = "corral-cluster"
H_SPEC = b"\x41"
H_MODULE = b"\x42"
H_JOINED = b"\x43"
H_LEAVE = b"\x44"
CONTROL_SUFFIX = b"/ctl"
FENCE_RETRY_S = 0.5


def module_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ClusterAuthenticator(security.KeyAuthenticator):
    """The context's one ZAP handler: frontend clients by `client_keys` (any domain but
    ours), hosts by `host_keys` (CLUSTER_DOMAIN only). A key in both directories is a
    client on the frontend and a host on the cluster endpoint, never the other."""

    def __init__(self, context: zmq.Context, keys: security.KeyNames, hosts: security.KeyNames):
        super().__init__(context, keys)
        self.hosts = hosts
        self.domain = ""

    def use_hosts(self, hosts: security.KeyNames) -> None:
        self.hosts = hosts
        self.certs[CLUSTER_DOMAIN] = {public: True for public in hosts.names}

    def start(self) -> None:
        super().start()
        self.use_hosts(self.hosts)

    async def _authenticate_curve(self, domain: str, client_key: bytes):
        self.domain = domain   # for curve_user_id, called right after (one thread, in order)
        return await super()._authenticate_curve(domain, client_key)

    def curve_user_id(self, client_public_key: bytes) -> str:
        if self.domain == CLUSTER_DOMAIN:
            return self.hosts.name(client_public_key) or "?"
        return super().curve_user_id(client_public_key)


class ClusterEndpoint:
    """The cluster listener and the hosts' requests; the broker shell hands it every
    message that came with a User-Id (a CURVE peer of the cluster endpoint)."""

    def __init__(self, backend: zmq.Socket, settings, secret: bytes, authenticator: ClusterAuthenticator, core,
                 log):
        self.backend = backend
        self.core = core
        self.log = log
        self.authenticator = authenticator
        self.host_names: set[str] = set()
        self.use(settings)
        self.spec: dict | None = None
        self.modules: dict[str, bytes] = {}          # sha256 -> module bytes
        self.lost_hosts: set[str] = set()             # logged once until a worker of it joins again
        self.vouching = b""   # the remote identity being handed to the core, checked against its key
        # The listener's options are copied at bind: CURVE server, our secret, our ZAP domain.
        backend.setsockopt(zmq.CURVE_SERVER, 1)
        backend.setsockopt(zmq.CURVE_SECRETKEY, secret)
        backend.setsockopt_string(zmq.ZAP_DOMAIN, CLUSTER_DOMAIN)
        try:
            backend.bind(settings.listen)
        except zmq.ZMQError as exc:
            raise zmq.ZMQError(exc.errno, f"[cluster] listen {settings.listen}: {exc.strerror}") from None
        self.listen = backend.getsockopt_string(zmq.LAST_ENDPOINT)

    # --- configuration -----------------------------------------------------------

    def use(self, settings) -> list[str]:
        """Take `host_keys` (at start and on a reload); returns the host names removed."""
        hosts = security.KeyNames(settings.host_keys)
        for problem in hosts.problems:
            self.log.warning("cluster.key_ignored", directory=str(settings.host_keys), problem=problem)
        self.authenticator.use_hosts(hosts)   # new connections are judged by it from now on
        names = set(hosts.names.values())
        removed = sorted(self.host_names - names)
        self.host_names = names
        return removed

    def use_spec(self, spec) -> None:
        """The current config generation's WorkerSpec: what a joining host is sent. Modules
        are read now and named by content hash; the broker's own paths are not sent."""
        modules, apps = {}, []
        for app in spec.apps:
            data = Path(app.module).read_bytes()
            digest = module_hash(data)
            modules[digest] = data
            apps.append({**asdict(app), "module": digest + Path(app.module).suffix, "artifact": ""})
        values = asdict(spec)
        for private in ("backend", "cache_dir", "state_dir", "user", "group"):
            values.pop(private, None)
        values["apps"] = apps
        self.spec, self.modules = values, modules

    # --- messages ------------------------------------------------------------------

    def on_message(self, identity: bytes, payload: bytes, user: str, now: float) -> None:
        """A message from a CURVE peer whose key is named `user`."""
        if user not in self.host_names:
            # A key removed by a reload: its connections are still open (ZAP judges only new ones).
            if identity in self.core.links:
                self.drop(identity, f"host {user}'s key was removed from host_keys", now)
            return
        if not identity.startswith(user.encode() + b":"):
            self.violation(identity, user, "its identity does not start with its key's name", now)
            return
        if identity.endswith(CONTROL_SUFFIX):
            self.on_host_request(identity, payload, user)
            return
        if payload[:1] == W_READY:
            try:
                claimed = json.loads(payload[1:]).get("host")
            except (ValueError, AttributeError):
                claimed = None
            if claimed != user:
                self.violation(identity, user, f"READY names host {claimed!r}", now)
                return
        self.vouching = identity   # checked against its key above: the daemon's `expects` asks
        try:
            self.core.on_worker(identity, payload, now)
        finally:
            self.vouching = b""
        link = self.core.links.get(identity)
        if link is not None and payload[:1] == W_DISCONNECT:
            # Its goodbye, last on its pipe: no host of ours reaps it, so this is the reap.
            self.core.worker_gone(identity, "left", now)
        elif link is not None and not link.host:
            link.host = user
            if user in self.lost_hosts:
                self.lost_hosts.discard(user)
                self.log.info("cluster.host_back", host=user)

    def violation(self, identity: bytes, user: str, why: str, now: float) -> None:
        self.log.error("worker.protocol_violation", worker=identity[:128].decode(errors="replace"), host=user,
                       error=why)
        if identity in self.core.links:
            self.drop(identity, "protocol violation", now)

    def drop(self, identity: bytes, cause: str, now: float) -> None:
        link = self.core.links[identity]
        self.core.events.append((Event.SILENT, link, cause))
        self.core.worker_gone(identity, cause, now)

    def on_host_request(self, identity: bytes, payload: bytes, user: str) -> None:
        command = payload[:1]
        run = identity[:-len(CONTROL_SUFFIX)] + b"/"
        if command == H_SPEC and self.spec is not None:
            answer = H_SPEC + json.dumps(self.spec).encode()
        elif command == H_MODULE:
            digest = payload[1:65].decode(errors="replace")
            answer = H_MODULE + digest.encode() + self.modules.get(digest, b"")
        elif command == H_JOINED:
            joined = [link.identity.decode() for link in self.core.links.values()
                      if link.identity.startswith(run) and not link.retiring]
            answer = H_JOINED + json.dumps({"workers": joined}).encode()
        elif command == H_LEAVE:
            leaving = [link for link in self.core.links.values() if link.identity.startswith(run)]
            for link in leaving:
                if not link.retiring:
                    self.core.retire(link, time.monotonic())
            self.log.info("cluster.host_leaving", host=user, workers=len(leaving))
            answer = H_LEAVE + json.dumps({"retiring": len(leaving)}).encode()
        else:
            self.log.warning("cluster.unknown_request", host=user, command=payload[:1].hex())
            return
        try:
            self.backend.send_multipart([identity, answer], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass   # the host went away; it asks again when it is back

    def removed(self, names: list[str], now: float) -> None:
        """Hosts whose keys a reload removed: their workers are gone (and fenced) now."""
        for name in names:
            for link in [link for link in self.core.links.values() if link.host == name]:
                self.drop(link.identity, f"host {name}'s key was removed from host_keys", now)
            self.log.warning("cluster.host_removed", host=name)

    def note_events(self, events: list[tuple]) -> None:
        """A remote worker found silent: its host is logged lost once, by name, until it is back."""
        for event, link, *detail in events:
            if event is Event.SILENT and link.host and link.host not in self.lost_hosts:
                if detail and detail[0].startswith("host lost"):
                    self.lost_hosts.add(link.host)
                    self.log.error("cluster.host_lost", host=link.host, first_worker=link.identity.decode(),
                                   cause=detail[0])


class StoreFence:
    """Remote workers are fenced in the shared store (docs/cluster.md) before anything they
    held moves: their idempotent requests and their keys wait until state_pg.fence has
    returned for them. The write may wait (state_pg.FENCE_WAIT_S), so it runs on a thread
    of its own and the core asks again on each tick. Local workers: LocalFence (the reap).
    Without a shared store (no stateful app can run on remote hosts then) there is nothing
    a gone worker could still change, and its work moves at once."""

    def __init__(self, log):
        self.log = log
        self.local = LocalFence()
        self.dsn = ""
        self.run_id = ""
        self.done: set[bytes] = set()
        self.wanted: list[bytes] = []
        self.asked: set[bytes] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def use(self, dsn: str, run_id: str) -> None:
        self.dsn, self.run_id = dsn, run_id

    def requests_free(self, link: WorkerLink) -> bool:
        return self.fenced(link) if link.host else self.local.requests_free(link)

    def keys_free(self, link: WorkerLink) -> bool:
        return self.fenced(link) if link.host else self.local.keys_free(link)

    def fenced(self, link: WorkerLink) -> bool:
        if not self.dsn:
            return True
        identity = link.identity
        with self.lock:
            if identity in self.done:
                return True
            if identity not in self.asked:
                self.asked.add(identity)
                self.wanted.append(identity)
                if self.thread is None:
                    self.thread = threading.Thread(target=self.write_fences, name="fence", daemon=True)
                    self.thread.start()
        return False

    def write_fences(self) -> None:
        """The fence thread: write each wanted fence, retrying while the store is away."""
        from corral.workers import state_pg
        from corral.workers.state import fence_name
        while True:
            with self.lock:
                if not self.wanted:
                    self.thread = None
                    return
                identity = self.wanted[0]
            started = time.monotonic()
            try:
                state_pg.fence(self.dsn, fence_name(self.run_id, identity))
            except Exception as exc:   # psycopg.Error: the store is away; its work waits
                self.log.error("cluster.fence_failed", worker=identity.decode(errors="replace"),
                               error=str(exc).strip()[:300])
                time.sleep(FENCE_RETRY_S)
                continue
            self.log.info("cluster.fenced", worker=identity.decode(errors="replace"),
                          took_ms=int((time.monotonic() - started) * 1000))
            with self.lock:
                self.wanted.pop(0)
                self.done.add(identity)
