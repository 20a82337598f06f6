"""A sliding window of event times: Erlang/OTP's restart intensity within a period.

Here, in the room both processes import, because both count with it: the
arbiter's restart budget and quarantine (corral/circuit.py) and the worker's
escalation ladder (corral/workers/host.py), which may import only corral.wire.
"""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    """The times of the events of the last `period_s` seconds.

    An event exactly `period_s` old still counts; older ones are dropped as
    the window is used. Times are the caller's clock (time.monotonic()), and
    they must not go backwards. `period_s` may be changed (a reload); the
    events already in the window are then judged by the new period.
    """

    __slots__ = ("period_s", "_times")

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._times: deque[float] = deque()

    def add(self, now: float) -> None:
        """One event at `now`."""
        self._times.append(now)

    def count(self, now: float) -> int:
        """How many events lie within the period that ends at `now`."""
        times, oldest = self._times, now - self.period_s
        while times and times[0] < oldest:
            times.popleft()
        return len(times)

    def clear(self) -> None:
        self._times.clear()
