"""The baseline servers corral is measured against, each run as its own process by bench/run.py.

    python bench/baselines.py echo ENDPOINT [--reply native|verbatim] [--multipart]
        (a) one hop: a ROUTER in one Python process that answers every request
            itself. --reply native (the default) answers corral's native dialect
            ([CORRAL1, id, "200", body]), so the very same load generator and
            frames load it as load corral; --reply verbatim sends the request's
            frames back unchanged (for the loadgen's "echo" framing).
    python bench/baselines.py proxy FRONTEND BACKEND
        (b) the broker: the C `zmq.proxy` between a ROUTER frontend and a DEALER
            backend (round-robin to whoever is connected), in its own process.
    python bench/baselines.py rep BACKEND [--multipart]
        (b) one worker behind it: a REP socket that echoes each request's frames.

Each prints "ready" on stdout once its sockets are bound or connected, then
serves until killed. Frames are read and written one `recv`/`send` call at a
time (the same technique the load generator uses); --multipart uses
`recv_multipart`/`send_multipart` instead, the way most pyzmq code is written,
to show what that costs.
"""

from __future__ import annotations

import argparse
import signal
import sys

import zmq

NATIVE = b"CORRAL1"
OK = b"200"


def ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def serve_echo(endpoint: str, reply: str, multipart: bool) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoint)
    ready()
    native = reply == "native"
    if multipart:
        recv_multipart, send_multipart = socket.recv_multipart, socket.send_multipart
        while True:
            frames = recv_multipart()
            if native:   # [client, CORRAL1, id, service, meta, body]
                send_multipart([frames[0], NATIVE, frames[2], OK, frames[-1]])
            else:
                send_multipart(frames)
    recv, send, more, getsockopt, RCVMORE = socket.recv, socket.send, zmq.SNDMORE, socket.getsockopt, zmq.RCVMORE
    while True:
        frames = [recv()]
        while getsockopt(RCVMORE):
            frames.append(recv())
        if native:
            send(frames[0], more)
            send(NATIVE, more)
            send(frames[2], more)
            send(OK, more)
            send(frames[-1])
        else:
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                send(frame, more if i < last else 0)


def serve_proxy(frontend: str, backend: str) -> None:
    context = zmq.Context()
    front = context.socket(zmq.ROUTER)
    back = context.socket(zmq.DEALER)
    for socket in (front, back):
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
    front.bind(frontend)
    back.bind(backend)
    ready()
    zmq.proxy(front, back)


def serve_rep(backend: str, multipart: bool) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.REP)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(backend)
    ready()
    if multipart:
        recv_multipart, send_multipart = socket.recv_multipart, socket.send_multipart
        while True:
            send_multipart(recv_multipart())
    recv, send, more, getsockopt, RCVMORE = socket.recv, socket.send, zmq.SNDMORE, socket.getsockopt, zmq.RCVMORE
    while True:
        frames = [recv()]   # REP has taken the envelope off: [id, body]
        while getsockopt(RCVMORE):
            frames.append(recv())
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            send(frame, more if i < last else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/baselines.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    echo = kinds.add_parser("echo")
    echo.add_argument("endpoint")
    echo.add_argument("--reply", choices=("native", "verbatim"), default="native")
    echo.add_argument("--multipart", action="store_true")
    proxy = kinds.add_parser("proxy")
    proxy.add_argument("frontend")
    proxy.add_argument("backend")
    rep = kinds.add_parser("rep")
    rep.add_argument("backend")
    rep.add_argument("--multipart", action="store_true")
    args = parser.parse_args(argv)
    # bench/run.py stops us (SIGTERM, then SIGKILL); a terminal's Ctrl-C is its business.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.kind == "echo":
        serve_echo(args.endpoint, args.reply, args.multipart)
    elif args.kind == "proxy":
        serve_proxy(args.frontend, args.backend)
    else:
        serve_rep(args.backend, args.multipart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
