#!/usr/bin/env python3
"""corral against its baselines, in one go, on this machine (bench/README.md; issue 5).

    python bench/run.py                  everything (about 2 minutes on 2 cores)
    python bench/run.py --quick          everything, small (about 15 s): the CI smoke run
    python bench/run.py --throughput     only some sections: --throughput --half-load
                                         --hops --host --instantiate --abort --storage --fairness
                                         --unwind --security --frames --confinement --alarms --cluster
                                         (any combination)

Sections (see bench/README.md for what each number means):

  throughput   the same closed-loop load (one load generator, supervisor/client/loadgen.py)
               against (a) a bare pyzmq ROUTER echo in one process, (b) the C
               zmq.proxy with as many Python REP echo workers as corral has workers,
               (c) the real corral daemon serving guests/echo.wat; req/s, p50, p99,
               and the ratios c/a and c/b
  half-load    an open-loop (fixed-rate) load at half of (c)'s measured maximum,
               against all three: p50/p90/p99 (the target: corral's p99 <= 2 ms)
  hops         one request at a time (--hops-rate, default 1000 req/s) through (a), (b)
               and corral with 1 worker each: round trips, and corral's split into its
               4 ZeroMQ hops and the time inside the broker and the worker (a tracer,
               bench/tracer/sitecustomize.py, stamps every message in both processes)
  host         host overhead per Wasm call: corral's call path (Guest.run,
               CorralEntry.handle_request) against wasmtime-py's Func.__call__ +
               Memory.read/write doing the same corral/1 request by hand
  instantiate  the time to make a fresh instance of the echo guest (Guest.instantiate)
  abort        abort-to-serving-again through the real daemon, for on_abort =
               "reinstantiate" (keyed counter guest) and "respawn" (workers = 1)
  storage      a counter with one kv_get + one kv_put per request, durable (fsync, os)
               against the same counter kept in memory, through the real daemon
  fairness     a light client's p99 (open loop) beside a client flooding the same
               service, and another service on the same workers, against its p99
               alone: the ratios
  unwind       the cost of saving __stack_pointer before every call (Rust echo guest,
               against the same entry with the save turned off), and the time to
               answer an escaped Rust panic (500 with its message) against a 200
               and against a panic=abort panic plus the fresh instance after it
  security     CURVE's cost: the same load against corral on loopback tcp with and
               without CURVE (interleaved rounds), the broker's drain with and without
               reading each message's User-Id, and the module check in its child
               process against the same check in-process
  alarms       10,000 alarms due in the same second through the real daemon: the time
               until the last fired, and an echo load's p99 meanwhile beside without alarms
  frames       corral.wire.frames (send_frames, drain: the C extension) against plain
               pyzmq's send_multipart/recv_multipart, per six-frame message over inproc
  confinement  the same load against corral with confinement = "off" and "require"
               (seccomp + Landlock, docs/confinement.md) in interleaved rounds: req/s,
               p99 and the ratio; a worker's start time (spawn to READY) with and without

The code: this file parses the flags and runs the chosen sections in order;
bench/sections/<name>.py measures one section (bench/systems.py: the servers
and daemons it loads; bench/measure.py: loads, timed loops, CPU), and
bench/report.py lays out every table.

Everything it starts runs in its own process group under one private
directory in /tmp; all of it is stopped and removed at the end, on an error,
on Ctrl-C, SIGTERM and SIGHUP (and if this script is SIGKILLed, its children
die with it: parent-death signal; the next run removes the directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))   # measure this checkout, installed or not, and import bench.*

import zmq  # noqa: E402

from bench import report as tables  # noqa: E402
from bench.sections import (abort, alarms, cluster, confinement, fairness, frames, hops,  # noqa: E402
                            host, instantiate, security, storage, throughput, unwind)
from bench.systems import BenchError, Context  # noqa: E402

SECTIONS = ("throughput", "half-load", "hops", "host", "instantiate", "abort", "storage", "fairness", "unwind",
            "security", "frames", "confinement", "alarms", "cluster")
# The order they run in: the daemons first, then the in-process ones (throughput's
# module runs half-load too, which needs its max).
RUN_ORDER = ((("throughput", "half-load"), throughput), (("hops",), hops), (("abort",), abort),
             (("storage",), storage), (("alarms",), alarms), (("cluster",), cluster), (("fairness",), fairness),
             (("security",), security), (("confinement",), confinement),
             (("host",), host), (("instantiate",), instantiate), (("unwind",), unwind), (("frames",), frames))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    pick = parser.add_argument_group("sections (all when none is named)")
    for name in SECTIONS:
        pick.add_argument(f"--{name}", action="store_true", dest=name.replace("-", "_"))
    parser.add_argument("--quick", action="store_true",
                        help="small everything (a few thousand requests, few repetitions): a CI smoke run")
    parser.add_argument("--workers", type=int, default=2, help="corral workers = REP workers of (b) (default 2)")
    parser.add_argument("-n", "--requests", type=int, help="requests per throughput run (default 60000; quick 3000)")
    parser.add_argument("--half-requests", type=int, help="requests of each half-load run (default requests/2)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per client (default 32)")
    parser.add_argument("--clients", type=int, default=1,
                        help="client processes (default 1: on 2 cores a second client mostly takes CPU "
                             "from the server)")
    parser.add_argument("--rounds", type=int, help="throughput and half-load rounds, a b c interleaved; "
                                                   "the median is shown (default 3; quick 1)")
    parser.add_argument("--reps", type=int, help="repetitions of the in-process measures and of abort "
                                                 "(default 7; quick 3)")
    parser.add_argument("--systems", default="abc",
                        help="which of a, b, c (and d, with --compare) to load (default abc, or abcd with "
                             "--compare); half load is half of c's max, or of the last one's without c")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="also load (d): corral from another checkout, e.g. a `git worktree` of an "
                             "older commit, in the same interleaved rounds (throughput and half-load)")
    parser.add_argument("--body", default="hello", help="request body (default 'hello')")
    parser.add_argument("--hops-rate", type=float, default=1000.0,
                        help="hops section: requests per second, one at a time (default 1000)")
    parser.add_argument("--transport", choices=("ipc", "tcp"), default="ipc",
                        help="client endpoints of all three systems (default ipc)")
    parser.add_argument("--set", dest="corral_set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [supervisor] setting for corral's config, e.g. --set pipeline=8 (repeatable)")
    parser.add_argument("--baseline-multipart", action="store_true",
                        help="baseline servers use recv_multipart/send_multipart instead of frame calls")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON to FILE")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the throughput rounds, load corral once more under py-spy and write "
                             "flame graphs (DIR/broker.svg, DIR/worker-N.svg) and collapsed stacks")
    opts = parser.parse_args(argv)
    chosen = [name for name in SECTIONS if getattr(opts, name.replace("-", "_"))]
    opts.sections = chosen or list(SECTIONS)
    if opts.compare is not None:
        if not (opts.compare / "supervisor" / "__init__.py").is_file():
            parser.error(f"--compare {opts.compare}: not a corral checkout (no supervisor/__init__.py)")
        opts.compare = opts.compare.resolve()
        sources = [opts.compare / "supervisor" / "wire" / "_zmqframes.c", opts.compare / "supervisor" / "_zmqframes.c"]
        source = next((path for path in sources if path.is_file()), None)
        if source is not None and not list(source.parent.glob("_zmqframes*.so")):
            parser.error(f"--compare {opts.compare}: its C extension is not built (it would run on pyzmq "
                         f"alone): build it with  cd {opts.compare} && {sys.executable} setup.py build_ext "
                         f"--inplace")
        if opts.systems == "abc":
            opts.systems += "d"
    opts.systems = "".join(sorted(set(opts.systems)))
    if not opts.systems or set(opts.systems) - set("abcd"):
        parser.error("--systems takes letters among a, b, c, d")
    if "d" in opts.systems and opts.compare is None:
        parser.error("--systems d needs --compare DIR")
    quick = opts.quick
    opts.requests = opts.requests or (3000 if quick else 60000)
    opts.half_requests = opts.half_requests or max(opts.requests // 2, 500)
    opts.rounds = opts.rounds or (1 if quick else 3)
    opts.reps = opts.reps or (3 if quick else 7)
    opts.host_iterations = 2000 if quick else 10000
    opts.instantiate_iterations = 100 if quick else 500
    opts.hops_requests = 300 if quick else 2000
    opts.run_half_load = "half-load" in opts.sections
    settings = {}
    for item in opts.corral_set:
        name, sep, raw = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            settings[name.strip()] = json.loads(raw)
        except ValueError:
            settings[name.strip()] = raw
    fixed = {"workers": "--workers", "frontend": "--transport", "control": None, "cache_dir": None}
    for name in set(settings) & set(fixed):
        parser.error(f"--set {name}: set by the benchmark itself" + (f"; use {fixed[name]}" if fixed[name] else ""))
    opts.corral_set = settings
    return opts


def remove_stale_dirs() -> None:
    """Private directories of earlier runs that were killed outright (SIGKILL: no clean-up)."""
    for path in Path("/tmp").glob("crlb-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def machine_line(opts) -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"
    load1, load5, _ = os.getloadavg()
    return (f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
            f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), wasmtime-py {version('wasmtime')}; "
            f"transport {opts.transport}; load average {load1:.2f} (1 min), {load5:.2f} (5 min) at start")


def busy_others() -> list[str]:
    """Other processes using a lot of CPU right now (they make every number here noisier)."""
    try:
        import psutil
    except ImportError:
        return []
    mine = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.pid != mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
            if cpu >= 20:
                busy.append(f"pid {p.pid} {p.info['name']} {cpu:.0f}%")
        except psutil.Error:
            pass
    return busy



def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # SIGTERM and SIGHUP end the run like Ctrl-C does: through every finally below.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    remove_stale_dirs()
    root = Path(tempfile.mkdtemp(prefix=f"crlb-{os.getpid()}-", dir="/tmp"))
    (root / "cache").mkdir()
    ctx = Context(root, opts.transport)
    report = tables.Report()
    started = time.monotonic()
    try:
        tables.header(report, opts, opts.sections, machine_line(opts), busy_others())
        for names, section in RUN_ORDER:
            if any(name in opts.sections for name in names):
                section.run(opts, ctx, report)
                report.out("")
        report.out(f"done in {time.monotonic() - started:.1f} s")
        if opts.json:
            opts.json.write_text(json.dumps({"argv": sys.argv[1:], **report.data}, indent=1, default=str))
        return 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"\nbench: interrupted ({str(exc) or 'SIGINT'}); cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # let the clean-up finish
        ctx.procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
