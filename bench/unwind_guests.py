#!/usr/bin/env python3
"""What an unwind costs a compiled guest: a C++ throw and a C corral_panic
answered 500, against the same guest answering 200, in one run.

    python bench/unwind_guests.py [-n 3000] [--reps 5]

In-process, through a worker's Host (Guest.run: instance lookup, the
corral/1 call, and on an escape: taking the exception out of the store,
restoring __stack_pointer, calling corral_exception_message), so no
sockets are in the figure. Prints microseconds per request (median of the
reps) and the ratio escape / ok. The guests are built from source first
(guests/build.py); the compiled-module cache is a private temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (app, guest, the 200 request, the 500 request)
CASES = [("cpp", "cpp_throws", b"incr", b"throw measured"),
         ("c", "c_panics", b"tick", b"panic measured")]


def built_guests() -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("corral_guest_build", ROOT / "guests" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.OUT.mkdir(parents=True, exist_ok=True)
    return {**build.build_c_unwind(build.OUT), **build.build_cpp(build.OUT)}


def per_request_us(run, body: bytes, n: int, reps: int) -> tuple[float, object]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            outcome = run(body)
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times), outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="requests per rep (default 3000)")
    parser.add_argument("--reps", type=int, default=5, help="reps, the median is printed (default 5)")
    opts = parser.parse_args(argv)

    from corral.workers import modules
    from corral.workers.host import Host
    from corral.workers.spec import AppSpec, WorkerSpec

    guests = built_guests()
    cache = Path(tempfile.mkdtemp(prefix="crl-bench-unwind-"))
    try:
        engine = modules.make_engine()
        apps = []
        for app, guest, _, _ in CASES:
            _, artifact = modules.compile_cached(engine, guests[guest], cache)
            apps.append(AppSpec(name=app, module=str(guests[guest]), artifact=str(artifact), instances="reuse",
                                timeout_ms=1000, max_memory_mib=64, on_abort="respawn"))
        host = Host(WorkerSpec(backend="", config_generation=1, heartbeat_ms=500, capacity=4,
                               restart_intensity=1_000_000, restart_period_s=30.0, log_level="warning",
                               log_format="json", cache_dir=str(cache), max_open_files=4096, apps=apps))
        host.warm()
        print(f"== Unwinds of compiled guests, in-process (Guest.run), median of {opts.reps} x {opts.n} requests")
        print(f"{'guest':<12} {'200 us':>8} {'500 us':>8} {'500/200':>8}   500 body")
        for app, guest, ok, escape in CASES:
            run = host.guests[app.encode()]

            def call(body: bytes, run=run):
                return run.run(None, body, 1000)

            per_request_us(call, ok, min(opts.n, 500), 1)   # warm up
            ok_us, ok_outcome = per_request_us(call, ok, opts.n, opts.reps)
            escape_us, escaped = per_request_us(call, escape, opts.n, opts.reps)
            assert int(ok_outcome.status) == 200 and int(escaped.status) == 500, (ok_outcome, escaped)
            print(f"{guest:<12} {ok_us:8.1f} {escape_us:8.1f} {escape_us / ok_us:8.2f}   {escaped.body[:48]!r}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
