"""A client for corral's native dialect (CORRAL1), with many requests in flight.

    from corral.client import Client

    with Client("tcp://127.0.0.1:5555") as client:
        reply = client.call("echo", b"hello")             # one request, wait for it
        assert reply.status == 200 and reply.body == b"hello"

        ids = [client.send("counter", b"", key="a") for _ in range(100)]   # pipelined
        replies = client.gather(ids, timeout=5)           # {request_id: Reply}

Replies are matched to requests by id; replies that arrive while waiting for
another request are kept until asked for.

On a frontend with CURVE, give the client its key pair and the server's public key:

    keys = CurveKeys.load("alice.key_secret", "server.key")   # files of `corral keygen`
    with Client("tcp://10.0.0.5:5555", keys=keys) as client: ...
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass

import zmq

from corral.wire.protocol import NATIVE


@dataclass(frozen=True)
class CurveKeys:
    """A client's CURVE key pair and the server's public key (z85, as in certificate files)."""
    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, key_file: str, server_key_file: str) -> "CurveKeys":
        """key_file: the client's NAME.key_secret; server_key_file: the server's public
        certificate (NAME.key), or its NAME.key_secret (its public key is in it too).
        ValueError names the file that is not usable."""
        import zmq.auth
        try:
            public, secret = zmq.auth.load_certificate(key_file)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{key_file}: {exc}") from None
        if not secret:
            raise ValueError(f"{key_file}: a public certificate; the client needs its NAME.key_secret")
        try:
            server, _ = zmq.auth.load_certificate(server_key_file)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{server_key_file}: {exc}") from None
        return cls(public, secret, server)

    def apply(self, socket: zmq.Socket) -> None:
        """Before connect: every connection of `socket` is CURVE to this server."""
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        socket.setsockopt(zmq.CURVE_SERVERKEY, self.server)


@dataclass(frozen=True, slots=True)
class Reply:
    request_id: bytes
    status: int
    body: bytes

    @property
    def ok(self) -> bool:
        return self.status == 200


class NoReply(TimeoutError):
    """No reply came within the timeout."""


def _seconds(timeout: float) -> str:
    return f"{timeout:.3g}"


class Client:
    def __init__(self, endpoint: str, context: zmq.Context | None = None, keys: CurveKeys | None = None):
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        if keys is not None:
            keys.apply(self.socket)
        self.socket.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self._ids = itertools.count(1)
        self._arrived: dict[bytes, Reply] = {}

    def send(self, service: str | bytes, body: bytes = b"", *, key: str | None = None,
             deadline_ms: int | None = None, idempotent: bool | None = None,
             request_id: bytes | None = None) -> bytes:
        """Send one request without waiting; returns its request id."""
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TypeError(f"the body must be bytes, not {type(body).__name__}"
                            + (" (encode it: body.encode())" if isinstance(body, str) else ""))
        request_id = request_id or b"%d" % next(self._ids)
        meta = {}
        if key is not None:
            meta["key"] = key
        if deadline_ms is not None:
            meta["deadline_ms"] = deadline_ms
        if idempotent is not None:
            meta["idempotent"] = idempotent
        service = service.encode() if isinstance(service, str) else service
        self.socket.send_multipart([NATIVE, request_id, service,
                                    json.dumps(meta).encode() if meta else b"", body])
        return request_id

    def recv(self, timeout: float | None = None) -> Reply:
        """The next reply to arrive, whichever request it answers."""
        if self._arrived:
            return self._arrived.pop(next(iter(self._arrived)))
        return self._recv(timeout)

    def _recv(self, timeout: float | None) -> Reply:
        if not self.poller.poll(None if timeout is None else int(timeout * 1000)):
            raise NoReply(f"no reply within {_seconds(timeout)} s")
        frames = self.socket.recv_multipart()
        if len(frames) != 4 or frames[0] != NATIVE:
            raise ValueError(f"not a CORRAL1 reply: {frames[:4]!r}")
        return Reply(frames[1], int(frames[2]), frames[3])

    def wait(self, request_id: bytes, timeout: float | None = None) -> Reply:
        """The reply to one request; others that arrive meanwhile are kept."""
        if request_id in self._arrived:
            return self._arrived.pop(request_id)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                reply = self._recv(left)
            except NoReply:
                raise NoReply(f"no reply within {_seconds(timeout)} s") from None  # the whole wait, not what was left
            if reply.request_id == request_id:
                return reply
            self._arrived[reply.request_id] = reply

    def gather(self, request_ids: list[bytes], timeout: float | None = None) -> dict[bytes, Reply]:
        """The replies to all of `request_ids`; NoReply if they do not all come in time."""
        wanted = set(request_ids)
        replies = {i: self._arrived.pop(i) for i in list(wanted) if i in self._arrived}
        end = None if timeout is None else time.monotonic() + timeout
        while len(replies) < len(wanted):
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                reply = self._recv(left)
            except NoReply:
                raise NoReply(f"{len(wanted) - len(replies)} of {len(wanted)} replies missing "
                              f"after {_seconds(timeout)} s") from None
            if reply.request_id in wanted:
                replies[reply.request_id] = reply
            else:
                self._arrived[reply.request_id] = reply
        return replies

    def call(self, service: str | bytes, body: bytes = b"", *, timeout: float | None = 10.0,
             **meta) -> Reply:
        """Send one request and wait for its reply."""
        return self.wait(self.send(service, body, **meta), timeout)

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
