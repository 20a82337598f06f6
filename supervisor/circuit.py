"""Per-service health: the restart budget, the circuit breaker and quarantine.

Erlang/OTP's intensity and period: more than `restart.intensity` aborts of a
service within `restart.period_s` open its circuit. While open, its requests
get 503 at once; after a backoff (doubling from backoff_initial_ms up to
backoff_max_ms) one probe request is let through: if it does not abort the
circuit closes, if it aborts the circuit opens again for twice as long.

Quarantine: a request body that aborted an instance 3 times within
`restart.period_s` is answered 502 without reaching a worker until that
period has passed. Only the request that was running when the trap happened
is blamed; quarantined answers do not count toward the budget.
"""

from __future__ import annotations

import hashlib
from enum import Enum

from corral.config import RestartSettings
from corral.wire.window import SlidingWindow

QUARANTINE_AFTER = 3


class Circuit(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"   # one probe request let through, its verdict awaited


def digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


class Health:
    def __init__(self, service: str, restart: RestartSettings, log):
        self.service = service
        self.log = log
        self.aborts = SlidingWindow(restart.period_s)
        self.poison: dict[bytes, SlidingWindow] = {}   # body digest -> its aborts
        self.use_restart(restart)
        self.backoff_s = self.backoff_initial_s
        self.circuit = Circuit.CLOSED
        self.open_until = 0.0
        self.probing = False
        self.quarantined_until: dict[bytes, float] = {}
        self.opened = 0  # how many times the circuit opened (for status)

    def use_restart(self, restart: RestartSettings) -> None:
        """The budget and backoff of a (re)loaded config; the circuit's state is kept."""
        self.intensity = restart.intensity
        self.period_s = restart.period_s
        for window in (self.aborts, *self.poison.values()):
            window.period_s = restart.period_s
        self.backoff_initial_s = restart.backoff_initial_ms / 1000
        self.backoff_max_s = restart.backoff_max_ms / 1000

    def admit(self, now: float) -> tuple[bool, str | None]:
        """May a new request through? Returns (is_probe, refusal detail or None)."""
        if self.circuit is Circuit.CLOSED:
            return False, None
        if self.circuit is Circuit.OPEN:
            if now < self.open_until:
                return False, (f"circuit open: more than {self.intensity} aborts in "
                               f"{self.period_s:g} s; next probe in {int((self.open_until - now) * 1000)} ms")
            self.circuit = Circuit.HALF_OPEN
            self.log.info("circuit.half_open", service=self.service)
        if self.probing:
            return False, "circuit half-open: a probe request is in flight"
        self.probing = True
        return True, None

    def quarantined(self, body: bytes, now: float) -> bool:
        if not self.quarantined_until:
            return False
        key = digest(body)
        until = self.quarantined_until.get(key)
        if until is None:
            return False
        if now >= until:
            del self.quarantined_until[key]
            return False
        return True

    def record_abort(self, body: bytes, now: float, probe: bool) -> None:
        """An instance of this service aborted (502) or hit its deadline (504) on `body`."""
        key = digest(body)
        poison = self.poison.get(key)
        if poison is None:
            poison = self.poison[key] = SlidingWindow(self.period_s)
        poison.add(now)
        if poison.count(now) >= QUARANTINE_AFTER:
            self.quarantined_until[key] = now + self.period_s
            del self.poison[key]
            self.log.warning("request.quarantined", service=self.service, digest=key.hex(),
                             seconds=self.period_s)
        self.aborts.add(now)
        aborts = self.aborts.count(now)
        if probe:
            self.probing = False
            self._open(now, "probe aborted")
        elif self.circuit is Circuit.CLOSED and aborts > self.intensity:
            self._open(now, f"{aborts} aborts in {self.period_s:g} s")

    def record_verdict(self, now: float) -> None:
        """A probe came back without aborting: close the circuit."""
        self.probing = False
        self.circuit = Circuit.CLOSED
        self.backoff_s = self.backoff_initial_s
        self.aborts.clear()
        self.log.info("circuit.closed", service=self.service)

    def probe_lost(self) -> None:
        """The probe ended without a verdict (expired in the queue, its worker killed)."""
        self.probing = False

    def _open(self, now: float, why: str) -> None:
        self.circuit = Circuit.OPEN
        self.open_until = now + self.backoff_s
        self.opened += 1
        self.log.warning("circuit.opened", service=self.service, cause=why,
                         backoff_ms=int(self.backoff_s * 1000))
        self.backoff_s = min(self.backoff_s * 2, self.backoff_max_s)

    def forget_old(self, now: float) -> None:
        """Drop poison records older than the period (called now and then, not per request)."""
        for key in [k for k, window in self.poison.items() if window.count(now) == 0]:
            del self.poison[key]
        for key in [k for k, until in self.quarantined_until.items() if until <= now]:
            del self.quarantined_until[key]
