"""Entry of a worker process: `python -m corral.workers SPEC --slot N --generation G --parent PID`.

Started by the daemon's pool, never by hand: it connects to the broker's
backend named in SPEC, announces itself READY and serves until told to
leave, or retires after an abort.

Order matters: the parent-death signal and resource limits come first; every
import is done; then the worker confines itself (docs/confinement.md: no new
privileges, Landlock, seccomp) while it is still one thread, before ZeroMQ's
context or the epoch ticker start and before any module is loaded. The
compiled modules are then loaded (from the daemon's own cache: trusted) while
the worker may still be root; then it drops to its user, and only then is
guest code run (start functions, corral_init).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from corral.wire.exits import EX_CONFIG   # a worker refused by `require`: a config problem, as the daemon's own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corral.workers")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="the daemon's pid")
    parser.add_argument("--max-requests", type=int, default=0)
    parser.add_argument("--standby", action="store_true", help="wait to be promoted: take no requests")
    args = parser.parse_args(argv)

    from corral.workers import oslimits
    oslimits.die_with_parent(args.parent)
    from corral.workers.spec import WorkerSpec
    spec = WorkerSpec.load(args.spec)
    oslimits.limit_resources(spec.max_open_files, spec.max_address_space_mib)

    from corral.wire import logs
    logs.configure(spec.log_level, spec.log_format)
    # The fields of the daemon's lines about this worker (pool.WorkerProcess.name).
    log = logs.get(component="worker", worker=f"w{args.slot}.{args.generation}", pid=os.getpid())
    try:
        # Imported here, so that an untested wasmtime (abi.UntestedWasmtime) is logged.
        from corral.workers.host import Host
        from corral.workers.loop import WorkerLoop
    except Exception as exc:
        log.error("worker.start_failed", error=f"{type(exc).__name__}: {exc}")
        return 3
    from corral.workers import confine
    ids = oslimits.target_ids(spec.user, spec.group)   # before confinement closes /etc
    try:
        confined = confine.confine(worker_plan(spec, ids), spec.confinement)
    except confine.Refused as exc:   # confinement = "require" on a kernel without it
        log.error("worker.confinement_refused", missing=str(exc))
        return EX_CONFIG
    try:
        host = Host(spec, log)
        oslimits.become(ids)
        oslimits.die_with_parent(args.parent)  # a change of credentials clears it
        host.warm()
    except Exception as exc:  # the daemon validated the modules; this is the environment
        log.error("worker.start_failed", error=f"{type(exc).__name__}: {exc}")
        return 3
    from corral.wire.tuning import quiet_garbage_collector
    quiet_garbage_collector()
    code = WorkerLoop(spec, args.slot, args.generation, host, log, args.max_requests, args.standby,
                      confined.as_dict()).run()
    # The socket is flushed and closed (its context terminated). Skip the
    # interpreter's teardown: finalizing every store and module is ~10 ms of
    # CPU, spent just when the other workers take over this one's load.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def worker_plan(spec, ids: tuple[int, int] | None):
    """What a worker must still reach once confined (docs/confinement.md); `ids`: the
    user it drops to once its modules are loaded."""
    from corral.workers import confine
    reads = confine.python_reads() + [app.module for app in spec.apps] + [app.artifact for app in spec.apps]
    writes = [spec.cache_dir] + ([spec.state_dir] if spec.state_dir else [])
    tcp_ports = confine.endpoint_ports(spec.backend)
    if spec.state_backend == "postgresql":   # a store on another machine is a TCP connection
        from corral.workers import state_pg
        store_ports, store_reads = state_pg.reach(spec.state_dsn, ids[0] if ids else None)
        tcp_ports += store_ports
        reads += store_reads
    families = (socket.AF_UNIX,) if not tcp_ports else (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
    return confine.Plan(reads=tuple(reads), writes=tuple(writes), tcp_ports=tuple(tcp_ports),
                        families=families, become=ids)



if __name__ == "__main__":
    sys.exit(main())
