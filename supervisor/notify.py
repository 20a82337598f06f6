"""sd_notify without a library: datagrams to $NOTIFY_SOCKET (systemd's protocol).

The socket never blocks: if systemd (or a test) is slow to read, a message
is dropped rather than stalling the arbiter loop.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        self.socket: socket.socket | None = None
        if address.startswith(("/", "@")):
            self.address = "\0" + address[1:] if address.startswith("@") else address
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.socket.setblocking(False)
        watchdog_usec = int(environ.get("WATCHDOG_USEC", "0") or 0)
        watchdog_pid = environ.get("WATCHDOG_PID")
        if watchdog_pid and watchdog_pid.isdigit() and int(watchdog_pid) != os.getpid():
            watchdog_usec = 0  # the watchdog is meant for another process
        self.watchdog_interval_s = watchdog_usec / 2e6 if watchdog_usec else None
        self.last_watchdog = 0.0
        self.last_status = ""

    def send(self, *fields: str) -> None:
        if self.socket is None:
            return
        try:
            self.socket.sendto("\n".join(fields).encode(), self.address)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            pass

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self, now: float) -> None:
        if self.watchdog_interval_s is not None and now - self.last_watchdog >= self.watchdog_interval_s:
            self.last_watchdog = now
            self.send("WATCHDOG=1")

    def next_watchdog(self) -> float | None:
        if self.watchdog_interval_s is None:
            return None
        return self.last_watchdog + self.watchdog_interval_s

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
