"""The start-up, reload and `corral check` validation of guests, in a child of its own.

    python -P -m corral.workers.check --parent PID  < CheckRequest JSON  > results JSON

The arbiter never runs guest code, nor compiles it: it writes a CheckRequest
on this process's stdin and reads one result per app from its stdout, either
the compiled artifact in the cache or the problem (as `corral check` words
it). This process takes a worker's OS limits and confines itself as a worker
does (docs/confinement.md) before it compiles anything; after compiling
(which writes the daemon's cache), it drops to the worker's user before any
guest code runs: start functions and `corral_init` of the first instance.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from corral.wire.exits import EX_CONFIG, EX_SOFTWARE, UntestedWasmtime
from corral.workers.spec import AppSpec, CheckRequest


def check(request: CheckRequest, drop_privileges) -> list[dict]:
    """Per app, in order: {"name", "artifact", "uses_state"} or {"name", "problem"}."""
    from pathlib import Path

    from corral.workers import modules
    from corral.workers.host import EpochTicker, first_instance_fault

    bounded = request.max_address_space_mib > 0
    cache_dir = Path(request.cache_dir)
    engine = modules.make_engine(bounded)
    compiled, results = [], []
    for app in request.apps:
        try:
            module, artifact = modules.compile_cached(engine, Path(app.module), cache_dir, bounded)
            info = modules.inspect(module)
            if info.min_memory_bytes > app.max_memory_mib * 1024 * 1024:
                raise modules.ModuleProblem(f"needs {info.min_memory_bytes // 1048576} MiB of memory at start, "
                                            f"over max_memory_mib = {app.max_memory_mib}")
            compiled.append((app, module, str(artifact), info.uses_state))
        except modules.ModuleProblem as exc:
            results.append({"name": app.name, "problem": str(exc)})
    drop_privileges()
    ticker = EpochTicker(engine)   # a first instance that never returns is interrupted
    ticker.start()
    try:
        for app, module, artifact, uses_state in compiled:
            spec = AppSpec(**{**asdict(app), "artifact": artifact})
            fault = first_instance_fault(engine, spec, module, cache_dir, bounded)
            results.append({"name": app.name, "problem": f"its first instance fails: {fault}"} if fault
                           else {"name": app.name, "artifact": artifact, "uses_state": uses_state})
    finally:
        ticker.stop()
    order = {app.name: i for i, app in enumerate(request.apps)}
    return sorted(results, key=lambda r: order[r["name"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corral.workers.check")
    parser.add_argument("--parent", type=int, required=True, help="the daemon's pid")
    args = parser.parse_args(argv)

    from corral.workers import oslimits
    oslimits.die_with_parent(args.parent)
    request = CheckRequest.loads(sys.stdin.read())
    oslimits.limit_resources(request.max_open_files, request.max_address_space_mib)

    ids = oslimits.target_ids(request.user, request.group)   # before confinement closes /etc

    def drop() -> None:
        oslimits.become(ids)
        oslimits.die_with_parent(args.parent)  # a change of credentials clears it

    try:
        # Both check wasmtime-py's private names as they load.
        from corral.workers import abi, statecalls  # noqa: F401
    except UntestedWasmtime as exc:
        # No module can be judged: the daemon exits 70, not 78.
        sys.stdout.write(json.dumps({"untested": str(exc)}) + "\n")
        sys.stdout.flush()
        return EX_SOFTWARE
    from corral.workers import confine
    try:
        confine.confine(check_plan(request, ids), request.confinement)
    except confine.Refused as exc:
        sys.stdout.write(json.dumps({"refused": str(exc)}) + "\n")
        sys.stdout.flush()
        return EX_CONFIG
    results = check(request, drop)
    sys.stdout.write(json.dumps({"apps": results}) + "\n")
    sys.stdout.flush()
    return 0


def check_plan(request: CheckRequest, ids: tuple[int, int] | None):
    """What the check child must still reach once confined: its imports, the modules'
    sources and the cache it writes; no socket at all (it talks through its pipes).
    `ids`: the user it drops to after compiling."""
    from corral.workers import confine
    return confine.Plan(reads=tuple(confine.python_reads() + [app.module for app in request.apps]),
                        writes=(request.cache_dir,), families=(), become=ids)


if __name__ == "__main__":
    sys.exit(main())
