"""The dispatch policy on its own: no sockets, no processes; workers and services are plain objects.

What it must hold whatever the backlogs: a service with work queued gets a
worker within a bounded number of dispatches (one per other waiting
service), the clients of one service take turns, and a keyed service's
requests keep their arrival order.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from corral.dispatch import ClientQueue, Dispatcher, Rotation


@dataclass(eq=False)
class Req:
    client: bytes
    service: "Svc"
    key: bytes | None = None
    queued: bool = True
    sent: float = 0.0


@dataclass(eq=False)
class App:
    max_keys: int = 0


@dataclass(eq=False)
class Svc:
    name: bytes
    keyed: bool = False
    links: list = field(default_factory=list)
    typical_s: float = 1.0    # not packed, unless a test says so
    affinity: dict = field(default_factory=dict)
    app: App = field(default_factory=App)
    evicted: int = 0
    queue: ClientQueue = None

    def __post_init__(self):
        self.queue = ClientQueue(fair=not self.keyed)


@dataclass(eq=False)
class Link:
    name: str
    capacity: int
    retiring: bool = False
    last_assigned: float = 0.0
    inflight: dict = field(default_factory=dict)
    backlog: deque = field(default_factory=deque)
    keys: dict = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)

    @property
    def key_count(self) -> int:
        return sum(len(held) for held in self.keys.values())


def is_queued(request: Req) -> bool:
    return request.queued


def run(dispatcher: Dispatcher, now: float = 0.0) -> list[tuple[Req, Link]]:
    """One dispatch, as the broker does it: each pair is marked in flight before the next."""
    sent = []
    for request, link in dispatcher.plan(now, is_queued):
        request.queued = False
        request.sent = now
        link.inflight[id(request)] = request
        link.last_assigned = now
        sent.append((request, link))
    return sent


def enqueue(dispatcher: Dispatcher, service: Svc, client: bytes, count: int = 1, key: bytes | None = None):
    requests = [Req(client, service, key) for _ in range(count)]
    for request in requests:
        service.queue.append(request)
    dispatcher.waiting.add(service)
    return requests


def finish(link: Link, request: Req) -> None:
    del link.inflight[id(request)]


def test_a_flooded_service_does_not_keep_the_workers_from_a_quiet_one():
    """Issue 13's stall: the flooded service came first and took every credit as it freed."""
    workers = [Link("w0", 16), Link("w1", 16)]
    flood, quiet = Svc(b"flood", links=workers), Svc(b"quiet", links=workers)
    dispatcher = Dispatcher()
    enqueue(dispatcher, flood, b"f", 10_000)
    assert len(run(dispatcher)) == 32            # the flood holds every credit
    wanted = enqueue(dispatcher, quiet, b"q", 20)
    served = []
    for _ in range(100):                         # one reply at a time frees one credit
        link = workers[len(served) % 2]
        finish(link, next(iter(link.inflight.values())))
        served += [r for r, _ in run(dispatcher) if r.service is quiet]
        if len(served) == 20:
            break
    assert served == wanted
    # every other credit freed went to the quiet service while it had work
    assert flood.queue and len(flood.queue) == 10_000 - 32 - 20


def test_the_clients_of_one_service_take_turns():
    worker = Link("w0", 1)
    service = Svc(b"echo", links=[worker])
    dispatcher = Dispatcher()
    heavy = enqueue(dispatcher, service, b"heavy", 1000)
    light = enqueue(dispatcher, service, b"light", 5)
    order = []
    while len(order) < 10:
        (request, link), = run(dispatcher)
        order.append(request)
        finish(link, request)
    assert order == [x for pair in zip(heavy[:5], light) for x in pair]


def test_a_request_put_back_at_the_head_comes_first_again():
    queue = ClientQueue()
    service = Svc(b"s")
    a1, a2, b1 = Req(b"a", service), Req(b"a", service), Req(b"b", service)
    for request in (a1, a2, b1):
        queue.append(request)
    assert queue.popleft() is a1 and queue.popleft() is b1
    queue.appendleft(b1)       # b1 handed back by a retiring worker
    assert [queue.popleft() for _ in range(len(queue))] == [b1, a2]
    assert not queue and list(queue) == []


def test_a_keyed_service_keeps_arrival_order_for_a_key_whoever_sent_it():
    worker = Link("w0", 1)
    service = Svc(b"counter", keyed=True, links=[worker])
    dispatcher = Dispatcher()
    arrivals = []
    for client, key in [(b"a", b"k2"), (b"a", b"k1"), (b"b", b"k1"), (b"a", b"k1"), (b"b", b"k2")]:
        arrivals += enqueue(dispatcher, service, client, key=key)
    sent = []
    for _ in range(20):
        for request, link in run(dispatcher):
            sent.append(request)
            finish(link, request)
    assert sent == arrivals                     # one worker: the order it was all sent in
    assert set(service.affinity) == {b"k1", b"k2"}


def test_over_max_keys_the_policy_decides_the_eviction_and_the_broker_sends_it():
    worker = Link("w0", 4)
    service = Svc(b"counter", keyed=True, links=[worker], app=App(max_keys=2))
    dispatcher = Dispatcher()
    for key in (b"a", b"b"):
        enqueue(dispatcher, service, b"c", key=key)
        (request, link), = run(dispatcher)
        finish(link, request)
    enqueue(dispatcher, service, b"c", key=b"c")
    run(dispatcher)
    assert dispatcher.evictions == [(worker, service, b"a")]
    assert set(service.affinity) == {b"b", b"c"} and service.evicted == 1


def simulate(rng: random.Random) -> None:
    """Random services over random subsets of random workers, random backlogs, credit freed
    at random: while a service has work queued, at most one request of each other waiting
    service goes, onto the workers it could use, before one of its own does."""
    workers = [Link(f"w{i}", rng.randint(1, 4)) for i in range(rng.randint(1, 4))]
    services = []
    for i in range(rng.randint(2, 6)):
        links = rng.sample(workers, rng.randint(1, len(workers)))
        services.append(Svc(b"s%d" % i, links=links, typical_s=rng.choice([0.0, 1.0])))
    dispatcher = Dispatcher()
    for service in services:
        for client in range(rng.randint(1, 3)):
            enqueue(dispatcher, service, b"c%d" % client, rng.choice([0, 1, 5, 50, 2000]))
    # per service: dispatches to others onto its workers since it last got one (or was queued)
    passed_over = {service: [] for service in services}
    for step in range(400):
        for _ in range(rng.randint(0, 3)):
            busy = [w for w in workers if w.inflight]
            if busy:
                link = rng.choice(busy)
                finish(link, rng.choice(list(link.inflight.values())))
        for request, link in run(dispatcher, now=step * 0.01):
            got = request.service
            passed_over[got].clear()
            for other in services:
                if other is not got and other.queue and link in other.links:
                    passed_over[other].append(got)
                    assert len(set(passed_over[other])) == len(passed_over[other]) <= len(services) - 1, \
                        f"{other.name} passed over by {[s.name for s in passed_over[other]]}"


@pytest.mark.parametrize("seed", range(300))
def test_bounded_wait_on_generated_backlogs(seed):
    simulate(random.Random(seed))


def test_rotation_is_a_set_in_turn_order():
    rotation = Rotation()
    for item in "abc":
        rotation.add(item)
    rotation.add("a")
    assert list(rotation) == ["a", "b", "c"]
    rotation.served("a")
    assert list(rotation) == ["b", "c", "a"]
    rotation.keep(lambda i: i != "c")
    rotation.discard("z")
    assert list(rotation) == ["b", "a"] and "a" in rotation and len(rotation) == 2
