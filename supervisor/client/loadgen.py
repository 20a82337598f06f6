"""The load generator behind `corral bench` and bench/run.py.

    from corral.client import loadgen
    result = loadgen.run("ipc:///tmp/x/front.sock", b"echo", b"hello",
                         requests=20000, concurrency=32, clients=1, key=None, progress=True)
    print(result.report())          # req/s, p50/p90/p99/max latency (ms), count by status
    result.failed                   # non-200 replies + missing replies (+ stray replies)

Cheap on purpose: the client shares the machine's cores with the server it
measures. Each client is one raw pyzmq DEALER socket driven by one loop:

* a request goes out, and every reply waiting comes in, with one call each
  (supervisor/wire/frames.py: `send_frames`, `drain`; the broker's own C
  extension where it is built), never `send_multipart`/`recv_multipart`:
  those check every frame's flags (`getsockopt(RCVMORE)` per frame) and
  cost 6x as much (a 5-frame request plus its 4-frame reply: ~15 us against
  ~2.2 us frame by frame, measured here on inproc). A reply must have its
  framing's number of frames and first frame, so a reply of another shape is
  noticed, not misread;
* closed loop (the default): `concurrency` requests in flight per client,
  a new one sent as each reply arrives; the loop blocks in `recv` (the GIL
  is released there) for the first reply it waits for, so an idle client
  costs nothing;
* open loop (`rate=`): requests leave on a fixed schedule whatever the
  replies do (a server that stalls cannot slow the sender down, so the
  latencies are not flattered: no coordinated omission); the loop waits on
  the socket's file descriptor with `select`, for sub-millisecond timing,
  and reports how late the sender itself fell behind its schedule;
* each request's latency is `time.perf_counter_ns()` from just before it
  is sent to just after the call that read its reply returns.

`clients` > 1: each client is its own process (forked, with its own ZeroMQ
context made after the fork), because Python threads share one GIL: two
client threads cannot run their loops at once and contend for the GIL on
every reply (see bench/README.md for the measurement). `spawn="thread"`
runs them as threads instead, for comparison.

The framing is a parameter, so that corral and the baselines it is compared
with are loaded by exactly this code:

  native  corral's own dialect   [CORRAL1, id, service, meta, body] -> [CORRAL1, id, status, body]
  echo    a plain ROUTER echo    [id, body]                          -> [id, body]          (status 200)
  reqrep  REQ/REP envelopes      ["", id, body]                      -> ["", id, body]      (status 200)
          (a DEALER speaking to REP sockets, e.g. through zmq.proxy)
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.connection
import select
import sys
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

import zmq

from corral.client.native import CurveKeys
from corral.wire.frames import drain, send_frames

NATIVE = b"CORRAL1"
OK = b"200"
# Status recorded for a reply whose framing does not carry one (echo, reqrep).
IMPLIED_OK = OK
DRAIN_LIMIT = 256   # replies taken per wake-up at most


@dataclass(frozen=True)
class Framing:
    """How a request is framed around its id, and where a reply keeps its id and status."""
    name: str
    head: tuple[bytes, ...]      # frames before the request id
    tail: tuple[bytes, ...]      # frames after it (at least one: the body)
    reply_frames: int            # how many frames every reply has
    id_at: int                   # index of the request id in a reply
    status_at: int | None        # index of the status in a reply (None: always 200)
    first: bytes | None          # what a reply's first frame must be (None: not checked)


def framing(name: str, service: bytes = b"", body: bytes = b"", meta: bytes = b"") -> Framing:
    if name == "native":
        return Framing(name, (NATIVE,), (service, meta, body), 4, 1, 2, NATIVE)
    if name == "echo":
        return Framing(name, (), (body,), 2, 0, None, None)
    if name == "reqrep":
        return Framing(name, (b"",), (body,), 3, 1, None, b"")
    raise ValueError(f"unknown framing {name!r} (native, echo, reqrep)")


FRAMINGS = ("native", "echo", "reqrep")


class ProtocolError(Exception):
    """A reply that does not have the framing's shape."""


# --- one client: a socket and a loop --------------------------------------------------

