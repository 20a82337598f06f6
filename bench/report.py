"""Printing only: the Report every section writes to, and each section's table.

Every function here lays out figures a section measured (bench/sections/) and
records them in report.data (what --json writes); none measures anything.
The text of these lines is parsed by tests/test_bench_smoke.py: change it
together."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from corral.client import loadgen

from bench.measure import median_result

P99_TARGET_MS = 2.0


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def out(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def summary(result: loadgen.Result) -> dict:
    cpu = getattr(result, "cpu", None)
    extra = {"cpu_us_per_request": cpu.per_request_us(result.requests), "others_cores": cpu.others_cores} \
        if cpu else {}
    return {**result.summary(), **extra}


def header(report: Report, opts, sections: list[str], machine: str, busy: list[str]) -> None:
    report.out(f"corral bench ({'quick' if opts.quick else 'full'}): sections {', '.join(sections)}")
    report.out(machine)
    if busy:
        report.out("warning: other processes are busy, the figures will be noisy: " + "; ".join(busy))
    report.out(f"load: body {len(opts.body.encode())} bytes; corral and (b) with {opts.workers} workers")
    report.out("")


def throughput(report: Report, opts, systems: list, results: dict[str, list[loadgen.Result]],
               reference, corral) -> None:
    """The closed-loop table, CPU per request and the ratios c/a, c/b, c/d."""
    med = {label: median_result(rs) for label, rs in results.items()}
    report.out(f"== Throughput: closed loop, {opts.clients} client(s) x {opts.concurrency} in flight, "
               f"{opts.requests} requests per run, {opts.rounds} round(s), median round shown")
    report.out(f"{'system':<40} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}   all rounds req/s")
    for system in systems:
        r = med[system.label]
        rounds = " ".join(f"{x.throughput:,.0f}" for x in results[system.label])
        report.out(f"{system.label:<40} {r.throughput:>9,.0f} {r.pct(50):>8.3f} {r.pct(99):>8.3f} "
                   f"{r.max_ms:>8.3f}   {rounds}")
    report.out("")
    report.out("CPU per request in the median round (us of CPU time, all processes of each role; "
               "'others': cores' worth used by\nprocesses outside the benchmark during the run, "
               "the noise in these figures)")
    for system in systems:
        r = med[system.label]
        per = r.cpu.per_request_us(r.requests)
        parts = "  ".join(f"{role} {us:.1f}" for role, us in per.items())
        server = sum(us for role, us in per.items() if role != "client")
        report.out(f"{system.label:<40} server {server:6.1f}  =  {parts}   machine busy "
                   f"{r.cpu.machine_busy_pct:.0f}%, others {r.cpu.others_cores:.2f} cores")
    by_name = {name: med[system.label] for name, system in zip(opts.systems, systems)}
    report.data["throughput"] = {s.label: {"median": summary(med[s.label]),
                                           "rounds": [summary(x) for x in results[s.label]]}
                                 for s in systems}
    report.data["ratios"] = {}
    c = by_name.get("c")
    for name, what in (("a", "one-hop pyzmq echo"), ("b", "zmq.proxy + REP workers"),
                       ("d", "corral as --compare has it")):
        if c is not None and name in by_name:
            ratio = c.throughput / by_name[name].throughput
            report.data["ratios"][f"c/{name}"] = ratio
            report.out(f"ratio c/{name} = {ratio:.3f}   (corral / {what}, throughput)")


def half_load(report: Report, opts, systems: list, half: dict[str, list[loadgen.Result]], rate: float,
              reference, corral) -> None:
    """The open-loop table at half of the reference's max, and corral's p99 against its target."""
    med_half = {label: median_result(rs, by=lambda r: r.pct(99)) for label, rs in half.items()}
    report.out("")
    report.out(f"== Latency at half of {reference.label[3:].split(',')[0]}'s max load: open loop (fixed schedule), "
               f"{rate:,.0f} req/s offered, {opts.half_requests} requests per run, {opts.rounds} round(s), "
               f"median round (by p99) shown")
    report.out(f"{'system':<40} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
               f" {'lag ms':>7} {'CPU us/req':>10} {'busy':>5}   all rounds p99 ms")
    for system in systems:
        r = med_half[system.label]
        per = r.cpu.per_request_us(r.requests)
        server = sum(us for role, us in per.items() if role != "client")
        rounds = " ".join(f"{x.pct(99):.2f}" for x in half[system.label])
        report.out(f"{system.label:<40} {r.throughput:>9,.0f} {r.pct(50):>8.3f} {r.pct(90):>8.3f} "
                   f"{r.pct(99):>8.3f} {r.max_ms:>8.3f} {r.max_lag_ms:>7.2f} {server:>10.1f} "
                   f"{r.cpu.machine_busy_pct:>4.0f}%   {rounds}")
    report.out("(lag: how late the load generator itself sent its latest request; CPU us/req: the "
               "system's, client excluded;\n busy: the whole machine, all cores)")
    if corral is not None:
        label = corral.label
        p99 = med_half[label].pct(99)
        worst = max(x.pct(99) for x in half[label])
        verdict = "met" if p99 <= P99_TARGET_MS else "NOT met"
        report.out(f"corral p99 at half load = {p99:.3f} ms in the median round, {worst:.3f} ms in the worst   "
                   f"(target: at most {P99_TARGET_MS:g} ms: {verdict})")
    report.data["half_load"] = {"offered_req_per_s": rate,
                                **{s.label: {"median": summary(med_half[s.label]),
                                             "rounds": [summary(x) for x in half[s.label]]}
                                   for s in systems}}


def profile(report: Report, role: str, svg, rows: list[tuple[float, float, str]]) -> None:
    """One py-spy profile: its flame graph's path and the functions with most self time."""
    report.out("")
    report.out(f"py-spy profile of corral's {role} under the same load (an extra run, not counted "
               f"above): {svg}")
    report.out(f"{'self %':>7} {'incl %':>7}  function (most self time first; GIL-holding "
               f"C calls count to the line that made them)")
    for self_pct, incl_pct, name in rows:
        report.out(f"{self_pct:>7.1f} {incl_pct:>7.1f}  {name}")


