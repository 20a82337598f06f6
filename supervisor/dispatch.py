"""Dispatch policy: which queued request goes to which worker, and in what order.

A plain object over the broker's ledger entries and worker links (duck-typed:
no sockets here). The broker owns the sockets, the in-flight ledger and
liveness; it asks `Dispatcher.plan` for (request, worker) pairs and sends
them.

Fairness, in two levels:
- across services: the services with queued work take turns (`Rotation`),
  one request per turn, and the one served goes to the back. A service with
  work queued therefore waits for at most one dispatch per other waiting
  service, onto the workers it can use, whatever their backlogs.
- across the clients of one service: its queue (`ClientQueue`) keeps one lane
  per client and takes from them in turn, so a client's wait depends on how
  many clients are waiting, not on how much the others queued.

A keyed service's queue is one lane in arrival order: requests for one key
must reach their worker in arrival order, whoever sent them; each key's
requests then run one at a time on the worker that holds the key's instance.

The stall this replaces (issue 13): the broker walked its waiting services
in the order of a Python set (by object hash, so fixed for a run and
different from run to run) and drained the first one's queue into every free
credit before looking at the next; a flooded service first in that order
took all credit each time it freed, and the other waited until the flood
ended.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice

# Packing (Dispatcher.pick): a worker at work takes more while it holds fewer
# than PACK requests and its oldest was sent less than PACK_AGE_S ago, for
# services whose requests typically take (sent to reply) less than that.
PACK = 4
PACK_AGE_S = 0.001


class ClientQueue:
    """A service's queue: one FIFO lane per client, taken from in turn.

    Quacks like the deque it replaces (append, appendleft, popleft, [0],
    len, iteration), so the broker's queue handling is unchanged. With
    `fair` False it is one lane: plain arrival order."""

    __slots__ = ("fair", "lanes", "turn", "length")

    def __init__(self, fair: bool = True):
        self.fair = fair
        self.lanes: dict[bytes, deque] = {}
        self.turn: deque[bytes] = deque()   # the clients with a lane, next first
        self.length = 0

    def _lane(self, request, front: bool) -> deque:
        client = request.client if self.fair else b""
        lane = self.lanes.get(client)
        if lane is None:
            lane = self.lanes[client] = deque()
            if front:
                self.turn.appendleft(client)
            else:
                self.turn.append(client)
        elif front and self.turn[0] != client:
            # A request put back at the head: its client's turn comes first again.
            self.turn.remove(client)
            self.turn.appendleft(client)
        return lane

    def append(self, request) -> None:
        lane = self.lanes.get(request.client if self.fair else b"")
        if lane is None:  # (the common case is inlined: append runs for every request)
            lane = self._lane(request, False)
        lane.append(request)
        self.length += 1

    def appendleft(self, request) -> None:
        self._lane(request, True).appendleft(request)
        self.length += 1

    def __getitem__(self, index: int):
        if index != 0 or not self.length:
            raise IndexError("only the head of a ClientQueue can be read")
        return self.lanes[self.turn[0]][0]

    def popleft(self):
        """The head request; its client goes to the back of the turn."""
        client = self.turn[0]
        lane = self.lanes[client]
        request = lane.popleft()
        self.length -= 1
        if lane:
            self.turn.rotate(-1)
        else:
            del self.lanes[client]
            self.turn.popleft()
        return request

    def __len__(self) -> int:
        return self.length

    def __bool__(self) -> bool:
        return self.length > 0

    def __iter__(self):
        for lane in list(self.lanes.values()):
            yield from lane

    def by_client(self) -> dict[bytes, int]:
        """Requests queued per client (keyed services: all under b"")."""
        return {client: len(lane) for client, lane in self.lanes.items()}


class Rotation:
    """The services with queued work, in the order they get their next turn.

    A set's interface (add, discard, in, len, iteration) over an ordered
    dict: a service added goes to the back; `served` sends one to the back."""

    __slots__ = ("order",)

    def __init__(self, items=()):
        self.order: dict = dict.fromkeys(items)

    def add(self, item) -> None:
        if item not in self.order:
            self.order[item] = None

    def discard(self, item) -> None:
        self.order.pop(item, None)

    def served(self, item) -> None:
        del self.order[item]
        self.order[item] = None

    def keep(self, wanted: Callable) -> None:
        """Drop the items for which wanted(item) is false (a reload removed them)."""
        for item in [i for i in self.order if not wanted(i)]:
            del self.order[item]

    def __contains__(self, item) -> bool:
        return item in self.order

    def __len__(self) -> int:
        return len(self.order)

    def __bool__(self) -> bool:
        return bool(self.order)

    def __iter__(self):
        return iter(list(self.order))


class Dispatcher:
    """Chooses where requests go; changes only queues, backlogs and key placement.

    The broker sends what `plan` yields (and marks it in flight before
    asking for the next pair, so credit is current), and sends the evictions
    left in `evictions` before the requests."""

    def __init__(self, waiting: Rotation | None = None):
        self.waiting = waiting if waiting is not None else Rotation()
        self.backlogged: set = set()         # links holding keyed requests not yet sent
        self.evictions: list[tuple] = []     # (link, service, key) decided, not yet sent

    def plan(self, now: float, is_queued: Callable) -> Iterator[tuple]:
        """(request, link) pairs to send now: backlogs first, then the services in turn.

        `is_queued(request)` says whether a request still waits (an entry
        answered meanwhile, e.g. expired, is skipped and dropped)."""
        for link in list(self.backlogged):
            if link.free > 0 and not link.retiring:
                while link.backlog and link.free > 0:
                    request = link.backlog.popleft()
                    if is_queued(request):
                        yield request, link
                if not link.backlog:
                    self.backlogged.discard(link)
        waiting = self.waiting
        if len(waiting) == 1:
            # One service: no one to take turns with; drain it in one go.
            (service,) = waiting
            if service.keyed:
                yield from self._drain(service, now, is_queued)
            else:
                queue, pick = service.queue, self.pick
                while queue.length:
                    link = pick(service, now)
                    if link is None:
                        break
                    request = queue.popleft()
                    if is_queued(request):
                        yield request, link
            if not service.queue:
                waiting.discard(service)
            return
        stuck: set = set()   # no worker can take this service's next request in this plan
        while len(stuck) < len(waiting):
            for service in waiting:
                if service in stuck:
                    continue
                pair = self._next(service, now, is_queued)
                if pair is None:
                    stuck.add(service)
                    if not service.queue:
                        waiting.discard(service)
                        stuck.discard(service)
                    continue
                waiting.served(service)
                yield pair
                break

    def _drain(self, service, now: float, is_queued: Callable) -> Iterator[tuple]:
        while True:
            pair = self._next(service, now, is_queued)
            if pair is None:
                return
            yield pair

    def _next(self, service, now: float, is_queued: Callable) -> tuple | None:
        """The service's next request and its worker, taken off the queue; None if there is
        none, or no worker can take it now (it stays at the head)."""
        queue = service.queue
        while queue:
            request = queue[0]
            if not is_queued(request):
                queue.popleft()
                continue
            if service.keyed:
                link = self.route_keyed(service, request)
                if link is None:
                    return None
                queue.popleft()
                # (a gone worker's link keeps its keys while its fence says "not yet": their
                # requests wait in its backlog, never sent; BrokerCore.cut)
                if link.free > 0 and not link.backlog and not link.retiring:
                    return request, link
                link.backlog.append(request)
                self.backlogged.add(link)
                continue
            link = self.pick(service, now)
            if link is None:
                return None
            queue.popleft()
            return request, link
        return None

    def pick(self, service, now: float):
        """The worker for a service's next request: one already at work and keeping up, else
        the least loaded (the one used last among equals).

        Packing spares wake-ups: at moderate load on a few cores, workers
        woken in turn for every request spend more on being woken than on the
        work (README, "Performance": 12% less CPU per request at 7,700 req/s). A worker is
        keeping up while its oldest request left less than PACK_AGE_S ago,
        so one stuck in a slow call is passed over at once, as HAProxy's
        `balance first` would not. A service whose requests typically take
        longer is not packed at all: a burst of them is spread at once."""
        pack = service.typical_s < PACK_AGE_S
        best = None
        for link in service.links:
            if link.retiring or link.free <= 0:
                continue
            inflight = link.inflight
            if pack and inflight and len(inflight) < PACK and \
                    now - next(iter(inflight.values())).sent < PACK_AGE_S:
                return link
            if best is None or (len(inflight), -link.last_assigned) < (len(best.inflight), -best.last_assigned):
                best = link
        return best

    def route_keyed(self, service, request):
        """The worker of the request's key (placing the key on the least loaded worker if it
        has none); None if no worker can take keys now."""
        key = request.key
        link = service.affinity.get(key)
        if link is None:
            candidates = [l for l in service.links if not l.retiring]
            if not candidates:
                return None
            link = min(candidates, key=lambda l: (l.key_count, len(l.inflight) + len(l.backlog)))
            service.affinity[key] = link
            held = link.keys.setdefault(service.name, {})
            held[key] = None
            if service.app.max_keys and len(held) > service.app.max_keys:
                self.evict_least_recent(link, service, held, key)
        else:
            held = link.keys[service.name]
            del held[key]
            held[key] = None  # now the most recent
        return link

    def evict_least_recent(self, link, service, held: dict, new_key: bytes) -> None:
        """Over max_keys: the worker drops the instance of its least recently used key
        that has no request on it (the key's state goes; its next request starts afresh,
        on whichever worker is picked then)."""
        busy = {new_key}
        busy.update(r.key for r in link.inflight.values() if r.service is service)
        busy.update(r.key for r in link.backlog if r.service is service)
        for key in islice(held, len(busy) + 1):
            if key not in busy:
                break
        else:
            return  # all busy: retried when the next new key comes
        del held[key]
        service.affinity.pop(key, None)  # (a key of a service removed and re-added by a reload has none)
        service.evicted += 1
        self.evictions.append((link, service, key))
