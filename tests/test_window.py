"""corral.wire.window.SlidingWindow: the one window behind the restart budget, the
circuit, quarantine and the worker's escalation ladder."""

from __future__ import annotations

from corral.wire.window import SlidingWindow


def test_counts_the_events_within_the_period():
    window = SlidingWindow(10.0)
    assert window.count(0.0) == 0
    for t in (1.0, 2.0, 3.0):
        window.add(t)
    assert window.count(3.0) == 3
    assert window.count(11.0) == 3      # an event exactly period_s old still counts
    assert window.count(11.5) == 2      # 1.0 has left
    assert window.count(100.0) == 0


def test_events_that_left_do_not_come_back():
    window = SlidingWindow(5.0)
    window.add(0.0)
    assert window.count(6.0) == 0
    window.add(6.0)
    assert window.count(6.0) == 1


def test_a_changed_period_judges_the_events_already_held():
    window = SlidingWindow(30.0)
    for t in range(10):
        window.add(float(t))
    assert window.count(10.0) == 10
    window.period_s = 5.0               # a reload shortens restart.period_s
    assert window.count(10.0) == 5      # 5.0 .. 9.0 (5.0 is exactly 5 s old)
    window.period_s = 60.0              # lengthening it cannot bring back what was dropped
    assert window.count(10.0) == 5


def test_clear_forgets_everything():
    window = SlidingWindow(1.0)
    window.add(0.5)
    window.clear()
    assert window.count(0.5) == 0


def test_intensity_is_exceeded_on_the_event_after_the_budget():
    """OTP's rule as corral uses it: more than `intensity` events within the period."""
    intensity, window = 3, SlidingWindow(10.0)
    over = []
    for t in (0.0, 1.0, 2.0, 3.0, 20.0):
        window.add(t)
        over.append(window.count(t) > intensity)
    assert over == [False, False, False, True, False]


class Log:
    """Where Health's log lines go: kept, to be read."""

    def __init__(self):
        self.lines = []

    def info(self, event, **fields):
        self.lines.append((event, fields))

    warning = info


def health(intensity=2, period_s=10.0):
    from corral.circuit import Health
    from corral.config import RestartSettings
    restart = RestartSettings(intensity=intensity, period_s=period_s, backoff_initial_ms=100,
                              backoff_max_ms=1000)
    return Health("svc", restart, Log())


def test_the_circuit_opens_on_the_abort_over_the_budget_within_the_period():
    h = health(intensity=2, period_s=10.0)
    h.record_abort(b"a", 0.0, probe=False)
    h.record_abort(b"b", 1.0, probe=False)
    assert h.circuit == "closed"
    h.record_abort(b"c", 20.0, probe=False)     # the first two have left the window
    assert h.circuit == "closed"
    h.record_abort(b"d", 21.0, probe=False)
    h.record_abort(b"e", 22.0, probe=False)
    assert h.circuit == "open"
    assert h.log.lines[-1] == ("circuit.opened", {"service": "svc", "cause": "3 aborts in 10 s", "backoff_ms": 100})


def test_a_body_is_quarantined_after_three_aborts_within_the_period():
    h = health(intensity=100, period_s=10.0)
    h.record_abort(b"poison", 0.0, probe=False)
    h.record_abort(b"poison", 5.0, probe=False)
    h.record_abort(b"poison", 15.0, probe=False)   # 0.0 has left: two in the window
    assert not h.quarantined(b"poison", 15.0)
    h.record_abort(b"poison", 16.0, probe=False)   # 5.0 has left too: still two
    assert not h.quarantined(b"poison", 16.0)
    h.record_abort(b"poison", 17.0, probe=False)
    assert h.quarantined(b"poison", 17.0) and not h.quarantined(b"other", 17.0)
    assert not h.quarantined(b"poison", 27.0)      # until the period has passed


def test_a_reload_applies_the_new_period_to_aborts_already_counted():
    from corral.config import RestartSettings
    h = health(intensity=2, period_s=60.0)
    h.record_abort(b"a", 0.0, probe=False)
    h.record_abort(b"b", 1.0, probe=False)
    h.use_restart(RestartSettings(intensity=2, period_s=5.0, backoff_initial_ms=100, backoff_max_ms=1000))
    h.record_abort(b"c", 10.0, probe=False)        # with 60 s this would be the third
    assert h.circuit == "closed"
    h.forget_old(10.0)
    assert set(h.poison) == {__import__("corral.circuit").circuit.digest(b"c")}
