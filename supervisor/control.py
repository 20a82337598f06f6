"""The control endpoint: status and admin verbs for `corral status|scale|restart|reload`.

A ROUTER socket on an ipc:// path that only the daemon's user can open
(0600), or tcp:// on loopback if configured so. Clients are REQ sockets:

    request  ["", verb, json arguments]
    reply    ["", json result]            result always has "ok"

Each verb is a function of corral.verbs, found here by name. `reload`
answers when the reload is over: the new config serving on every
worker, or refused (with its problems). Its clients wait in the meantime.
"""

from __future__ import annotations

import json
import os
import zmq

from corral.paths import ipc_in_use, ipc_path, remove_ipc_file
from corral.verbs import VERBS, Arbiter


class Control:
    def __init__(self, context: zmq.Context, endpoint: str, arbiter: Arbiter):
        self.arbiter = arbiter
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 65536)
        if ipc_path(endpoint) is not None:
            if ipc_in_use(endpoint):
                raise zmq.ZMQError(zmq.EADDRINUSE, f"control endpoint {endpoint} is in use (by another "
                                                   f"daemon?): set [supervisor] control to another endpoint")
            old_umask = os.umask(0o177)  # the socket file is created 0600
            try:
                self.socket.bind(endpoint)
            finally:
                os.umask(old_umask)
        else:
            self.socket.bind(endpoint)
        self.endpoint = endpoint
        self.awaiting_reload: list[bytes] = []   # REQ peers whose reload is not over yet

    def serve(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 3 or frames[1] != b"":
                continue  # not a REQ client
            result = self.handle(frames[2:])
            if result is None:
                self.awaiting_reload.append(frames[0])
            else:
                self.answer(frames[0], result)

    def reload_over(self, result: dict) -> None:
        """The daemon's word that the reload is done or refused: answer everyone who asked for it."""
        waiting, self.awaiting_reload = self.awaiting_reload, []
        for peer in waiting:
            self.answer(peer, result)

    def answer(self, peer: bytes, result: dict) -> None:
        try:
            self.socket.send_multipart([peer, b"", json.dumps(result).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client left

    def handle(self, frames: list[bytes]) -> dict | None:
        """The verb's result, or None when it is answered later (reload_over)."""
        verb = frames[0].decode(errors="replace")
        try:
            args = json.loads(frames[1]) if len(frames) > 1 and frames[1] else {}
        except ValueError:
            return {"ok": False, "error": "arguments must be a JSON object"}
        if not isinstance(args, dict):
            return {"ok": False, "error": "arguments must be a JSON object"}
        handler = VERBS.get(verb)
        if handler is None:
            return {"ok": False, "error": f"unknown verb {verb!r} (known: {', '.join(VERBS)})"}
        return handler(self.arbiter, args)

    def close(self) -> None:
        self.socket.close(linger=0)
        remove_ipc_file(self.endpoint)