def hops(report: Report, opts, totals: dict[str, list[float]], hop_counts: dict[str, int],
         part_names: tuple[tuple[str, bool], ...], parts: list[list[float]], calls: int) -> None:
    """Round trips of (a), (b), (c) one at a time, and corral's parts hop by hop."""
    def pcts(values: list[float]) -> str:
        ordered = sorted(values)
        return " ".join(f"{loadgen.percentile(ordered, p):>8.1f}" for p in (50, 90, 99))

    report.out(f"== One request at a time, {opts.hops_rate:,.0f} req/s, {opts.hops_requests} requests, "
               f"1 worker: round trips, and corral's hop by hop (us)")
    report.out(f"{'':<58} {'p50':>8} {'p90':>8} {'p99':>8}")
    for label, values in totals.items():
        report.out(f"{label + f' ({hop_counts[label]} ZeroMQ hops)':<58} {pcts(values)}")
    for (name, is_hop), values in zip(part_names, parts):
        report.out(f"{'   ' + name + ('  [hop]' if is_hop else ''):<58} {pcts(values)}")
    medians = [statistics.median(v) for v in parts]
    on_hops = sum(m for m, (_, is_hop) in zip(medians, part_names) if is_hop)
    report.out(f"corral at p50: {on_hops:.0f} us in its 4 hops, {sum(medians) - on_hops:.0f} us in the broker "
               f"and the worker ({len(parts[0])} of {calls} requests traced whole; medians of the "
               f"parts need not add up to the total's)")
    report.data["hops"] = {"rate": opts.hops_rate, "requests": opts.hops_requests,
                           "totals_us": {label: {"p50": loadgen.percentile(v, 50), "p99": loadgen.percentile(v, 99)}
                                         for label, v in totals.items()},
                           "corral_parts_p50_us": dict(zip((n for n, _ in part_names), medians))}