@dataclass
class ClientStats:
    """What one client saw. Latencies in ns, in the order the replies came."""
    latencies: array = field(default_factory=lambda: array("q"))
    statuses: Counter = field(default_factory=Counter)
    sent: int = 0
    received: int = 0
    stray: int = 0             # replies with an unknown or repeated id
    started_ns: int = 0
    ended_ns: int = 0
    max_lag_ns: int = 0        # open loop: how late a send left after its scheduled time
    late_sends: int = 0        # open loop: sends more than 1 ms behind schedule
    error: str | None = None

    def record(self, replies: list[tuple[bytes, bytes]], sent_at: list[int], now: int) -> int:
        """Match replies read at `now` (ns) to their requests: `sent_at` holds each request's
        send time by index, 0 once answered. Returns how many replies answered a request;
        a reply with an unknown or repeated id counts as stray."""
        latencies, statuses = self.latencies, self.statuses
        received, requests = self.received, len(sent_at)
        try:
            for request_id, status in replies:
                index = int(request_id)
                began = sent_at[index] if 0 <= index < requests else 0
                if not began:
                    self.stray += 1
                    continue
                sent_at[index] = 0
                latencies[received] = now - began
                received += 1
                statuses[status] = statuses.get(status, 0) + 1
        finally:   # a reply id that is not a number raises ValueError: what came before it counts
            answered, self.received = received - self.received, received
        return answered

    def pack(self) -> dict:
        values = self.__dict__.copy()
        values["latencies"] = self.latencies.tobytes()
        values["statuses"] = dict(self.statuses)
        return values

    @classmethod
    def unpack(cls, values: dict) -> "ClientStats":
        stats = cls(**{**values, "latencies": array("q"), "statuses": Counter(values["statuses"])})
        stats.latencies.frombytes(values["latencies"])
        return stats


