"""The status snapshot on its own: no sockets, no processes.

One snapshot feeds `corral status --json`, its table, the metrics and
sd_notify's STATUS=; these tests hold the JSON shape the control verb has
always had, the round trip the CLI relies on, and that each reader says
the same numbers.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

from corral import snapshot
from corral.histogram import LATENCY_BUCKETS, Histogram
from corral.metrics import render_snapshot
from corral.pool import STANDBY_BASE, WorkerState
from corral.snapshot import ClientView, Latency, ServiceView, Snapshot, StateView, WorkerView

WORKER_KEYS = {"slot", "identity", "generation", "pid", "state", "config_generation", "requests", "in_flight",
               "faults", "rss_bytes", "cpu_percent", "uptime_s", "seccomp", "landlock", "uid", "cordon",
               "host"}   # the worker's host: "local", or a remote host's key name (docs/cluster.md)
SERVICE_KEYS = {"name", "instances", "circuit", "circuit_opened", "queued", "running", "dropped", "quarantined",
                "statuses"}
CLIENT_KEYS = {"client", "queued", "running", "unread_bytes", "dropped", "refused", "over_budget"}
TOP_KEYS = {"pid", "uptime_s", "config", "config_generation", "state", "workers_target", "workers", "services",
            "in_flight", "statuses", "dropped_replies", "clients"}


def example() -> Snapshot:
    return Snapshot(
        pid=4242, uptime_s=12.5, config="/etc/corral/corral.toml", config_generation=3, state="running",
        workers_target=2,
        workers=(WorkerView(0, "w0.1", 1, 100, "ready", 3, requests=7, in_flight=1, faults=0, rss_bytes=50 << 20,
                            cpu_percent=3.0, uptime_s=10.0),
                 WorkerView(1, "w1.2", 2, 101, "starting", 3),
                 WorkerView(STANDBY_BASE, "w1000.1", 1, 102, "standby", 3)),
        services=(ServiceView("echo", "reuse", "closed", statuses=((200, 5), (422, 1)), queued=2, running=1,
                              latency=Latency((1,) + (0,) * len(LATENCY_BUCKETS), 0.0004, 1)),
                  ServiceView("kv", "keyed", "open", circuit_opened=1, statuses=((200, 2), (502, 1)),
                              keys=4, evicted=1, state=StateView(9, 1, 123, 4))),
        in_flight=3, statuses=((200, 7), (404, 1), (422, 1), (502, 1)), dropped_replies=1,
        clients=(ClientView("client-a", 2, 1, 2048, 0, 3, False),),
        rejected=((404, 1),), exits=(("crashed", 2), ("retired", 1)))


def test_the_json_has_the_shape_corral_status_has_always_had():
    data = example().to_json()
    assert set(data) == TOP_KEYS
    assert all(set(w) == WORKER_KEYS for w in data["workers"])
    echo, kv = data["services"]
    assert set(echo) == SERVICE_KEYS
    assert set(kv) == SERVICE_KEYS | {"keys", "evicted", "state"}
    assert kv["state"] == {"commits": 9, "rollbacks": 1, "bytes": 123, "scopes": 4}
    assert echo["statuses"] == {"200": 5, "422": 1}
    assert data["statuses"] == {"200": 7, "404": 1, "422": 1, "502": 1}
    assert set(data["clients"][0]) == CLIENT_KEYS
    json.dumps(data)   # what control sends must be JSON


def test_the_cli_reads_back_what_control_sent():
    sent = example()
    got = Snapshot.from_json(json.loads(json.dumps({"ok": True, **sent.to_json()})))
    assert got.to_json() == sent.to_json()
    # what travels is only what `corral status` shows; metrics' own numbers stay home
    assert got.rejected == () and got.exits == ()


def test_the_table_and_the_status_line_say_the_same_numbers():
    now = example()
    table = now.table()
    assert "corral pid 4242, running, up 12 s, config /etc/corral/corral.toml (generation 3)" in table
    assert "workers (3 of 2 wanted):" in table
    assert "(4 keys live, 1 evicted)" in table
    assert "state: 9 commits, 1 rollbacks, 123 bytes in 4 scopes" in table
    assert "client-a" in table
    assert now.status_line() == "2/2 workers ready, 3 requests open, 7 served"


def test_metrics_render_the_snapshot():
    lines = render_snapshot(example()).splitlines()
    assert 'corral_requests_total{service="echo",status="200"} 5' in lines
    assert 'corral_requests_total{service="kv",status="502"} 1' in lines
    assert 'corral_rejected_total{status="404"} 1' in lines
    assert 'corral_request_duration_seconds_bucket{service="echo",le="0.0005"} 1' in lines
    assert 'corral_request_duration_seconds_count{service="echo"} 1' in lines
    assert 'corral_queue_depth{service="echo"} 2' in lines
    assert 'corral_circuit_open{service="kv",state="open"} 1' in lines
    assert 'corral_keys{service="kv"} 4' in lines
    assert 'corral_state_commits_total{service="kv"} 9' in lines
    assert 'corral_client_refused_total{client="client-a"} 3' in lines
    assert "corral_in_flight 3" in lines
    assert 'corral_worker_exits_total{cause="crashed"} 2' in lines
    # a ready standby is a ready process
    assert 'corral_workers{state="ready"} 2' in lines and 'corral_workers{state="starting"} 1' in lines


def test_take_copies_the_daemon_into_a_snapshot():
    """take() on plain objects shaped like the broker and pool: the one place numbers are gathered."""
    histogram = Histogram()
    histogram.observe(0.002)
    health = SimpleNamespace(circuit=SimpleNamespace(value="closed"), opened=0, quarantined_until={})
    service = SimpleNamespace(app=SimpleNamespace(instances="reuse"), health=health, queue=[1, 2], keyed=False,
                              statuses=Counter({200: 3}), latency=histogram, dropped=0, affinity={}, evicted=0)
    request = SimpleNamespace(service=service)
    link = SimpleNamespace(handled=3, inflight={b"t": request}, faults=1,
                           confinement={"seccomp": True, "landlock": 7, "uid": 0})
    worker = SimpleNamespace(slot=0, generation=1, identity=b"w0.1", pid=7, state=WorkerState.READY,
                             standby=False, config_generation=1, psutil=None, started=0.0, cordon="default")
    broker = SimpleNamespace(links={b"w0.1": link}, services={b"echo": service}, ledger={1: request, 2: None},
                             dropped_replies=0, rejected=Counter({404: 2}), totals=lambda: Counter({200: 3, 404: 2}),
                             clients=lambda: [])
    pool = SimpleNamespace(processes={7: worker}, exits=Counter({"retired": 1}))
    facts = snapshot.Facts(started=0.0, config="/c.toml", config_generation=1, state="reloading", workers_target=1)
    stats = lambda name: {"commits": 1, "rollbacks": 0, "bytes": 5, "scopes": 1}  # noqa: E731
    now = snapshot.take(broker, pool, facts, state_stats=stats)
    assert now.state == "reloading" and now.in_flight == 2 and now.served == 3
    assert now.workers[0].in_flight == 1 and now.workers[0].faults == 1 and now.workers[0].state == "ready"
    assert (now.workers[0].seccomp, now.workers[0].landlock, now.workers[0].uid) == (True, 7, 0)
    echo = now.services[0]
    assert echo.queued == 2 and echo.running == 1 and echo.state == StateView(1, 0, 5, 1)
    assert echo.latency.count == 1 and sum(echo.latency.counts) == 1
    assert now.statuses == ((200, 3), (404, 2)) and now.rejected == ((404, 2),) and now.exits == (("retired", 1),)
    bare = snapshot.take(broker, pool, facts)
    assert bare.services[0].state is None
    assert snapshot.with_state(bare, stats).services[0].state == StateView(1, 0, 5, 1)


def test_the_board_hands_a_reader_the_snapshot_the_loop_publishes_after_it_asked():
    """The metrics thread never takes a snapshot itself: it wakes the loop and waits."""
    import threading
    published = Snapshot(1, 0.0, "/c.toml", 1, "running", 1)
    board = snapshot.Board(wake=lambda: None)
    board.publish(Snapshot(1, 0.0, "/c.toml", 0, "running", 1))   # an older one
    woken = threading.Event()
    board.wake = woken.set
    got = []
    reader = threading.Thread(target=lambda: got.append(board.read(timeout=10)))
    reader.start()
    assert woken.wait(10) and board.wanted
    board.publish(published)
    reader.join(10)
    assert got == [published] and not board.wanted
