"""The broker's shell: the sockets around the core (corral.broker_core).

It owns the frontend ROUTER (clients: bind, unbind, CURVE and ZAP) and the
backend ROUTER (workers), reads their frames in batches with the time, and
hands each message to the core; the core decides every reply and request,
and sends them through this shell as its Transport (to_client, to_worker).
Which request goes where, what a worker's message means, when a request
expires: all of it is the core's, testable without a socket
(tests/test_broker_core.py). docs/internals.md draws the split.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence

import zmq

from corral import security
from corral.broker_core import FULL, GONE, SENT, BrokerCore
from corral.broker_ledger import Service, WorkerLink
from corral.cluster import ClusterAuthenticator, ClusterEndpoint, StoreFence
from corral.config import Config
from corral.paths import ipc_in_use, remove_ipc_file
from corral.wire.frames import NOBLOCK, drain, drain_with_user, send_frames

# Drain at most this many messages from one socket per loop turn, so that
# neither side can starve the other (or the timers).
BATCH = 256
# Messages a worker has not read, at most (requests are bounded by its credit;
# the rest are heartbeats and evictions): past it, the worker is unreachable.
WORKER_HWM = 1000


class Broker:
    def __init__(self, context: zmq.Context, config: Config, backend: str, log):
        self.log = log
        self.frontend = context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.LINGER, 1000)  # so the last replies of a drain leave
        self.use_settings(config)
        self.frontend_bound: dict[str, str] = {}   # endpoint as configured -> as bound (wildcards resolved)
        self.authenticator: security.KeyAuthenticator | None = None
        self.key_names: set[str] = set()
        if config.security.curve:
            self.start_curve(context, config.security, config.cluster)
        self.bind_frontend(config.supervisor.frontend)
        self.backend = context.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.SNDHWM, WORKER_HWM)
        self.backend.setsockopt(zmq.RCVHWM, 0)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.bind(backend)
        self.fence = StoreFence(log) if config.cluster is not None else None
        self.core = BrokerCore(config, log, self, authorize=self.forbidden, fence=self.fence)
        self.cluster: ClusterEndpoint | None = None
        if config.cluster is not None:   # a second listener on the backend: docs/cluster.md
            self.cluster = ClusterEndpoint(self.backend, config.cluster, self.curve_secret, self.authenticator,
                                           self.core, log)

    # --- configuration -------------------------------------------------------

    def use_settings(self, config: Config) -> None:
        sup = config.supervisor
        # Per peer, for connections made from now on (README, "Fairness and memory"): a client
        # that reads never has more replies in its pipe than requests in flight.
        self.frontend.setsockopt(zmq.SNDHWM, sup.max_inflight_per_client)
        self.frontend.setsockopt(zmq.RCVHWM, sup.max_inflight_per_client)
        # A frame far over the limit disconnects its sender in libzmq; up to
        # twice the limit is read, so that it can be answered 413. (Connections
        # made before a reload keep the limit they were made with.)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, 2 * sup.max_message_kib * 1024 + 65536)

    def configure(self, config: Config) -> None:
        """Take a (re)loaded config: the sockets' limits, the client keys, and the core's apps."""
        self.use_settings(config)
        if self.authenticator is not None:
            self.authenticator.use(self.load_keys(config.security))  # a key removed is refused from now on
        self.core.configure(config, time.monotonic())
        if self.cluster is not None and config.cluster is not None:
            self.cluster.removed(self.cluster.use(config.cluster), time.monotonic())

    def start_curve(self, context: zmq.Context, settings, cluster=None) -> None:
        """CURVE on every tcp frontend from now on, its clients judged by ZAP (KeyAuthenticator)."""
        _, secret = security.server_keys(settings.curve_secret_key)
        self.curve_secret = secret
        self.frontend.setsockopt(zmq.CURVE_SECRETKEY, secret)
        if cluster is not None:   # one ZAP handler per context: it judges hosts too
            self.authenticator = ClusterAuthenticator(context, self.load_keys(settings),
                                                      security.KeyNames(cluster.host_keys))
        else:
            self.authenticator = security.KeyAuthenticator(context, self.load_keys(settings))
        self.authenticator.start()

    def load_keys(self, settings) -> security.KeyNames:
        keys = security.KeyNames(settings.client_keys)
        for problem in keys.problems:
            self.log.warning("security.key_ignored", directory=str(settings.client_keys), problem=problem)
        self.key_names = set(keys.names.values())
        return keys

    def forbidden(self, user: str, service: Service | None) -> str | None:
        """Why the client with key `user` may not call `service` (its `allow`), or None."""
        if user not in self.key_names:
            return f"key {user!r} is no longer allowed (removed from client_keys)"
        return security.forbidden(service.app.allow, user) if service is not None else None

    def bind_frontend(self, endpoints: Sequence[str]) -> None:
        """Listen on `endpoints` as well: on all of them, or (zmq.ZMQError) on none."""
        bound = []
        try:
            for endpoint in endpoints:
                if ipc_in_use(endpoint):
                    raise zmq.ZMQError(zmq.EADDRINUSE, f"frontend endpoint {endpoint} is in use")
                if self.authenticator is not None:
                    # Each listener keeps the security options it was bound with.
                    self.frontend.setsockopt(zmq.CURVE_SERVER, int(endpoint.startswith("tcp://")))
                try:
                    self.frontend.bind(endpoint)
                except zmq.ZMQError as exc:
                    raise zmq.ZMQError(exc.errno, f"frontend endpoint {endpoint}: {exc.strerror}") from None
                self.frontend_bound[endpoint] = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
                bound.append(endpoint)
        except zmq.ZMQError:
            self.unbind_frontend(bound)
            raise

    def unbind_frontend(self, endpoints: Sequence[str]) -> None:
        for endpoint in endpoints:
            self.frontend.unbind(self.frontend_bound.pop(endpoint))
            remove_ipc_file(endpoint)

    def rebind_frontend(self, endpoints: Sequence[str]) -> None:
        """A reload's frontend: listen on the new endpoints first, then stop listening on
        those gone (their clients are cut off). If a new one cannot be bound, nothing
        changes and zmq.ZMQError says why."""
        self.bind_frontend([e for e in endpoints if e not in self.frontend_bound])
        self.unbind_frontend([e for e in self.frontend_bound if e not in endpoints])

    # --- reading -------------------------------------------------------------

    def on_frontend(self) -> int:
        """Hand the client messages waiting to the core; returns how many came."""
        now = time.monotonic()
        on_client = self.core.on_client
        if self.authenticator is not None:   # every message with its key's name (None from ipc)
            messages = drain_with_user(self.frontend, BATCH)
            for frames, user in messages:
                if len(frames) >= 2:
                    on_client(frames, now, user)
            return len(messages)
        messages = drain(self.frontend, BATCH)
        for frames in messages:
            if len(frames) >= 2:   # nothing after the routing id: nothing to answer
                on_client(frames, now)
        return len(messages)

    def on_backend(self) -> int:
        """Hand the workers' messages waiting to the core; returns how many came."""
        now = time.monotonic()
        on_worker = self.core.on_worker
        if self.cluster is not None:   # a User-Id: a host's CURVE peer on the cluster listener
            messages = drain_with_user(self.backend, BATCH)
            on_remote = self.cluster.on_message
            for message, user in messages:
                if user is None:
                    on_worker(message[0], message[-1], now)
                else:
                    on_remote(message[0], message[-1], user, now)
            return len(messages)
        messages = drain(self.backend, BATCH)
        for message in messages:
            on_worker(message[0], message[-1], now)   # corral's workers send one frame
        return len(messages)

    # --- sending (the core's Transport) --------------------------------------

    def to_client(self, frames: list[bytes]) -> int:
        try:
            send_frames(self.frontend, frames, NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EAGAIN:  # the client's pipe is full: it is not reading
                return FULL
            if exc.errno != errno.EHOSTUNREACH:
                raise
            return GONE
        return SENT

    def to_worker(self, identity: bytes, payload: bytes) -> bool:
        try:
            send_frames(self.backend, [identity, payload], NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            return False
        return True

    # --- what the arbiter asks of the broker -----------------------------------

    def dispatch(self) -> None:
        core = self.core
        if core.waiting or core.backlogged or core.unsent:   # (most turns: no clock read)
            core.dispatch(time.monotonic())

    def tick(self, now: float) -> None:
        self.core.tick(now)

    def take_events(self) -> list[tuple]:
        """What the core learned about workers since the last call (Event, link, detail...)."""
        events = self.core.events
        if events:   # (most turns have none: no new list for them)
            self.core.events = []
            if self.cluster is not None:
                self.cluster.note_events(events)
        return events

    def worker_gone(self, identity: bytes, cause: str, reaped: bool = False, clean: bool = False) -> None:
        self.core.worker_gone(identity, cause, time.monotonic(), reaped, clean)

    def retire(self, identity: bytes) -> None:
        """Ask a worker to finish what it holds and leave (if it is linked and not leaving already)."""
        link = self.core.links.get(identity)
        if link is not None and not link.retiring:
            self.core.retire(link, time.monotonic())

    def unpark(self, identity: bytes) -> None:
        """A standby worker promoted: it takes requests from now on."""
        link = self.core.links.get(identity)
        if link is not None:
            self.core.unpark(link)

    def link(self, identity: bytes) -> WorkerLink | None:
        return self.core.links.get(identity)

    @property
    def busy(self) -> bool:
        return self.core.busy

    @property
    def heartbeat_s(self) -> float:
        return self.core.heartbeat_s

    @property
    def open_requests(self) -> int:
        return len(self.core.ledger)

    def forget_old_faults(self, now: float) -> None:
        """Let the services' circuits forget aborts older than their window."""
        for service in self.core.services.values():
            service.health.forget_old(now)

    def drain(self) -> None:
        self.core.drain()

    def abandon(self, detail: bytes) -> None:
        self.core.abandon(detail, time.monotonic())

    def close(self) -> None:
        self.frontend.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.backend.close(linger=0)
        for endpoint in self.frontend_bound:
            remove_ipc_file(endpoint)