class Client:
    """One DEALER socket and the loops that drive it."""

    def __init__(self, context: zmq.Context, endpoint: str, frame: Framing, timeout_s: float,
                 progress: "Progress | None" = None, slot: int = 0, keys: CurveKeys | None = None):
        self.frame = frame
        self.timeout_s = timeout_s
        self.progress = progress
        self.slot = slot
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, max(1, int(timeout_s * 1000)))
        if keys is not None:
            keys.apply(self.socket)
        self.socket.connect(endpoint)

    def close(self) -> None:
        self.socket.close(linger=0)

    def _sender(self):
        """send(request_id): the request, its frames in one call."""
        socket = self.socket
        head, tail = self.frame.head, self.frame.tail

        def send_request(request_id: bytes) -> None:
            send_frames(socket, (*head, request_id, *tail))
        return send_request

    def _receiver(self):
        """receive(block) -> [(request_id, status), ...]: every reply waiting, at most
        DRAIN_LIMIT. block: wait for the first (zmq.Again after the timeout). Raises
        ProtocolError on a reply of the wrong shape."""
        socket = self.socket
        recv, more = socket.recv, zmq.RCVMORE
        f = self.frame
        count, id_at, status_at, first = f.reply_frames, f.id_at, f.status_at, f.first

        def reply(frames: list[bytes]) -> tuple[bytes, bytes]:
            if len(frames) != count or (first is not None and frames[0] != first):
                raise ProtocolError(f"a {f.name} reply has {count} frames"
                                    f"{'' if first is None else f', the first {first!r}'}: {frames[:4]!r}")
            return frames[id_at], (IMPLIED_OK if status_at is None else frames[status_at])

        def receive(block: bool) -> list[tuple[bytes, bytes]]:
            replies = []
            if block:
                frames = [recv()]
                while socket.getsockopt(more):
                    frames.append(recv())
                replies.append(reply(frames))
            replies.extend(reply(frames) for frames in drain(socket, DRAIN_LIMIT - len(replies)))
            return replies
        return receive

    def connect_check(self) -> None:
        """One request, its reply awaited: the connection is up and the server answers."""
        self._sender()(b"0")
        try:
            ((request_id, _), *_) = self._receiver()(True)
        except zmq.Again:
            raise TimeoutError(f"no reply within {self.timeout_s:g} s") from None
        if request_id != b"0":
            raise ProtocolError(f"reply to request id {request_id!r}, expected b'0'")

    def closed_loop(self, requests: int, concurrency: int, report: bool = True) -> ClientStats:
        """`concurrency` requests in flight; a new one for each reply, until `requests` are answered."""
        stats = ClientStats(latencies=array("q", bytes(8 * requests)))
        send, receive = self._sender(), self._receiver()
        clock = time.perf_counter_ns
        sent_at = [0] * requests
        sent = received = 0
        progress, slot = (self.progress if report else None), self.slot
        stats.started_ns = clock()
        try:
            for _ in range(min(concurrency, requests)):
                sent_at[sent] = clock()
                send(b"%d" % sent)
                sent += 1
            while received < requests:
                try:
                    replies = receive(True)
                except zmq.Again:
                    stats.error = f"no reply for {self.timeout_s:g} s: {sent - received} missing"
                    break
                answered = stats.record(replies, sent_at, clock())
                for _ in range(min(answered, requests - sent)):   # one new request per answer
                    sent_at[sent] = clock()
                    send(b"%d" % sent)
                    sent += 1
                if progress is not None and received >> 8 != stats.received >> 8:
                    progress.update(slot, stats.received)
                received = stats.received
        except (ProtocolError, ValueError) as exc:
            stats.error = f"{type(exc).__name__}: {exc}"
        stats.ended_ns = clock()
        del stats.latencies[stats.received:]
        stats.sent = sent
        if progress is not None:
            progress.update(slot, stats.received)
        return stats

    def open_loop(self, requests: int, rate: float, max_in_flight: int = 100_000) -> ClientStats:
        """Send `requests` at `rate` per second on a fixed schedule; take replies as they come."""
        stats = ClientStats(latencies=array("q", bytes(8 * requests)))
        send, receive = self._sender(), self._receiver()
        socket = self.socket
        fd = socket.getsockopt(zmq.FD)
        clock = time.perf_counter_ns
        interval = 1e9 / rate
        sent_at = [0] * requests
        sent = received = late = 0
        max_lag = 0
        progress, slot = self.progress, self.slot
        timeout_ns = int(self.timeout_s * 1e9)
        start = stats.started_ns = clock()
        last_reply = start
        try:
            while received < requests:
                now = clock()
                # Everything due leaves now, each stamped with its real send time.
                while sent < requests and sent - received < max_in_flight:
                    due = start + int(sent * interval)
                    if due > now:
                        break
                    lag = now - due
                    if lag > max_lag:
                        max_lag = lag
                    if lag > 1_000_000:
                        late += 1
                    sent_at[sent] = now
                    send(b"%d" % sent)
                    sent += 1
                    now = clock()
                # Every reply waiting now. (The fd only signals changes: the
                # socket must have said "nothing more" before the fd is waited on.)
                replies = receive(False)
                now = clock()
                if stats.record(replies, sent_at, now):
                    last_reply = now
                if progress is not None and received >> 8 != stats.received >> 8:
                    progress.update(slot, stats.received)
                received = stats.received
                if received >= requests:
                    break
                if now - last_reply > timeout_ns and sent - received > 0 and \
                        (sent >= requests or sent - received >= max_in_flight):
                    stats.error = f"no reply for {self.timeout_s:g} s: {sent - received} missing"
                    break
                if sent < requests and sent - received < max_in_flight:
                    wait = (start + int(sent * interval) - clock()) / 1e9
                else:
                    wait = 0.1
                if wait > 0 and len(replies) < DRAIN_LIMIT:
                    select.select([fd], [], [], wait)
        except (ProtocolError, ValueError) as exc:
            stats.error = f"{type(exc).__name__}: {exc}"
        stats.ended_ns = clock()
        del stats.latencies[stats.received:]
        stats.sent = sent
        stats.max_lag_ns, stats.late_sends = max_lag, late
        if progress is not None:
            progress.update(slot, stats.received)
        return stats


# --- the result -----------------------------------------------------------------------

