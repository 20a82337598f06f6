"""frames: the frame I/O the broker and the workers use (corral.wire.frames: send_frames,
drain; the C extension where it is built) against plain pyzmq's send_multipart and
recv_multipart, per message, on the same six-frame client requests over one inproc pair."""

from __future__ import annotations

import time

import zmq

from bench import report as tables
from bench.systems import Context

BATCH = 256   # the broker's drain limit (corral.broker.BATCH)


def message(body: bytes) -> list[bytes]:
    """A client request as the broker's ROUTER reads it: identity, then the native dialect."""
    return [b"\x00\x80\x00\x00\x29", b"CORRAL1", b"12345", b"echo", b"", body]


def run(opts, ctx: Context, report: tables.Report) -> None:
    from corral.wire import frames
    count = 2000 if opts.quick else 20000
    frame_list = message(opts.body.encode())
    context = zmq.Context()
    try:
        sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        for socket in (sender, receiver):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 0)
            socket.setsockopt(zmq.RCVHWM, 0)
        receiver.bind("inproc://bench-frames")
        sender.connect("inproc://bench-frames")

        def send_frames() -> None:
            for _ in range(count):
                frames.send_frames(sender, frame_list)

        def send_multipart() -> None:
            for _ in range(count):
                sender.send_multipart(frame_list)

        def drain() -> None:
            got = 0
            while got < count:
                got += len(frames.drain(receiver, BATCH))

        def recv_multipart() -> None:
            for _ in range(count):
                receiver.recv_multipart()

        def fill() -> None:
            send_frames()

        def check(received: list[list[bytes]]) -> None:
            if received != [frame_list]:
                raise AssertionError(f"frames: sent {frame_list}, received {received}")

        frames.send_frames(sender, frame_list)
        check([receiver.recv_multipart()])
        sender.send_multipart(frame_list)
        receiver.poll(1000)
        check(frames.drain(receiver, BATCH))

        # Each timed side runs with the other side's work done untimed around it; the
        # two ways take turns going first, so that drift on a busy machine hits both alike.
        runs: dict[str, list[float]] = {name: [] for name in ("send_frames", "send_multipart", "drain",
                                                                 "recv_multipart")}
        sides = ((("send_frames", send_frames), ("send_multipart", send_multipart), None, drain),
                 (("drain", drain), ("recv_multipart", recv_multipart), fill, None))
        for rep in range(opts.reps + 1):   # the first is a warm-up, not counted
            for ours, theirs, before, after in sides:
                for name, fn in ((ours, theirs) if rep % 2 else (theirs, ours)):
                    if before:
                        before()
                    start = time.perf_counter_ns()
                    fn()
                    spent = time.perf_counter_ns() - start
                    if after:
                        after()
                    if rep:
                        runs[name].append(spent / count / 1000)
        sender.close(0)
        receiver.close(0)
    finally:
        context.term()
    tables.frames(report, opts, frames.IMPLEMENTATION, len(frame_list), count, runs)
