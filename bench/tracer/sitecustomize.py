"""The hops section's tracer (bench/run.py --hops): on PYTHONPATH, active only with
CORRAL_HOPS_TRACE=DIR in the environment, in the daemon and (inherited) its workers.

It wraps the three functions every corral message passes through
(corral.wire.frames: drain, recv_payload, send_frames) before any other module
imports them, and stamps each message with CLOCK_MONOTONIC, which every process
of the machine shares. At exit (including a worker's os._exit) it writes
DIR/<pid>.txt: one line per message, "ns direction kind", where kind is the
worker-protocol command byte in hex for one- and two-frame messages (worker
side and broker backend) and "c" for a client's message.
"""

import os

_DIR = os.environ.get("CORRAL_HOPS_TRACE")

if _DIR:
    import atexit
    import time

    import corral.wire.frames as _frames

    _events: list[tuple[int, str, str]] = []
    _clock = time.monotonic_ns
    _send_frames, _recv_payload, _drain = _frames.send_frames, _frames.recv_payload, _frames.drain

    def _kind(frames) -> str:
        return frames[-1][:1].hex() if len(frames) <= 2 else "c"

    def send_frames(socket, frames, flags=0):
        _events.append((_clock(), "out", _kind(frames)))
        return _send_frames(socket, frames, flags)

    def recv_payload(socket):
        payload = _recv_payload(socket)
        _events.append((_clock(), "in", payload[:1].hex()))
        return payload

    def drain(socket, limit):
        messages = _drain(socket, limit)
        now = _clock()
        _events.extend((now, "in", _kind(m)) for m in messages)
        return messages

    _frames.send_frames, _frames.recv_payload, _frames.drain = send_frames, recv_payload, drain

    # Opened now, written at exit: a worker confines itself in between (docs/confinement.md)
    # and may not open files in this folder then.
    _out = open(os.path.join(_DIR, f"{os.getpid()}.txt"), "w")

    def _dump() -> None:
        if not _out.closed:
            with _out:
                _out.writelines(f"{t} {direction} {kind}\n" for t, direction, kind in _events)

    _exit = os._exit

    def _dump_then_exit(code):
        _dump()
        _exit(code)

    os._exit = _dump_then_exit
    atexit.register(_dump)