def percentile(ordered, p: float) -> float:
    """Nearest-rank percentile of an ordered sequence (0 if empty)."""
    if not ordered:
        return 0
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Result:
    service: str
    endpoint: str
    framing: str
    requests: int              # asked for
    concurrency: int
    clients: int
    rate: float | None         # open loop: the offered rate (req/s), else None
    sent: int
    received: int
    stray: int
    statuses: Counter
    elapsed_s: float
    latencies_ms: array        # ordered (an array, not a list: nothing for the GC to walk)
    max_lag_ms: float = 0.0
    late_sends: int = 0
    errors: list[str] = field(default_factory=list)
    warmup: int = 0            # requests per client sent and answered before the timed run (the check's too)

    @property
    def missing(self) -> int:
        return self.requests - self.received

    @property
    def failed(self) -> int:
        """Non-200 replies, missing replies, and replies that answered no request."""
        return sum(n for status, n in self.statuses.items() if status != 200) + self.missing + self.stray

    @property
    def throughput(self) -> float:
        return self.received / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    @property
    def max_ms(self) -> float:
        return self.latencies_ms[-1] if self.latencies_ms else 0.0

    @property
    def mean_ms(self) -> float:
        return sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else 0.0

    def summary(self) -> dict:
        return {"framing": self.framing, "requests": self.requests, "received": self.received,
                "concurrency": self.concurrency, "clients": self.clients, "rate": self.rate,
                "req_per_s": round(self.throughput, 1), "elapsed_s": round(self.elapsed_s, 4),
                "p50_ms": self.pct(50), "p90_ms": self.pct(90), "p99_ms": self.pct(99),
                "max_ms": self.max_ms, "mean_ms": self.mean_ms,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "missing": self.missing, "stray": self.stray, "failed": self.failed,
                "max_lag_ms": self.max_lag_ms, "late_sends": self.late_sends, "errors": self.errors}

    def report(self) -> str:
        load = (f"open loop at {self.rate:.0f} req/s offered" if self.rate
                else f"{self.concurrency} in flight each (closed loop)")
        clients = f"{self.clients} client{'s' if self.clients != 1 else ''}"
        warmup = (f" (after {self.warmup} warm-up request{'s' if self.warmup != 1 else ''} per client, "
                  f"not counted here)" if self.warmup else "")
        lines = [
            f"{self.service} at {self.endpoint} ({self.framing}): {self.requests} requests, "
            f"{clients}, {load}{warmup}",
            f"  throughput  {self.throughput:,.0f} req/s  ({self.received} replies in {self.elapsed_s:.3f} s)",
            f"  latency ms  p50 {self.pct(50):.3f}  p90 {self.pct(90):.3f}  p99 {self.pct(99):.3f}  "
            f"max {self.max_ms:.3f}  mean {self.mean_ms:.3f}",
            "  status      " + (", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())) or "none"),
        ]
        if self.rate:
            lines.append(f"  sender lag  max {self.max_lag_ms:.3f} ms, {self.late_sends} sends over 1 ms late")
        if self.missing or self.stray:
            lines.append(f"  missing     {self.missing}    stray replies {self.stray}")
        lines.append(f"  failed      {self.failed}")
        lines += [f"  error       {e}" for e in self.errors]
        return "\n".join(lines)


def merge(stats: list[ClientStats], **fields) -> Result:
    latencies = array("q")
    statuses: Counter = Counter()
    for s in stats:
        latencies.extend(s.latencies)
        for status, n in s.statuses.items():
            statuses[_status_code(status)] += n
    ran = [s for s in stats if s.ended_ns]
    elapsed_ns = (max(s.ended_ns for s in ran) - min(s.started_ns for s in ran)) if ran else 0
    return Result(sent=sum(s.sent for s in stats), received=sum(s.received for s in stats),
                  stray=sum(s.stray for s in stats), statuses=statuses, elapsed_s=elapsed_ns / 1e9,
                  latencies_ms=array("d", sorted(v / 1e6 for v in latencies)),
                  max_lag_ms=max((s.max_lag_ns for s in stats), default=0) / 1e6,
                  late_sends=sum(s.late_sends for s in stats),
                  errors=[s.error for s in stats if s.error], **fields)


def _status_code(status: bytes | int | str) -> int:
    try:
        return int(status)
    except (TypeError, ValueError):
        return 0


# --- progress -------------------------------------------------------------------------

class Progress:
    """A carriage-return text bar on stderr. Clients call update(slot, done); the bar is drawn
    at most 10 times a second, by the client itself when it is the only one in this process,
    else by the parent's wait loop (counts in shared memory when the clients are processes)."""

    WIDTH = 30

    def __init__(self, total: int, slots: int, shared=None, stream=None):
        self.total = max(total, 1)
        self.counts = shared if shared is not None else [0] * slots
        self.self_drawn = slots == 1
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.last_draw = 0.0

    def update(self, slot: int, done: int) -> None:
        self.counts[slot] = done
        if self.self_drawn:
            self.draw()

    def draw(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        done = sum(self.counts)
        filled = int(self.WIDTH * min(done, self.total) / self.total)
        rate = done / (now - self.started) if now > self.started else 0.0
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                          f"{done}/{self.total} {rate:,.0f} req/s ")
        if final:
            self.stream.write("\n")
        self.stream.flush()


class _SharedSlot:
    """A forked client's progress: its count in the parent's shared array, nothing drawn."""

    def __init__(self, shared, slot: int):
        self.shared, self.slot = shared, slot

    def update(self, _slot: int, done: int) -> None:
        self.shared[self.slot] = done


# --- running clients ------------------------------------------------------------------

def _client_run(endpoint: str, frame: Framing, requests: int, concurrency: int, rate: float | None,
                timeout_s: float, warmup: int, progress: Progress | None, slot: int,
                context: zmq.Context, ready=None, go=None, keys: CurveKeys | None = None) -> ClientStats:
    client = Client(context, endpoint, frame, timeout_s, progress, slot, keys)
    try:
        try:
            client.connect_check()
            if warmup:
                client.closed_loop(warmup, concurrency, report=False)   # not counted
        except (TimeoutError, ProtocolError) as exc:
            if ready is not None:
                ready()
            return ClientStats(error=f"{endpoint}: {exc}")
        if ready is not None:
            ready()
            go()
        if rate:
            return client.open_loop(requests, rate)
        return client.closed_loop(requests, concurrency)
    finally:
        client.close()


def _process_main(conn, args: tuple, ready_barrier, go_event, counts) -> None:
    # A forked child: it dies with its parent, and makes its own context, here, after the fork.
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)   # PR_SET_PDEATHSIG, SIGKILL (Linux)
    except (OSError, AttributeError):
        pass
    context = zmq.Context()
    try:
        endpoint, frame, requests, concurrency, rate, timeout_s, warmup, slot, keys = args
        progress = _SharedSlot(counts, slot) if counts is not None else None
        stats = _client_run(endpoint, frame, requests, concurrency, rate, timeout_s, warmup, progress, 0,
                            context, ready=lambda: ready_barrier.wait(), go=lambda: go_event.wait(),
                            keys=keys)
        conn.send(stats.pack())
    except BaseException as exc:  # report, never hang the parent
        try:
            conn.send(ClientStats(error=f"{type(exc).__name__}: {exc}").pack())
        except Exception:
            pass
    finally:
        conn.close()
        context.destroy(linger=0)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(endpoint: str, service: bytes, body: bytes, requests: int, concurrency: int, clients: int = 1,
        key: str | None = None, progress: bool = False, *, framing_name: str = "native",
        rate: float | None = None, timeout_s: float = 10.0, warmup: int | None = None,
        spawn: str = "process", deadline_ms: int | None = None, keys: CurveKeys | None = None) -> Result:
    """Load `service` at `endpoint` and measure it.

    requests     how many requests in all (split evenly across clients)
    concurrency  requests in flight per client (closed loop)
    clients      DEALER sockets, each driven by its own process (spawn="process") or thread
    rate         open loop instead: requests per second in all, on a fixed schedule
    timeout_s    a client that gets no reply for this long gives up; the rest count as missing
    keys         CURVE: the clients' key pair and the server's public key
    warmup       requests each client sends (and waits for) before the timed run;
                 default: 4 x concurrency, at most 1000
    """
    if requests < 1 or concurrency < 1 or clients < 1:
        raise ValueError("requests, concurrency and clients must be at least 1")
    clients = min(clients, requests)
    meta = {}
    if key is not None:
        meta["key"] = key
    if deadline_ms is not None:
        meta["deadline_ms"] = deadline_ms
    frame = framing(framing_name, service, body, json.dumps(meta).encode() if meta else b"")
    if warmup is None:
        warmup = min(4 * concurrency, 1000)
    shares = _split(requests, clients)
    rates = [rate * share / requests for share in shares] if rate else [None] * clients
    fields = dict(service=service.decode(errors="replace"), endpoint=endpoint, framing=framing_name,
                  requests=requests, concurrency=concurrency, clients=clients, rate=rate,
                  warmup=1 + warmup)   # connect_check's request, then the warm-up proper
    if clients == 1:
        context = zmq.Context()
        bar = Progress(requests, 1) if progress else None
        try:
            stats = [_client_run(endpoint, frame, requests, concurrency, rate, timeout_s, warmup, bar, 0,
                                 context, keys=keys)]
        finally:
            context.destroy(linger=0)
            if bar is not None:
                bar.draw(final=True)
        return merge(stats, **fields)
    if spawn == "thread":
        return _run_threads(endpoint, frame, shares, rates, concurrency, timeout_s, warmup, progress, fields,
                            keys)
    if spawn != "process":
        raise ValueError(f"spawn must be 'process' or 'thread', not {spawn!r}")
    return _run_processes(endpoint, frame, shares, rates, concurrency, timeout_s, warmup, progress, fields,
                          keys)


