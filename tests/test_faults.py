"""The fault model (docs/guest-abi.md, "Outcomes"), row by row, against the real daemon.

Unwinds fail one request and keep the instance and its state; aborts poison
the instance (it is never entered again) and, with on_abort = "respawn",
retire the worker process; crashes, hangs and rss overruns kill the worker
and answer what it held; nothing poisons a sibling request.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from harness import FAULTS, GUESTS

pytestmark = pytest.mark.timeout(90)

ALWAYS_ABORT = GUESTS / "faults" / "always_abort.wat"


def faults_app(**settings) -> dict:
    return {"module": FAULTS, "max_memory_mib": 16, **settings}


# --- each row of the table, on an instance that survives the aborts ----------

ROWS = [
    ("ok", 200, b"ok"),
    ("error", 422, b"guest error"),
    ("panic", 500, b"unwind: caught panic: boom"),
    ("throw", 500, b"exception escaped"),
    ("unreachable", 502, b"trap unreachable"),
    ("oob", 502, b"trap memory_out_of_bounds"),
    ("div0", 502, b"trap integer_division_by_zero"),
    ("recurse", 502, b"trap stack_overflow"),
    ("grow", 502, b"trap unreachable"),          # memory.grow refused at max_memory_mib, then trapped
    ("growsoft", 422, b"out of memory"),        # memory.grow refused, handled by the guest
    ("badptr", 502, b"ABI violation"),
    ("badlen", 502, b"ABI violation"),
    ("empty", 502, b"ABI violation"),
    ("badstatus", 502, b"ABI violation"),
    ("loop", 504, b"deadline"),
]


@pytest.fixture(scope="module")
def fault_daemon(cache_dir):
    from harness import Daemon
    daemon = Daemon({"faults": faults_app(on_abort="reinstantiate", timeout_ms=300),
                     "echo": {"module": GUESTS / "echo.wat"}}, cache_dir,
                    restart={"intensity": 1000, "period_s": 1})
    daemon.start()
    yield daemon
    assert not daemon.cleanup()


@pytest.mark.parametrize("body, status, detail", ROWS, ids=[r[0] for r in ROWS])
def test_each_fault_kind_has_its_status(fault_daemon, body, status, detail):
    pids = fault_daemon.worker_pids()
    reply = fault_daemon.call("faults", body.encode())
    assert reply.status == status, reply.body
    assert detail in reply.body
    # on_abort = "reinstantiate": the worker process lives on
    assert fault_daemon.worker_pids() == pids
    assert fault_daemon.call("faults", b"ok").status == 200


def test_fault_events_are_logged_with_request_id_service_and_worker(fault_daemon):
    fault_daemon.call("faults", b"div0", key=None)
    events = [e for e in fault_daemon.events("request.failed") if e.get("fault") == "integer_division_by_zero"]
    assert events, fault_daemon.log_tail()
    event = events[-1]
    assert event["service"] == "faults" and event["status"] == 502
    assert event["request_id"] and event["worker"].startswith("w") and event["pid"] > 0
    assert event["instance"] == "discarded"
    # one event per fault: the worker does not log it a second time
    assert not fault_daemon.events("request.fault")


# --- unwind keeps the instance and its state --------------------------------

def test_unwind_keeps_the_instance_and_its_memory(start_daemon):
    daemon = start_daemon({"counter": {"module": GUESTS / "counter.wat", "instances": "keyed"}})
    client = daemon.client()
    assert [client.call("counter", b"incr", key="k").body for _ in range(2)] == [b"1", b"2"]
    reply = client.call("counter", b"throw", key="k")   # counts, then a Wasm exception escapes
    assert reply.status == 500 and b"exception" in reply.body
    assert client.call("counter", b"incr", key="k").body == b"4"
    assert client.call("counter", b"get", key="other").body == b"0"


def test_caught_panic_keeps_state_too(fault_daemon):
    client = fault_daemon.client()
    first = int(client.call("faults", b"count").body)
    assert client.call("faults", b"panic").status == 500   # counts, then status byte 2
    # Two workers serve the app: follow the count on whichever answers.
    seen = {int(client.call("faults", b"count").body) for _ in range(6)}
    assert any(n > first for n in seen)


# --- abort: the instance is never entered again ------------------------------

def test_abort_with_reinstantiate_replaces_only_the_instance(start_daemon):
    daemon = start_daemon({"counter": {"module": GUESTS / "counter.wat", "instances": "keyed"}})
    client = daemon.client()
    pids = daemon.worker_pids()
    assert [client.call("counter", b"incr", key="k").body for _ in range(3)] == [b"1", b"2", b"3"]
    assert [client.call("counter", b"incr", key="neighbour").body for _ in range(2)] == [b"1", b"2"]
    reply = client.call("counter", b"trap", key="k")
    assert reply.status == 502 and b"unreachable" in reply.body
    assert client.call("counter", b"incr", key="k").body == b"1"        # a fresh instance
    assert client.call("counter", b"incr", key="neighbour").body == b"3"  # no sibling poisoned
    assert daemon.worker_pids() == pids


def test_abort_with_respawn_retires_the_worker_and_a_new_one_serves(start_daemon):
    daemon = start_daemon({"faults": faults_app()}, supervisor={"workers": 1})
    client = daemon.client()
    before = daemon.status()["workers"][0]
    assert [client.call("faults", b"count").body for _ in range(3)] == [b"1", b"2", b"3"]
    reply = client.call("faults", b"unreachable")
    assert reply.status == 502 and b"trap unreachable" in reply.body

    def replaced():
        workers = [w for w in daemon.status()["workers"] if w["state"] == "ready"]
        return workers and workers[0]["pid"] != before["pid"] and workers[0]
    after = daemon.wait_for(replaced, timeout=15, what="the respawned worker")
    assert after["generation"] == before["generation"] + 1
    assert client.call("faults", b"count").body == b"1"   # fresh process, fresh instance
    retiring = daemon.events("worker.retiring")
    assert any(e.get("cause") == "abort" for e in retiring)
    daemon.wait_for(lambda: before["pid"] not in [w["pid"] for w in daemon.status()["workers"]],
                    what="the retired worker gone")


def test_requests_held_by_a_retiring_worker_are_handed_back_not_lost(start_daemon):
    """One worker holding 4 requests aborts on the first: the 3 it never started go to its successor."""
    daemon = start_daemon({"faults": faults_app()}, supervisor={"workers": 1, "pipeline": 4})
    client = daemon.client()
    first = client.send("faults", b"unreachable")
    rest = [client.send("faults", b"count") for _ in range(3)]   # not idempotent
    replies = client.gather([first, *rest], timeout=30)
    assert replies[first].status == 502
    assert sorted(replies[r].body for r in rest) == [b"1", b"2", b"3"]
    assert all(replies[r].status == 200 for r in rest)


def test_an_abort_does_not_disturb_requests_on_other_workers(start_daemon):
    daemon = start_daemon({"faults": faults_app(), "echo": {"module": GUESTS / "echo.wat"}},
                          restart={"intensity": 100})
    healthy = daemon.client()
    faulty = daemon.client()
    ids = {healthy.send("echo", b"h%d" % i): b"h%d" % i for i in range(300)}
    aborts = [faulty.send("faults", b"unreachable") for _ in range(3)]
    replies = healthy.gather(list(ids), timeout=30)
    assert all(r.status == 200 and r.body == ids[i] for i, r in replies.items())
    assert all(r.status == 502 for r in faulty.gather(aborts, timeout=30).values())


def test_escalation_ladder_retires_a_worker_whose_instances_keep_aborting(start_daemon):
    daemon = start_daemon({"counter": {"module": GUESTS / "counter.wat", "instances": "keyed"}},
                          supervisor={"workers": 1}, restart={"intensity": 2, "period_s": 30})
    client = daemon.client()
    pid = daemon.worker_pids()[0]
    for i in range(2):
        assert client.call("counter", b"trap", key=f"k{i}").status == 502
    assert daemon.worker_pids() == [pid]            # within the budget: instances replaced in-process
    assert client.call("counter", b"trap", key="k3").status == 502
    daemon.wait_for(lambda: (p := daemon.worker_pids()) and p != [pid], what="escalation to a new process")
    assert any(e.get("cause") == "escalation" for e in daemon.events("worker.retiring"))


# --- deadlines ------------------------------------------------------------------

def test_deadline_interrupts_the_guest_with_504_and_the_worker_is_replaced(start_daemon):
    daemon = start_daemon({"faults": faults_app(timeout_ms=300)}, supervisor={"workers": 1})
    pid = daemon.worker_pids()[0]
    started = time.monotonic()
    reply = daemon.call("faults", b"loop")
    assert reply.status == 504 and b"interrupted" in reply.body
    assert time.monotonic() - started < 10   # the app's 300 ms, not the 30 s default deadline
    daemon.wait_for(lambda: (p := daemon.worker_pids()) and p != [pid], what="the worker replaced")
    assert daemon.call("faults", b"ok").status == 200


def test_the_request_deadline_is_the_smaller_one(start_daemon):
    daemon = start_daemon({"faults": faults_app(timeout_ms=20000, on_abort="reinstantiate")},
                          supervisor={"workers": 1})
    started = time.monotonic()
    reply = daemon.call("faults", b"loop", deadline_ms=300)
    assert reply.status == 504
    assert time.monotonic() - started < 10   # not the 30 s default deadline, nor the 20 s app timeout


def test_a_request_still_queued_at_its_deadline_gets_504_without_reaching_a_worker(start_daemon):
    daemon = start_daemon({"faults": faults_app(timeout_ms=5000)}, supervisor={"workers": 1, "pipeline": 1})
    client = daemon.client()
    slow = client.send("faults", b"slow")          # holds the only worker for ~0.25 s
    late = client.send("faults", b"count", deadline_ms=50)
    replies = client.gather([slow, late], timeout=20)
    assert replies[slow].status == 200
    assert replies[late].status == 504 and b"queued" in replies[late].body
    assert client.call("faults", b"count").body == b"1"   # the expired request never ran


# --- memory limits -------------------------------------------------------------

def test_memory_limit_refuses_growth_and_the_worker_survives(fault_daemon):
    pids = fault_daemon.worker_pids()
    assert fault_daemon.call("faults", b"growsoft").status == 422
    assert fault_daemon.call("faults", b"grow").status == 502
    assert fault_daemon.worker_pids() == pids


# --- crashes, hangs, rss ----------------------------------------------------------

def wait_in_flight(daemon, count: int = 1) -> None:
    daemon.wait_for(lambda: daemon.status()["in_flight"] >= count, timeout=10, what="request in flight")


def test_a_crash_answers_the_request_in_flight_502_with_the_signal(start_daemon):
    daemon = start_daemon({"faults": faults_app(timeout_ms=10000)}, supervisor={"workers": 1})
    client = daemon.client()
    pid = daemon.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)                 # the request will surely be in flight when it dies
    request = client.send("faults", b"count")
    wait_in_flight(daemon)
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    reply = client.wait(request, timeout=10)
    assert reply.status == 502
    assert b"signal 9" in reply.body and b"SIGKILL" in reply.body
    assert time.monotonic() - started < 5, "a crash must be reported at once, not at the client's timeout"
    daemon.wait_for(lambda: daemon.worker_pids(), what="the respawned worker")
    assert daemon.call("faults", b"ok").status == 200


def test_an_idempotent_request_in_flight_on_a_crashed_worker_is_re_dispatched(start_daemon):
    daemon = start_daemon({"faults": faults_app(timeout_ms=10000)}, supervisor={"workers": 1})
    client = daemon.client()
    pid = daemon.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)
    request = client.send("faults", b"count", idempotent=True)
    wait_in_flight(daemon)
    os.kill(pid, signal.SIGKILL)
    reply = client.wait(request, timeout=15)
    assert (reply.status, reply.body) == (200, b"1")


def test_an_app_can_declare_its_requests_idempotent(start_daemon):
    daemon = start_daemon({"faults": faults_app(timeout_ms=10000, idempotent=True)}, supervisor={"workers": 1})
    client = daemon.client()
    pid = daemon.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)
    request = client.send("faults", b"count")
    wait_in_flight(daemon)
    os.kill(pid, signal.SIGKILL)
    assert client.wait(request, timeout=15).status == 200


def test_a_hung_worker_is_killed_when_heartbeats_stop(start_daemon):
    daemon = start_daemon({"faults": faults_app(timeout_ms=300)},
                          supervisor={"workers": 1, "heartbeat_ms": 100, "liveness": 3})
    client = daemon.client()
    pid = daemon.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)                 # hangs outside any guest call
    request = client.send("faults", b"count")
    reply = client.wait(request, timeout=10)
    assert reply.status == 502 and b"heartbeat lost" in reply.body
    daemon.wait_for(lambda: (p := daemon.worker_pids()) and p != [pid], what="the hung worker replaced")
    assert not _alive(pid)


def test_a_worker_over_its_rss_limit_is_killed_and_its_request_answered(start_daemon):
    daemon = start_daemon({"faults": faults_app(max_memory_mib=256, timeout_ms=20000)},
                          supervisor={"workers": 1, "max_rss_mib": 100})
    pid = daemon.worker_pids()[0]
    started = time.monotonic()
    reply = daemon.call("faults", b"hog", timeout=20)
    assert reply.status == 502 and b"rss limit" in reply.body
    assert time.monotonic() - started < 10
    daemon.wait_for(lambda: (p := daemon.worker_pids()) and p != [pid], what="the worker respawned")


# --- the restart budget: circuit breaker and quarantine -----------------------------

def test_a_service_that_always_aborts_opens_its_circuit_and_others_keep_serving(start_daemon):
    daemon = start_daemon({"broken": {"module": ALWAYS_ABORT}, "echo": {"module": GUESTS / "echo.wat"}},
                          restart={"intensity": 3, "period_s": 30, "backoff_initial_ms": 500,
                                   "backoff_max_ms": 2000})
    echo = daemon.client()
    stop = threading.Event()
    echo_failures = []

    def keep_calling_echo():
        while not stop.is_set():
            reply = echo.call("echo", b"alive", timeout=10)
            if reply.status != 200:
                echo_failures.append(reply)
    thread = threading.Thread(target=keep_calling_echo)
    thread.start()
    try:
        client = daemon.client()
        statuses = [client.call("broken", b"x%d" % i, timeout=15).status for i in range(4)]
        assert statuses == [502] * 4
        started = time.monotonic()
        reply = client.call("broken", b"y", timeout=5)
        assert reply.status == 503 and b"circuit open" in reply.body
        assert time.monotonic() - started < 2   # refused by the broker: no worker was entered
        assert [s for s in daemon.status()["services"] if s["name"] == "broken"][0]["circuit"] == "open"
        # After the backoff one probe goes through; it aborts, so the circuit opens again.
        time.sleep(0.6)
        assert client.call("broken", b"probe", timeout=15).status == 502
        assert client.call("broken", b"z", timeout=5).status == 503
    finally:
        stop.set()
        thread.join(30)
    assert not echo_failures, echo_failures[:3]
    opened = daemon.events("circuit.opened")
    assert len(opened) >= 2 and opened[-1]["backoff_ms"] == 1000


def test_a_successful_probe_closes_the_circuit(start_daemon):
    daemon = start_daemon({"faults": faults_app(on_abort="reinstantiate")},
                          restart={"intensity": 1, "period_s": 30, "backoff_initial_ms": 300})
    client = daemon.client()
    assert [client.call("faults", b"unreachable").status for _ in range(2)] == [502, 502]
    assert client.call("faults", b"ok").status == 503
    time.sleep(0.4)
    assert client.call("faults", b"ok").status == 200     # the probe
    assert client.call("faults", b"ok").status == 200     # closed again
    assert daemon.events("circuit.closed")


def test_a_request_that_keeps_aborting_is_quarantined(start_daemon):
    daemon = start_daemon({"faults": faults_app(on_abort="reinstantiate")},
                          restart={"intensity": 100, "period_s": 30})
    client = daemon.client()
    assert [client.call("faults", b"unreachable").status for _ in range(3)] == [502] * 3
    before = sum(w["faults"] for w in daemon.status()["workers"])
    reply = client.call("faults", b"unreachable")
    assert reply.status == 502 and b"quarantined" in reply.body
    assert sum(w["faults"] for w in daemon.status()["workers"]) == before   # never reached a worker
    assert client.call("faults", b"oob").status == 502                      # another body still runs
    assert client.call("faults", b"ok").status == 200
    assert daemon.events("request.quarantined")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_standby_worker_takes_the_place_of_an_aborted_one_at_once(start_daemon):
    daemon = start_daemon({"faults": faults_app()}, supervisor={"workers": 1, "standby": 1})
    status = daemon.wait_for(lambda: (s := daemon.status()) and
                             [w for w in s["workers"] if w["state"] == "standby"] and s,
                             what="the standby ready")
    standby = [w for w in status["workers"] if w["state"] == "standby"][0]
    serving = [w for w in status["workers"] if w["state"] == "ready"][0]
    client = daemon.client()
    assert client.call("faults", b"count").body == b"1"
    assert client.call("faults", b"unreachable").status == 502
    assert client.call("faults", b"count").body == b"1"        # a fresh instance, in the standby
    promoted = [e for e in daemon.events("worker.promoted")]
    assert promoted and promoted[0]["pid"] == standby["pid"] and promoted[0]["slot"] == serving["slot"]
    after = daemon.wait_for(lambda: (s := daemon.status()) and
                            [w for w in s["workers"] if w["state"] == "standby"] and s,
                            what="a new standby")
    states = {w["pid"]: w["state"] for w in after["workers"]}
    assert states[standby["pid"]] == "ready"
    assert [w for w in after["workers"] if w["state"] == "standby"][0]["pid"] not in (standby["pid"], serving["pid"])
