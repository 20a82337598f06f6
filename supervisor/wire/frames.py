"""Multipart messages in and out of ZeroMQ sockets, at the cost the hot path can bear.

    drain(socket, limit)            every message waiting, up to limit, never blocking
    drain_with_user(socket, limit)  the same, each with its connection's ZAP User-Id (CURVE key name)
    recv_payload(socket)            one single-frame message, blocking (RCVTIMEO applies)
    send_frames(socket, frames)     one message; zmq.Again / ZMQError(EHOSTUNREACH) as pyzmq raises

Both implementations raise the same exceptions for the same refusal (zmq.Again,
zmq.ZMQError with libzmq's errno, ENOTSOCK for a closed socket).

Two implementations behind these names. `_zmqframes`, a small C extension
built with the package, reads and writes whole messages with one call into
the libzmq that pyzmq loaded (bound through pyzmq's own extension module): draining a 6-frame client request costs 0.5 us
there, against 5 us through pyzmq, whose per-frame ZMQ_RCVMORE look-up goes
through an enum conversion. Where the extension is not built or cannot bind
to pyzmq's libzmq (or CORRAL_PURE_PYZMQ=1 is set), pyzmq's Cython socket
methods with int flags do the same work. IMPLEMENTATION names the one in use.
"""

from __future__ import annotations

import errno
import os
import sys

import zmq
import zmq.backend

_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)


def _raise(error: int):
    """Raise what pyzmq raises for a refused call (zmq.error._check_rc's mapping)."""
    if error == errno.EAGAIN:
        raise zmq.Again(error)
    if error == errno.EINTR:
        raise zmq.InterruptedSystemCall(error)
    if error == zmq.ETERM:
        raise zmq.ContextTerminated(error)
    raise zmq.ZMQError(error)


def _bind_extension():
    """The C extension bound to pyzmq's libzmq, or None.

    It is handed the file of pyzmq's own extension module (the one that
    defines zmq.backend.Socket): dlopen'd with RTLD_NOLOAD that names the copy
    already in this process, and dlsym finds libzmq through it, bundled
    beside pyzmq or linked in. No search of the process's mappings.
    """
    if os.environ.get("CORRAL_PURE_PYZMQ"):
        return None
    try:
        from corral.wire import _zmqframes
    except ImportError:
        return None
    path = getattr(sys.modules.get(zmq.backend.Socket.__module__), "__file__", None)
    if not path:
        return None
    try:
        _zmqframes.load(path, _raise)
    except OSError:
        return None
    return _zmqframes


_c = _bind_extension()
IMPLEMENTATION = "c" if _c is not None else "pyzmq"


def readable(socket: zmq.Socket) -> bool:
    """Is a message waiting? (ZMQ_EVENTS, without pyzmq's enum arithmetic)"""
    return bool(_get(socket, _EVENTS) & _POLLIN)


def recv_payload(socket: zmq.Socket, flags: int = 0) -> bytes:
    """One single-frame message; stray extra frames (never sent by corral) are dropped."""
    payload = _recv(socket, flags)
    while _get(socket, _RCVMORE):
        _recv(socket)
    return payload


def _recv_message(socket: zmq.Socket, flags: int = 0) -> list[bytes]:
    frames = [_recv(socket, flags)]
    while _get(socket, _RCVMORE):
        frames.append(_recv(socket))
    return frames


if _c is not None:
    _c_drain, _c_send = _c.drain, _c.send

    def drain(socket: zmq.Socket, limit: int) -> list[list[bytes]]:
        return _c_drain(socket.underlying, limit)

    def send_frames(socket: zmq.Socket, frames: list[bytes] | tuple[bytes, ...], flags: int = 0) -> None:
        _c_send(socket.underlying, frames, flags)

else:
    def drain(socket: zmq.Socket, limit: int) -> list[list[bytes]]:
        messages = []
        while len(messages) < limit and readable(socket):
            messages.append(_recv_message(socket, NOBLOCK))
        return messages

    def send_frames(socket: zmq.Socket, frames: list[bytes] | tuple[bytes, ...], flags: int = 0) -> None:
        last = len(frames) - 1
        more = flags | _SNDMORE
        for i in range(last):
            _send(socket, frames[i], more)
        _send(socket, frames[last], flags)


def _drain_with_user(socket: zmq.Socket, limit: int) -> list[tuple[list[bytes], str | None]]:
    messages = []
    while len(messages) < limit and readable(socket):
        first = _recv(socket, NOBLOCK, False)
        try:
            user = first.get("User-Id")
        except zmq.ZMQError:
            user = None
        frames = [first.bytes]
        while _get(socket, _RCVMORE):
            frames.append(_recv(socket))
        messages.append((frames, user))
    return messages


if _c is not None and hasattr(_c, "drain_with_user"):
    _c_drain_with_user = _c.drain_with_user

    def drain_with_user(socket: zmq.Socket, limit: int) -> list[tuple[list[bytes], str | None]]:
        try:
            return _c_drain_with_user(socket.underlying, limit)
        except RuntimeError:   # a libzmq without zmq_msg_gets
            return _drain_with_user(socket, limit)
else:
    drain_with_user = _drain_with_user

drain_with_user.__doc__ = ("drain(), each message with the User-Id its connection was given by ZAP (the "
                           "CURVE key's name; None without one, e.g. an ipc client).")
drain.__doc__ = "Every message waiting on `socket`, up to `limit`, as lists of frames; never blocks."
send_frames.__doc__ = ("Send one message. With NOBLOCK, zmq.Again (high-water mark) or ZMQError "
                       "EHOSTUNREACH (a ROUTER peer gone) comes from the first frame, before "
                       "anything is queued.")