def _run_threads(endpoint, frame, shares, rates, concurrency, timeout_s, warmup, progress, fields,
                 keys=None) -> Result:
    context = zmq.Context()
    bar = Progress(sum(shares), len(shares)) if progress else None
    barrier = threading.Barrier(len(shares) + 1)
    go = threading.Event()
    stats: list[ClientStats | None] = [None] * len(shares)

    def client(slot: int) -> None:
        try:
            stats[slot] = _client_run(endpoint, frame, shares[slot], concurrency, rates[slot], timeout_s,
                                      warmup, bar, slot, context, ready=barrier.wait, go=go.wait, keys=keys)
        except BaseException as exc:
            stats[slot] = ClientStats(error=f"{type(exc).__name__}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(shares))]
    try:
        for thread in threads:
            thread.start()
        try:
            barrier.wait(timeout=timeout_s + 5)
        except threading.BrokenBarrierError:
            pass
        go.set()
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(0.1)
            if bar is not None:
                bar.draw()
    finally:
        go.set()
        for thread in threads:
            thread.join(timeout_s + 1)
        if bar is not None:
            bar.draw(final=True)
        context.destroy(linger=0)
    return merge([s or ClientStats(error="client thread did not finish") for s in stats], **fields)


def _run_processes(endpoint, frame, shares, rates, concurrency, timeout_s, warmup, progress, fields,
                   keys=None) -> Result:
    mp = multiprocessing.get_context("fork")
    n = len(shares)
    counts = mp.RawArray("q", n) if progress else None
    barrier = mp.Barrier(n + 1)
    go = mp.Event()
    children, pipes = [], []
    bar = Progress(sum(shares), n, shared=counts) if progress else None
    results: dict[int, ClientStats] = {}
    try:
        for slot in range(n):
            parent_end, child_end = mp.Pipe(duplex=False)
            args = (endpoint, frame, shares[slot], concurrency, rates[slot], timeout_s, warmup, slot, keys)
            child = mp.Process(target=_process_main, args=(child_end, args, barrier, go, counts),
                               name=f"loadgen-{slot}", daemon=True)
            child.start()
            child_end.close()
            children.append(child)
            pipes.append(parent_end)
        try:
            barrier.wait(timeout=timeout_s + 10)   # every child connected and warmed up
        except threading.BrokenBarrierError:
            pass
        go.set()
        pending = dict(enumerate(pipes))
        while pending:
            ready = multiprocessing.connection.wait(list(pending.values()), timeout=0.1)
            for slot, pipe in list(pending.items()):
                if pipe in ready:
                    try:
                        results[slot] = ClientStats.unpack(pipe.recv())
                    except EOFError:
                        results[slot] = ClientStats(error=f"client process {slot} died")
                    del pending[slot]
            for slot, pipe in list(pending.items()):
                if not children[slot].is_alive() and not pipe.poll():
                    results[slot] = ClientStats(error=f"client process {slot} exited "
                                                      f"with {children[slot].exitcode}")
                    del pending[slot]
            if bar is not None:
                bar.draw()
    finally:
        go.set()
        for child in children:
            child.join(2)
            if child.is_alive():
                child.kill()
                child.join()
        for pipe in pipes:
            pipe.close()
        if bar is not None:
            bar.draw(final=True)
    return merge([results.get(i, ClientStats(error="no result")) for i in range(n)], **fields)


if __name__ == "__main__":  # python -m corral.client.loadgen ENDPOINT SERVICE [BODY]: a quick look
    import argparse
    parser = argparse.ArgumentParser(prog="python -m corral.client.loadgen")
    parser.add_argument("endpoint")
    parser.add_argument("service")
    parser.add_argument("body", nargs="?", default="hello")
    parser.add_argument("-n", "--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--framing", choices=FRAMINGS, default="native")
    parser.add_argument("--rate", type=float)
    parser.add_argument("--spawn", choices=("process", "thread"), default="process")
    parser.add_argument("--key")
    a = parser.parse_args()
    result = run(a.endpoint, a.service.encode(), a.body.encode(), a.requests, a.concurrency, a.clients,
                 a.key, progress=sys.stderr.isatty(), framing_name=a.framing, rate=a.rate, spawn=a.spawn)
    print(result.report())
    sys.exit(0 if result.failed == 0 else 1)