def _rows(report: Report, rows: list[tuple[str, list[float]]], width: int) -> None:
    report.out(f"{'path':<{width}} {'us/request':>10} {'min':>8}")
    for label, times in rows:
        report.out(f"{label:<{width}} {statistics.median(times):>10.2f} {min(times):>8.2f}")


def _runs(rows: list[tuple[str, list[float]]]) -> dict:
    return {label: {"median_us": statistics.median(t), "min_us": min(t), "runs_us": t} for label, t in rows}


def host(report: Report, opts, body: bytes, rows: list[tuple[str, list[float]]]) -> None:
    """rows: corral's Guest.run first, wasmtime-py by hand third."""
    report.out(f"== Host overhead per Wasm call: echo guest, {len(body)}-byte body, in-process, "
               f"median of {opts.reps} x {opts.host_iterations} requests")
    _rows(report, rows, 64)
    corral_us, hand_us = statistics.median(rows[0][1]), statistics.median(rows[2][1])
    report.out(f"ratio by-hand/corral = {hand_us / corral_us:.2f}   "
               f"(wasmtime-py's public API per request / corral's Guest.run per request)")
    report.data["host"] = _runs(rows)
    report.data["host"]["ratio_by_hand_over_corral"] = hand_us / corral_us


def unwind(report: Report, opts, rows: list[tuple[str, list[float]]]) -> None:
    """rows: saved, unsaved, the save alone, a 200, a 500 unwind, an abort and a fresh instance."""
    reps = opts.reps
    report.out(f"== Unwind: the stack-pointer save and escaped panics, Rust guests, in-process, "
               f"median of {reps} runs ({reps * 5} short ones for the save)")
    _rows(report, rows, 78)
    medians = [statistics.median(times) for _, times in rows]
    lows = [min(times) for _, times in rows]
    report.out(f"ratio saved/baseline = {medians[0] / medians[1]:.3f} (medians), {lows[0] / lows[1]:.3f} (minima)"
               f"   save per call: {(medians[0] - medians[1]) / 2:.2f} us (medians), "
               f"{(lows[0] - lows[1]) / 2:.2f} us (minima), two calls per request")
    report.out(f"ratio panic/200 = {medians[4] / medians[3]:.2f}   "
               f"ratio abort+fresh/panic = {medians[5] / medians[4]:.2f}")
    report.data["unwind"] = _runs(rows)


def instantiate(report: Report, opts, times: list[float], trap_us: float, plain_us: float, rounds: int) -> None:
    report.out(f"== Instance recreation: echo guest, in-process, median of {opts.reps} x "
               f"{opts.instantiate_iterations}")
    report.out(f"fresh instance = {statistics.median(times):.1f} us   (min {min(times):.1f} us; Guest.instantiate: "
               f"a new Store, limits, epoch deadline, instance, export handles)")
    report.out(f"trap + next call on a fresh instance = {trap_us:.1f} us   (counter guest, keyed, Guest.run "
               f"twice; two ordinary calls: {plain_us:.1f} us; median of {rounds})")
    report.data["instantiate"] = {"median_us": statistics.median(times), "min_us": min(times),
                                  "runs_us": times, "trap_then_next_us": trap_us, "two_plain_calls_us": plain_us}


