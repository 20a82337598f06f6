"""throughput and half-load: the same load against (a), (b), (c) (and (d)), rounds
interleaved; then an open loop at half of (c)'s max; optionally py-spy on corral."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from corral.client import loadgen

from bench import report as tables
from bench.measure import check, load, median_result
from bench.systems import BenchError, Context, Corral, EchoServer, ProxyServer, compared_corral


def run(opts, ctx: Context, report: tables.Report) -> float:
    """Returns the reference system's (corral's) max throughput, the half load's basis."""
    procs, endpoints = ctx.procs, ctx.endpoints
    every = {"a": EchoServer, "b": ProxyServer, "c": Corral, "d": compared_corral}
    systems = [every[name](procs, endpoints, opts) for name in opts.systems]
    corral = dict(zip(opts.systems, systems)).get("c")   # None when --systems leaves it out
    reference = corral or systems[-1]
    results: dict[str, list[loadgen.Result]] = {s.label: [] for s in systems}
    half: dict[str, list[loadgen.Result]] = {s.label: [] for s in systems}
    profiles: list[tuple[str, Path]] = []
    try:
        for system in systems:
            system.start()
        for _ in range(opts.rounds):
            for system in systems:
                result = load(system, opts, opts.requests)
                check(result, system.label)
                results[system.label].append(result)
        corral_max = median_result(results[reference.label]).throughput
        if opts.run_half_load:
            for _ in range(opts.rounds):
                for system in systems:
                    result = load(system, opts, opts.half_requests, rate=corral_max / 2)
                    check(result, system.label)
                    half[system.label].append(result)
        if opts.profile and corral is not None:
            profiles = profile_corral(corral, opts, procs)
    finally:
        errors = []
        for system in systems:
            try:
                system.stop()
            except BenchError as exc:
                errors.append(str(exc))
        if errors and sys.exc_info()[0] is None:
            raise BenchError("\n".join(errors))

    tables.throughput(report, opts, systems, results, reference, corral)
    if any(half.values()):
        tables.half_load(report, opts, systems, half, corral_max / 2, reference, corral)
    for role, raw in profiles:
        tables.profile(report, role, raw.with_suffix(".svg"), top_functions(raw, 12))
    return corral_max


def profile_corral(corral: Corral, opts, procs) -> list[tuple[str, Path]]:
    """Run corral's load once more with py-spy sampling the broker and every worker."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    opts.profile.mkdir(parents=True, exist_ok=True)
    roles = corral.roles()
    targets = [("broker", roles["broker"][0])] + [(f"worker-{i}", pid) for i, pid in enumerate(roles["workers"])]
    spies = []
    for role, pid in targets:
        for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
            out = opts.profile / f"{role}{suffix}"
            spies.append((role, out, procs.start([spy, "record", "--pid", str(pid), "--rate", "200",
                                                  "--nonblocking", "--gil", "--format", fmt, "--output", str(out)])))
    time.sleep(1.0)   # py-spy attaches
    try:
        check(load(corral, opts, opts.requests), corral.label)
    finally:
        for _, _, process in spies:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)   # py-spy writes its output on SIGINT
        for _, _, process in spies:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
            procs.stop(process)
    return [(role, out) for role, out, _ in spies if out.suffix == ".txt" and out.exists()
            and role in ("broker", "worker-0")]


def top_functions(raw: Path, count: int) -> list[tuple[float, float, str]]:
    """Self and inclusive shares of the functions in a py-spy raw (collapsed stacks) file."""
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        samples = int(n)
        total += samples
        names = []
        for frame in stack.split(";"):
            match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
            names.append(f"{match.group(1)} ({match.group(2).rsplit('/', 1)[-1]})" if match else frame)
        self_time[names[-1]] += samples
        for name in set(names):
            inclusive[name] += samples
    if not total:
        return []
    return [(100 * n / total, 100 * inclusive[name] / total, name) for name, n in self_time.most_common(count)]
