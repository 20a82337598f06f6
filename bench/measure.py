"""Measurement only, no printing: one load run with the CPU it took, timed loops,
medians. Tables are laid out by bench/report.py."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from corral.client import loadgen

from bench.systems import BenchError


@dataclass
class Cpu:
    """CPU seconds used during one load run: by role of the system under load, by the
    load generator, and by the whole machine (so what other processes took shows)."""
    roles: dict[str, float]
    client: float
    machine_busy: float
    wall: float

    def per_request_us(self, requests: int) -> dict[str, float]:
        out = {role: seconds / requests * 1e6 for role, seconds in self.roles.items()}
        out["client"] = self.client / requests * 1e6
        return out

    @property
    def machine_busy_pct(self) -> float:
        """How busy the whole machine was, in % of all its cores."""
        return 100 * self.machine_busy / self.wall / (os.cpu_count() or 1) if self.wall > 0 else 0.0

    @property
    def others_cores(self) -> float:
        """Cores' worth of CPU that neither the system nor the load generator used."""
        ours = sum(self.roles.values()) + self.client
        return max(0.0, self.machine_busy - ours) / self.wall if self.wall > 0 else 0.0


def _cpu_of(pids: list[int]) -> float:
    import psutil
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _snapshot(system) -> tuple[dict[str, float], float, float, float]:
    import psutil
    roles = {role: _cpu_of(pids) for role, pids in system.roles().items()}
    own = os.times()
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq + \
        getattr(machine, "steal", 0.0)
    return roles, own.user + own.system + own.children_user + own.children_system, busy, time.monotonic()


def load(system, opts, requests: int, rate: float | None = None) -> loadgen.Result:
    before = _snapshot(system)
    result = loadgen.run(system.endpoint, b"echo", opts.body.encode(), requests=requests,
                         concurrency=opts.concurrency, clients=opts.clients, key=None,
                         progress=opts.progress, framing_name=system.framing, rate=rate)
    after = _snapshot(system)
    result.cpu = Cpu({role: after[0][role] - before[0].get(role, 0.0) for role in after[0]},
                     after[1] - before[1], after[2] - before[2], after[3] - before[3])
    return result


def check(result: loadgen.Result, label: str) -> None:
    if result.failed:
        raise BenchError(f"{label}: {result.failed} of {result.requests} requests failed\n{result.report()}")


def median_result(results: list[loadgen.Result], by=lambda r: r.throughput) -> loadgen.Result:
    ordered = sorted(results, key=by)
    return ordered[(len(ordered) - 1) // 2]


def timed(fn, iterations: int, repeats: int) -> list[float]:
    """Microseconds per call of fn(), one figure per repeat."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        out.append((time.perf_counter_ns() - start) / iterations / 1000)
    return out