def abort(report: Report, opts, out: dict[str, dict]) -> None:
    def stats(values: list[float]) -> str:
        return f"{statistics.median(values):>9.3f} {min(values):>8.3f} {max(values):>8.3f}"

    reinstantiate, respawn = out["reinstantiate"], out["respawn"]
    report.out(f"== Abort to serving again, through the real daemon ({opts.reps} repetitions)")
    report.out(f"{'on_abort':<15} {'measured':<58} {'median ms':>9} {'min':>8} {'max':>8}")
    report.out(f"{'reinstantiate':<15} {'trap sent -> next request on the same key answered':<58} "
               f"{stats(reinstantiate['trap_to_next_answered_ms'])}")
    report.out(f"{'  (reference)':<15} {'two ordinary requests on one key, sent together':<58} "
               f"{stats(reinstantiate['two_plain_requests_ms'])}")
    report.out(f"{'respawn':<15} {'trap reply -> a request answered by the new worker':<58} "
               f"{stats(respawn['trap_reply_to_new_worker_answered_ms'])}")
    if respawn["worker_startup_ms"]:
        report.out(f"{'  (of which)':<15} {'the new worker process: spawned -> ready (pool log)':<58} "
                   f"{stats(respawn['worker_startup_ms'])}")
    report.out(f"{'respawn':<15} {'with standby = 1: trap reply -> answered by the promoted one':<58} "
               f"{stats(respawn['with_standby_ms'])}")
    report.data["abort"] = out


def storage(report: Report, opts, requests: int, results: dict[str, list[loadgen.Result]],
            state: dict[str, dict]) -> None:
    medians = {name: median_result(runs) for name, runs in results.items()}
    base = medians["memory"].throughput
    report.out(f"== Durable state: a counter, one kv_get + one kv_put per request, {opts.workers} workers "
               f"({opts.rounds} rounds of {requests} requests, median; {opts.concurrency} in flight)")
    report.out(f"{'state kept':<36} {'req/s':>9} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8} {'commits':>9}")
    labels = {"memory": "in memory (counter.wat)", "os": "durable, state_durability = os",
              "fsync": "durable, state_durability = fsync"}
    for name in ("memory", "os", "fsync"):
        result = medians[name]
        commits = state.get(name, {}).get("commits", "-")
        report.out(f"{labels[name]:<36} {result.throughput:>9.0f} {result.throughput / base:>6.2f}x "
                   f"{result.pct(50):>8.2f} {result.pct(99):>8.2f} {commits:>9}")
    report.data["storage"] = {name: summary(result) for name, result in medians.items()}


def alarms(report: Report, opts, count: int, last_s: float, quiet: loadgen.Result, busy: loadgen.Result,
           counts: dict, runs: int) -> None:
    report.out(f"== Alarms: {count} alarms due in the same second, {opts.workers} workers (docs/alarms.md)")
    report.out(f"time from the due second until the last had fired: {last_s:.2f} s "
               f"({count / last_s:.0f} alarm runs/s); status: {counts}")
    report.out(f"echo load meanwhile: {runs} runs of 1000 requests back to back (the median p99 run shown)")
    report.out(f"{'echo requests (closed loop, 4 in flight)':<44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>7}")
    for label, result in (("without alarms", quiet), ("while the alarms fire", busy)):
        report.out(f"{label:<44} {result.throughput:>9.0f} {result.pct(50):>8.2f} {result.pct(99):>8.2f} "
                   f"{result.pct(99) / quiet.pct(99):>6.2f}x")
    report.data["alarms"] = {"count": count, "last_fired_s": round(last_s, 3), "quiet": summary(quiet),
                             "busy": summary(busy)}


