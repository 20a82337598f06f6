"""Is anything listening on a ZeroMQ endpoint? Asked before a request is sent,
so that a command aimed at a daemon that is not running says so at once
instead of waiting out its timeout (ZeroMQ connects lazily and queues)."""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED


def nothing_listening(endpoint: str, timeout: float = 0.5, context: zmq.Context | None = None) -> bool:
    """True when a connect to `endpoint` is refused (a tcp port nobody binds, an
    ipc path that does not exist or that nobody serves).

    False when the connect succeeds, and also when nothing is known within
    `timeout` (a slow network): the caller then goes on and waits as usual.
    The probe's socket connects at the transport level only and is closed at
    once, before any ZMTP handshake (so a CURVE frontend has nothing to refuse).
    """
    context = context or zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    monitor = socket.get_monitor_socket(_EVENTS)
    try:
        socket.connect(endpoint)
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                return False
            if event in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CLOSED):
                return True
        return False
    finally:
        socket.disable_monitor()
        monitor.close()
        socket.close()
