"""Chaos: healthy load while guests fail in every way and workers are SIGKILLed.

At the end every healthy request got 200 with its own body, every faulty
request got its own status, every worker that aborted under on_abort =
"respawn" was replaced, the daemon's pid never changed and nothing is left
behind when it stops. Alarms run through it all (docs/alarms.md): keyed
scopes set alarms whose handler adds one to a durable count (some trap or
fail on their first run), and each scope's count ends equal to the alarms
its client set, none dropped.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from harness import FAULTS, GUESTS
from corral.client import NoReply

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

CHAOS_SECONDS = 20
HEALTHY_CLIENTS = 3
IN_FLIGHT = 8

# body -> expected status (the faults guest, docs/guest-abi.md's outcomes table)
FAULT_KINDS = {
    b"ok": 200, b"error": 422, b"panic": 500, b"throw": 500, b"unreachable": 502, b"oob": 502,
    b"div0": 502, b"recurse": 502, b"grow": 502, b"growsoft": 422, b"badptr": 502, b"badlen": 502,
    b"empty": 502, b"badstatus": 502, b"loop": 504,
}
# (service, request) -> (status, what the reply body holds): compiled guests
# that unwind (C++ throw, C corral_panic) and one that catches its own throw.
# {n} makes every request's answer its own.
CXX_UNWINDS = {
    ("cpp_throws", "throw chaos {n}"): (500, "chaos {n}"),
    ("cpp_throws", "catch chaos {n}"): (200, "caught chaos {n}, 2 guards destroyed"),
    ("c_panics", "panic chaos {n}"): (500, "chaos {n} (count "),
}
WORKER_PID = re.compile(rb"\(pid (\d+)\)")   # in a 502 for a request its dead worker held
# key -> how its alarm handler behaves (guests/alarm.wat's modes): o succeeds, r fails
# twice then succeeds, u traps once (an abort) then succeeds
ALARM_MODES = {"ok1": b"o", "ok2": b"o", "fails": b"r", "traps": b"u"}
ABORTS = {b"unreachable", b"oob", b"div0", b"recurse", b"grow", b"badptr", b"badlen", b"empty",
          b"badstatus", b"loop"}


def test_chaos(start_daemon, built_guests, unwind_guests):
    daemon = start_daemon(
        {"echo": {"module": GUESTS / "echo.wat"},
         # a compiled guest whose panics are real Wasm exceptions (panic=unwind)
         "rust_unwind": {"module": built_guests["rust_counter_unwind"], "instances": "keyed"},
         "cpp_throws": {"module": unwind_guests["cpp_throws"]},
         "c_panics": {"module": unwind_guests["c_panics"]},
         "faults": {"module": FAULTS, "max_memory_mib": 16, "timeout_ms": 300},   # on_abort = respawn
         "faults_inproc": {"module": FAULTS, "max_memory_mib": 16, "timeout_ms": 300,
                           "on_abort": "reinstantiate"},
         "alarms": {"module": GUESTS / "alarm.wat", "instances": "keyed", "timeout_ms": 300}},
        supervisor={"workers": 3, "heartbeat_ms": 200},
        env={"CORRAL_TEST_ALARM_BACKOFF_MS": "200", "PYTHONPATH": str(Path(__file__).parent / "hooks")},   # retries after 0.2 s, 0.4 s, ...
        # Generous budget, short period: this test is about isolation, not the circuit breaker.
        restart={"intensity": 100000, "period_s": 1})
    daemon_pid = daemon.status()["pid"]
    stop = threading.Event()
    problems: list[str] = []
    healthy_done = [0] * HEALTHY_CLIENTS
    fault_replies: list[tuple[str, bytes, int, bytes]] = []
    cxx_replies: list[tuple[str, bytes, int, bytes, int, bytes]] = []
    killed: list[int] = []
    unwind_replies: list[tuple[bytes, int, bytes]] = []
    lost_with_worker: list[tuple[int, bytes]] = []   # (pid, reply body) of a 502 naming its worker

    def healthy(n: int) -> None:
        client = daemon.client()
        pending: dict[bytes, bytes] = {}
        i = 0
        while not stop.is_set() or pending:
            while not stop.is_set() and len(pending) < IN_FLIGHT:
                body = f"healthy {n}/{i} {random.random()}".encode()
                pending[client.send("echo", body, idempotent=True)] = body
                i += 1
            try:
                reply = client.recv(timeout=30)
            except NoReply:
                problems.append(f"client {n}: {len(pending)} healthy requests got no reply in 30 s")
                return
            body = pending.pop(reply.request_id, None)
            if body is None:
                problems.append(f"client {n}: a reply to an id it never sent: {reply}")
            elif reply.status != 200 or reply.body != body:
                problems.append(f"client {n}: sent {body!r}, got {reply.status} {reply.body[:80]!r}")
            else:
                healthy_done[n] += 1

    def faulty(service: str) -> None:
        client = daemon.client()
        # Every kind once per round, in a new order each round: a body never
        # repeats often enough within period_s to be quarantined.
        rounds = (body for _ in iter(int, 1) for body in random.sample(list(FAULT_KINDS), len(FAULT_KINDS)))
        while not stop.is_set():
            body = next(rounds)
            try:
                # idempotent: a faulty request caught in a SIGKILL runs again rather than
                # reporting the kill, so its own status is what comes back
                reply = client.call(service, body, idempotent=True, timeout=30)
            except NoReply:
                problems.append(f"{service}: no reply to {body!r}")
                return
            fault_replies.append((service, body, reply.status, reply.body))
            time.sleep(0.05)

    def unwinding() -> None:
        """Rust panics that unwind: 500 with the panic message, never 502 unless the worker
        that ran it was killed (these are not idempotent, so a kill is reported, naming it)."""
        client = daemon.client()
        i = 0
        while not stop.is_set():
            key, body = f"key{i % 4}", (b"panic" if i % 3 else b"incr")
            i += 1
            try:
                reply = client.call("rust_unwind", body, key=key, timeout=30)
            except NoReply:
                problems.append(f"rust_unwind: no reply to {body!r}")
                return
            unwind_replies.append((body, reply.status, reply.body))
            worker = WORKER_PID.search(reply.body) if reply.status == 502 else None
            if worker:
                # Its worker died holding it: the broker saw it reaped ("killed by signal 9") or
                # found it gone when it sent to it ("unreachable"). Checked below: it must be a
                # worker the killer SIGKILLed, never one that retired or lost it otherwise.
                lost_with_worker.append((int(worker[1]), reply.body))
                continue
            if body == b"panic" and (reply.status != 500 or not reply.body.startswith(b"unwind: panicked at")):
                problems.append(f"rust_unwind: a panic got {reply.status} {reply.body[:120]!r}")
            elif body == b"incr" and reply.status != 200:
                problems.append(f"rust_unwind: incr got {reply.status} {reply.body[:120]!r}")
            time.sleep(0.01)

    def c_and_cpp_unwinding() -> None:
        client = daemon.client()
        n = 0
        while not stop.is_set():
            for (service, template), (status, holds) in CXX_UNWINDS.items():
                body = template.format(n=n).encode()
                try:
                    reply = client.call(service, body, idempotent=True, timeout=30)
                except NoReply:
                    problems.append(f"{service}: no reply to {body!r}")
                    return
                cxx_replies.append((service, body, reply.status, reply.body, status,
                                    holds.format(n=n).encode()))
            n += 1
            time.sleep(0.05)

    alarms_set = {key: 0 for key in ALARM_MODES}

    def alarming(key: str) -> None:
        """Set an alarm ~1 s ahead, wait until it has fired, again. A set answered 502 (its
        worker killed) may or may not be kept: it is set again at once (one alarm per scope,
        so that replaces it) long before either could be due."""
        client = daemon.client()

        def call(body: bytes) -> bytes:
            for _ in range(50):
                reply = client.call("alarms", body, key=key, timeout=30)
                if reply.status == 200:
                    return reply.body
                if reply.status != 502:
                    problems.append(f"alarms {key} {body!r}: {reply.status} {reply.body[:100]!r}")
                    return b"0"
            problems.append(f"alarms {key} {body!r}: 502 fifty times")
            return b"0"

        try:
            call(b"m" + ALARM_MODES[key])
            while not stop.is_set():
                before = int(call(b"c"))
                call(b"s%d" % (int(time.time() * 1000) + 1000))
                alarms_set[key] += 1
                end = time.monotonic() + 60
                while int(call(b"g")) != -1 and time.monotonic() < end:
                    time.sleep(0.05)
                if int(call(b"c")) != before + 1:
                    problems.append(f"alarms {key}: count {int(call(b'c'))} after {before} and one alarm")
                    return
        except NoReply as exc:
            problems.append(f"alarms {key}: {exc}")

    def killer() -> None:
        while not stop.wait(0.8):
            pids = [w["pid"] for w in daemon.status()["workers"] if w["state"] == "ready"]
            if len(pids) > 1:
                victim = random.choice(pids)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

    threads = [threading.Thread(target=healthy, args=(n,)) for n in range(HEALTHY_CLIENTS)]
    threads += [threading.Thread(target=faulty, args=(s,)) for s in ("faults", "faults_inproc")]
    threads.append(threading.Thread(target=unwinding))
    threads.append(threading.Thread(target=c_and_cpp_unwinding))
    threads += [threading.Thread(target=alarming, args=(key,)) for key in ALARM_MODES]
    threads.append(threading.Thread(target=killer))
    for thread in threads:
        thread.start()
    time.sleep(CHAOS_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(90)
    assert not any(t.is_alive() for t in threads), "a chaos thread is stuck"

    assert not problems, problems[:10]
    stray = [body for pid, body in lost_with_worker if pid not in killed]
    assert not stray, f"502 from workers nobody killed: {stray[:5]}"
    assert min(healthy_done) > 100, healthy_done
    assert killed, "the killer thread killed nobody"
    assert sum(1 for body, status, _ in unwind_replies if body == b"panic" and status == 500) > 20   # exercised, even on a busy machine
    kinds_seen = {body for _, body, _, _ in fault_replies}
    assert kinds_seen == set(FAULT_KINDS), kinds_seen
    # Alarms: each key's durable count is the number of alarms its client set; none dropped.
    for key, count in alarms_set.items():
        assert count >= 3, alarms_set
        assert daemon.call("alarms", b"c", key=key, timeout=30).body == b"%d" % count, (key, count)
    alarm_counts = next(s for s in daemon.status()["services"] if s["name"] == "alarms")["alarms"]
    assert alarm_counts["dropped"] == 0 and alarm_counts["pending"] == 0, alarm_counts
    assert alarm_counts["failed"] >= 2 * alarms_set["fails"] + alarms_set["traps"], alarm_counts   # first runs
    wrong = [(s, b, st, d[:80]) for s, b, st, d in fault_replies if st != FAULT_KINDS[b]]
    assert not wrong, wrong[:10]
    assert len(cxx_replies) > 3 * len(CXX_UNWINDS), len(cxx_replies)
    wrong = [(s, b, st, d[:80]) for s, b, st, d, want, holds in cxx_replies if st != want or holds not in d]
    assert not wrong, wrong[:10]

    # Every abort under on_abort = "respawn" retired its worker and a new generation took its slot.
    events = daemon.events()
    aborted = [e for e in events if e.get("event") == "request.failed" and e.get("service") == "faults"
               and e.get("status") in (502, 504) and e.get("fault") not in (None, "crash")]
    assert aborted
    for event in aborted:
        slot, generation = map(int, event["worker"][1:].split("."))
        left = [e for e in events if e.get("pid") == event["pid"]
                and e.get("event") in ("worker.retiring", "worker.killed")]
        # (the killer thread may SIGKILL it between its 502 reply and its RETIRING message)
        assert left or event["pid"] in killed, f"worker {event['worker']} aborted but did not retire"
        assert any(e.get("event") == "worker.spawned" and e.get("worker", "").split(".") ==
                   [f"w{slot}", str(g)] for e in events for g in range(generation + 1, generation + 200)), \
            f"no new worker in slot {slot} after {event['worker']} aborted"

    # A request that is not idempotent, in flight on a killed worker, gets 502 naming the signal.
    client = daemon.client()
    # The broker gives a request to the worker it used last when all are idle (it packs):
    # the worker that answers one request is the one the next goes to.
    before = {w["pid"]: w["requests"] for w in daemon.status()["workers"]}
    assert client.call("echo", b"which").status == 200
    after = {w["pid"]: w["requests"] for w in daemon.status()["workers"]}
    victim = next(pid for pid, n in after.items() if n > before.get(pid, 0))
    os.kill(victim, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    request = None
    while time.monotonic() < deadline:
        request = client.send("echo", b"doomed")
        time.sleep(0.1)
        status = daemon.status()
        holders = [w for w in status["workers"] if w["pid"] == victim and w["in_flight"]]
        if holders:
            break
        assert client.wait(request, timeout=10).status == 200   # went to another worker
        request = None
    assert request is not None, "could not get a request in flight on the stopped worker"
    os.kill(victim, signal.SIGKILL)
    reply = client.wait(request, timeout=10)
    assert reply.status == 502 and b"signal 9" in reply.body

    assert daemon.status()["pid"] == daemon_pid
    pids_seen = set(daemon.seen_workers)
    assert daemon.stop() == 0
    assert not daemon.leftover_processes(), f"workers outlived the daemon (seen: {sorted(pids_seen)})"
