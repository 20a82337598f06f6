"""Queued requests expire from a deadline heap: no sockets, no processes.

The broker's tick runs every 10 ms while anything is queued; what it costs
must not grow with the queues while no deadline is due. (That a request
still queued at its deadline is answered 504 without reaching a worker is
held through the real daemon in test_faults.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from harness import FAULTS

from corral.broker_core import BrokerCore
from corral.broker_ledger import Request, State
from corral.deadlines import SLACK, Deadlines
from corral.wire.protocol import NATIVE


class CountingLedger(dict):
    """The broker's ledger, counting the look-ups a tick makes."""

    def __init__(self, *args):
        super().__init__(*args)
        self.lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)

    def values(self):
        self.lookups += len(self)
        return super().values()


def queued(ticket: int, deadline: float) -> Request:
    return Request(ticket, b"client", NATIVE, b"id", None, None, b"", deadline, False, 0.0, False)


def broker_with(requests: list[Request]) -> SimpleNamespace:
    """What BrokerCore.expire_due reads: the ledger and the heap; expire() recorded."""
    expired: list[int] = []
    broker = SimpleNamespace(ledger=CountingLedger({r.ticket: r for r in requests}), deadlines=Deadlines(),
                             expired=expired)
    broker.expire = lambda request, now: (expired.append(request.ticket), broker.ledger.pop(request.ticket))
    for request in requests:
        broker.deadlines.push(request.deadline, request.ticket)
    return broker


def test_a_large_queue_with_no_deadline_due_costs_no_scan():
    broker = broker_with([queued(ticket, 100.0 + ticket) for ticket in range(1, 100_001)])
    for now in (1.0, 50.0, 99.9):
        BrokerCore.expire_due(broker, now)
    assert broker.expired == [] and broker.ledger.lookups == 0
    assert len(broker.deadlines) == 100_000


def test_the_due_ones_and_only_they_are_expired_earliest_first():
    broker = broker_with([queued(ticket, deadline) for ticket, deadline in ((1, 5.0), (2, 1.0), (3, 9.0), (4, 2.0))])
    BrokerCore.expire_due(broker, 5.0)
    assert broker.expired == [2, 4, 1]
    assert broker.ledger.lookups == 3    # one per due entry, none for the rest
    BrokerCore.expire_due(broker, 10.0)
    assert broker.expired == [2, 4, 1, 3]


def test_a_request_no_longer_queued_is_skipped_at_its_deadline():
    sent, answered, redelivered, waiting = (queued(t, 1.0) for t in (1, 2, 3, 4))
    sent.state = State.SENT
    redelivered.redelivered = True   # only a worker can tell whether it committed
    broker = broker_with([sent, answered, redelivered, waiting])
    del broker.ledger[2]
    BrokerCore.expire_due(broker, 1.0)
    assert broker.expired == [4]
    assert len(broker.deadlines) == 0


def test_leftovers_are_rebuilt_away_once_they_outnumber_the_live_entries():
    deadlines = Deadlines()
    for ticket in range(3 * SLACK):
        deadlines.push(1000.0 + ticket, ticket)
    live = [(1000.0, 0), (1001.0, 1)]
    assert deadlines.compact(len(live), lambda: live)
    assert len(deadlines) == 2 and deadlines.next_due() == 1000.0
    assert not deadlines.compact(len(live), lambda: live)   # nothing left over: no rebuild


def test_compaction_through_the_broker_keeps_what_is_still_queued():
    requests = [queued(ticket, 100.0 + ticket) for ticket in range(1, 3 * SLACK)]
    broker = broker_with(requests)
    for request in requests[1:]:
        request.state = State.DONE
        del broker.ledger[request.ticket]
    BrokerCore.expire_due(broker, 0.0)
    assert len(broker.deadlines) == 1
    BrokerCore.expire_due(broker, 200.0)
    assert broker.expired == [1]


# --- through the real daemon ----------------------------------------------------------------

@pytest.mark.timeout(90)
def test_a_queued_request_is_answered_at_its_deadline_not_when_a_worker_frees(start_daemon):
    """The only worker is held by a guest that loops until its 3 s timeout; the request
    queued behind it with a 100 ms deadline is answered 504 first, while it still loops
    (assign() would answer it too, but only once the worker is free)."""
    daemon = start_daemon({"faults": {"module": FAULTS, "max_memory_mib": 16, "timeout_ms": 3000}},
                          supervisor={"workers": 1, "pipeline": 1})
    client = daemon.client()
    stuck = client.send("faults", b"loop")
    late = client.send("faults", b"count", deadline_ms=100)
    first = client.recv(timeout=20)
    assert first.request_id == late and first.status == 504 and b"queued" in first.body
    second = client.recv(timeout=20)
    assert second.request_id == stuck and second.status == 504 and b"interrupted" in second.body
