"""What libzmq does to client connections behind the broker's back, logged.

libzmq drops a connection that sends a frame over the frontend's MAXMSGSIZE
(twice max_message_kib, plus 64 KiB) without a word to the broker, and ZAP
refuses a CURVE client before any message arrives: without this the daemon
would log nothing, and the client only waits (docs/operating.md, "Messages
too large"). A thread reads the frontend's monitor socket and logs

    client.disconnected          a connection closed: the client left, or sent a frame over the limit
    client.handshake_failed      a connection refused before its first message (CURVE, ZAP)

libzmq tells the two causes of a disconnect apart nowhere it reports, so the
event names both.
"""

from __future__ import annotations

import threading

import zmq
from zmq.utils.monitor import recv_monitor_message

_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_POLL_MS = 200


class FrontendWatch:
    def __init__(self, frontend: zmq.Socket, log, max_message_kib: int):
        self.frontend = frontend
        self.log = log
        self.limit_kib = 2 * max_message_kib + 64
        self.stop = threading.Event()
        self.monitor = frontend.get_monitor_socket(_EVENTS)   # made here, in the frontend's thread
        self.thread = threading.Thread(target=self.run, name="frontend-watch", daemon=True)
        self.thread.start()

    def use(self, max_message_kib: int) -> None:
        """A reload's limit (the connections made from now on have it)."""
        self.limit_kib = 2 * max_message_kib + 64

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if not self.monitor.poll(_POLL_MS):
                    continue
                event = recv_monitor_message(self.monitor)
            except zmq.ZMQError:   # the context destroyed under it (a start that failed)
                return
            self.say(event["event"], event["endpoint"].decode(errors="replace"), event["value"])

    def say(self, event: int, endpoint: str, value: int) -> None:
        if event == zmq.EVENT_DISCONNECTED:
            self.log.info("client.disconnected", endpoint=endpoint,
                          detail=f"the client closed it, or sent a frame over {self.limit_kib} KiB "
                                 f"(twice max_message_kib, plus 64 KiB), which libzmq drops without a reply")
        else:
            self.log.warning("client.handshake_failed", endpoint=endpoint, event=zmq.Event(event).name,
                             detail="refused before its first message: CURVE without an allowed key, "
                                    "or a client that does not speak CURVE")

    def close(self) -> None:
        """Before the frontend closes."""
        self.stop.set()
        self.thread.join()
        self.frontend.disable_monitor()
        self.monitor.close(linger=0)
