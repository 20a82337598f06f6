"""Prometheus metrics in the text exposition format, on `[metrics] listen`.

The arbiter loop owns every number; on each scrape a small HTTP thread asks
the loop for a fresh Snapshot (corral.snapshot.Board) and renders that, so
it never walks the loop's live objects, and the loop never waits for it.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from corral.histogram import LATENCY_BUCKETS
from corral.snapshot import Board, Snapshot, StateStats, with_state

def render_snapshot(now: Snapshot) -> str:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    services = now.services
    family("corral_requests_total", "counter", "Requests answered, by service and status.")
    for service in services:
        for status, count in service.statuses:
            out.append(f'corral_requests_total{{service="{service.name}",status="{status}"}} {count}')
    family("corral_rejected_total", "counter", "Requests refused before reaching a service queue, by status.")
    for status, count in now.rejected:
        out.append(f'corral_rejected_total{{status="{status}"}} {count}')
    family("corral_request_duration_seconds", "histogram",
           "Time from the broker receiving a request to its reply, by service.")
    for service in services:
        latency = service.latency
        cumulative = 0
        for bound, n in zip(LATENCY_BUCKETS, latency.counts):
            cumulative += n
            out.append(f'corral_request_duration_seconds_bucket{{service="{service.name}",le="{bound}"}} {cumulative}')
        out.append(f'corral_request_duration_seconds_bucket{{service="{service.name}",le="+Inf"}} {latency.count}')
        out.append(f'corral_request_duration_seconds_sum{{service="{service.name}"}} {latency.sum}')
        out.append(f'corral_request_duration_seconds_count{{service="{service.name}"}} {latency.count}')
    family("corral_queue_depth", "gauge", "Requests waiting for a worker, by service.")
    for service in services:
        out.append(f'corral_queue_depth{{service="{service.name}"}} {service.queued}')
    family("corral_replies_dropped_total", "counter",
           "Replies not delivered (the client was gone, or over max_client_backlog_mib), by service.")
    for service in services:
        out.append(f'corral_replies_dropped_total{{service="{service.name}"}} {service.dropped}')
    if now.clients:
        for metric, field, kind, text in (
                ("corral_client_queued", "queued", "gauge", "Requests queued, by client (the busiest few)."),
                ("corral_client_running", "running", "gauge", "Requests on a worker, by client (the busiest few)."),
                ("corral_client_unread_bytes", "unread_bytes", "gauge",
                 "Reply bytes held for a client that is not reading (the busiest few)."),
                ("corral_client_dropped_total", "dropped", "counter",
                 "Replies dropped for a client (the busiest few)."),
                ("corral_client_refused_total", "refused", "counter",
                 "Requests answered 429, by client (the busiest few).")):
            family(metric, kind, text)
            for client in now.clients:
                label = client.client.replace("\\", "\\\\").replace('"', '\\"')
                out.append(f'{metric}{{client="{label}"}} {getattr(client, field)}')
    family("corral_circuit_open", "gauge", "1 while a service's circuit is open or half-open.")
    for service in services:
        state = service.circuit
        out.append(f'corral_circuit_open{{service="{service.name}",state="{state}"}} {int(state != "closed")}')
    keyed = [service for service in services if service.keyed]
    if keyed:
        family("corral_keys", "gauge", "Keys with a live instance, by keyed service.")
        for service in keyed:
            out.append(f'corral_keys{{service="{service.name}"}} {service.keys}')
        family("corral_keys_evicted_total", "counter", "Key instances dropped over max_keys, by keyed service.")
        for service in keyed:
            out.append(f'corral_keys_evicted_total{{service="{service.name}"}} {service.evicted}')
    stored = [service for service in services if service.state is not None]
    if stored:
        for metric, kind, key, text in (
                ("corral_state_commits_total", "counter", "commits", "Requests whose durable-state writes committed."),
                ("corral_state_rollbacks_total", "counter", "rollbacks",
                 "Requests whose durable-state writes were dropped (500/502/504, a failed commit)."),
                ("corral_state_bytes", "gauge", "bytes", "Key and value bytes of live durable-state entries.")):
            family(metric, kind, text)
            for service in stored:
                out.append(f'{metric}{{service="{service.name}"}} {getattr(service.state, key)}')
    alarmed = [service for service in services if service.alarms is not None]
    if alarmed:
        family("corral_alarms_pending", "gauge", "Alarms set and not yet fired or dropped (docs/alarms.md).")
        for service in alarmed:
            out.append(f'corral_alarms_pending{{service="{service.name}"}} {dict(service.alarms)["pending"]}')
        family("corral_alarms_total", "counter", "Alarm runs that succeeded (fired) or failed, and alarms dropped.")
        for service in alarmed:
            counts = dict(service.alarms)
            for outcome in ("fired", "failed", "dropped"):
                out.append(f'corral_alarms_total{{service="{service.name}",outcome="{outcome}"}} {counts[outcome]}')
    family("corral_in_flight", "gauge", "Requests in the broker's ledger (queued or on a worker).")
    out.append(f"corral_in_flight {now.in_flight}")
    family("corral_worker_exits_total", "counter", "Worker processes that exited, by cause.")
    for cause, count in now.exits:
        out.append(f'corral_worker_exits_total{{cause="{cause}"}} {count}')
    family("corral_workers", "gauge", "Worker processes, by state.")
    for state, count in now.worker_states().items():
        out.append(f'corral_workers{{state="{state}"}} {count}')
    family("corral_worker_requests_total", "counter", "Requests each worker answered, with its host "
           "(\"local\": the broker's own; else the host's key name, docs/cluster.md).")
    for w in now.workers:
        out.append(f'corral_worker_requests_total{{worker="{w.identity}",host="{w.host or "local"}"}} {w.requests}')
    return "\n".join(out) + "\n"


class MetricsServer:
    """GET /metrics on a thread of its own."""

    def __init__(self, listen: str, board: Board, state_stats: StateStats):
        from corral.config import metrics_address
        host, port = metrics_address(listen)   # no host: loopback, never every interface

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                now = board.read()
                if now is None:
                    self.send_error(503, "the daemon has not published its numbers yet")
                    return
                body = render_snapshot(with_state(now, state_stats)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass  # scrapes are not events

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