def security(report: Report, opts, runs: dict[str, list[loadgen.Result]], plain: str, curve: str,
             frames_impl: str, drain_us: dict[str, float], check_ms: dict[str, float]) -> None:
    med = {label: median_result(rs) for label, rs in runs.items()}
    base, secured = med[plain], med[curve]

    def per_request_us(r: loadgen.Result) -> float:
        return 1e6 / r.throughput

    report.out(f"== Security: CURVE on a loopback tcp frontend, {opts.requests} requests per run, "
               f"{opts.rounds} round(s), median shown")
    report.out(f"{'system':<40} {'req/s':>9} {'us/req':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, result in med.items():
        report.out(f"{label:<40} {result.throughput:>9.0f} {per_request_us(result):>8.1f} "
                   f"{result.pct(50):>8.3f} {result.pct(99):>8.3f}")
    report.out(f"CURVE / plain tcp throughput: {secured.throughput / base.throughput:.2f}x; "
               f"CURVE adds {per_request_us(secured) - per_request_us(base):.1f} us per request")
    report.out(f"broker drain per 6-frame request (frames.{frames_impl}): {drain_us['drain']:.2f} us; "
               f"reading each User-Id too: {drain_us['drain_with_user']:.2f} us "
               f"({drain_us['drain_with_user'] / drain_us['drain']:.1f}x), through pyzmq Frames: "
               f"{drain_us['pyzmq_with_user']:.2f} us")
    report.out(f"module check of the echo guest (cache warm), median of {opts.reps}: in a child "
               f"{check_ms['child']:.0f} ms, in-process (as before) {check_ms['in_process']:.1f} ms "
               f"(+{check_ms['child'] - check_ms['in_process']:.0f} ms at each start-up and reload)")
    report.data["security"] = {"req_s": {label: r.throughput for label, r in med.items()},
                               "ratio_curve_over_plain": secured.throughput / base.throughput,
                               "drain_us": drain_us, "check_ms": check_ms}


def fairness(report: Report, opts, requests: int, rate: float, window: int,
             results: dict[str, list[loadgen.Result]]) -> None:
    medians = {name: median_result(runs, by=lambda r: -r.pct(99)) for name, runs in results.items()}
    alone = medians["alone"].pct(99)
    report.out(f"== Fairness: a light client ({rate:.0f} req/s open loop, {requests} requests, on echo) "
               f"beside a flooding one ({window} in flight), {opts.workers} workers, "
               f"median of {opts.rounds}")
    report.out(f"{'light client on echo':<36} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  {'not 200':>7}")
    labels = {"alone": "alone", "echo": "flood on echo (same service)", "echo2": "flood on echo2 (other service)"}
    for name, result in medians.items():
        report.out(f"{labels[name]:<36} {result.pct(50):>8.3f} {result.pct(99):>8.3f} {result.max_ms:>8.3f}  "
                   f"{result.failed:>7}")
    for name in ("echo", "echo2"):
        ratio = medians[name].pct(99) / alone if alone > 0 else float("inf")
        report.out(f"ratio p99 beside a flood on {name} / alone = {ratio:.2f}")
    report.data["fairness"] = {name: [r.summary() for r in runs] for name, runs in results.items()}


def frames(report: Report, opts, implementation: str, frame_count: int, count: int,
           runs: dict[str, list[float]]) -> None:
    """corral.wire.frames against plain pyzmq, per message, and the two ratios."""
    report.out(f"== Frame I/O: {frame_count}-frame messages over inproc, corral.wire.frames "
               f"(implementation {implementation}) against plain pyzmq, median of {opts.reps} x {count}")
    rows = [("corral  frames.send_frames", runs["send_frames"]),
            ("pyzmq   Socket.send_multipart", runs["send_multipart"]),
            ("corral  frames.drain (up to 256 at a time)", runs["drain"]),
            ("pyzmq   Socket.recv_multipart", runs["recv_multipart"])]
    report.out(f"{'path':<48} {'us/message':>10} {'min':>8}")
    for label, times in rows:
        report.out(f"{label:<48} {statistics.median(times):>10.2f} {min(times):>8.2f}")
    median = {name: statistics.median(times) for name, times in runs.items()}
    send = median["send_multipart"] / median["send_frames"]
    receive = median["recv_multipart"] / median["drain"]
    report.out(f"ratio send_multipart/send_frames = {send:.2f}   ratio recv_multipart/drain = {receive:.2f}   "
               f"(plain pyzmq per message / corral's, medians)")
    report.data["frames"] = {"implementation": implementation, "frames": frame_count, "messages": count,
                             **{name: {"median_us": median[name], "min_us": min(t), "runs_us": t}
                                for name, t in runs.items()},
                             "ratio_send_multipart_over_send_frames": send,
                             "ratio_recv_multipart_over_drain": receive}
