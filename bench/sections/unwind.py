"""unwind: the cost of saving __stack_pointer before every call (Rust echo guest, against
the same entry with the save turned off), and the time to answer an escaped Rust panic
(500 with its message) against a 200 and against a panic=abort panic plus the fresh
instance after it. In-process, on the Rust guests guests/build.py builds."""

from __future__ import annotations

from pathlib import Path

from bench import report as tables
from bench.measure import timed
from bench.systems import GUESTS, BenchError, Context


def rust_guests() -> dict[str, Path]:
    """The Rust example guests, both panic strategies, built by guests/build.py (kept and
    reused when fresh; a cold build takes about a minute)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("corral_guest_build", GUESTS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        return build.build_rust(build.OUT)
    except (build.ToolchainMissing, build.BuildFailed) as exc:
        raise BenchError(f"unwind section: the Rust guests did not build: {exc}") from None


def unwind_guest(engine, path: Path, cache_dir: Path, instances: str):
    from corral.workers import modules
    from corral.workers.host import Guest
    from corral.workers.spec import AppSpec
    module, artifact = modules.compile_cached(engine, path, cache_dir)
    app = AppSpec(name=path.stem, module=str(path), artifact=str(artifact), instances=instances,
                  timeout_ms=1000, max_memory_mib=64, on_abort="reinstantiate")
    return Guest(engine, app, cache_dir, restart_intensity=1_000_000, restart_period_s=30.0, bounded=False,
                 module=module)


def run(opts, ctx: Context, report: tables.Report) -> None:
    from corral.workers import abi, modules
    from corral.workers.host import EpochTicker
    built = rust_guests()
    engine = modules.make_engine()
    ticker = EpochTicker(engine)
    ticker.start()
    try:
        cache_dir = ctx.root / "cache"
        body, timeout_ms = opts.body.encode(), 1000
        n, reps = opts.host_iterations, opts.reps

        echo = unwind_guest(engine, built["rust_echo_unwind"], cache_dir, "reuse")
        entry = echo.instantiate(timeout_ms)
        stack = entry.stack
        assert stack and entry.handle_request(body, timeout_ms).body == body

        def request() -> object:
            return entry.handle_request(body, timeout_ms)

        def save_only() -> None:
            abi._global_get(entry.context, stack, entry.saved_stack_at)

        saved, unsaved = [], []
        timed(request, min(n, 1000), 1)
        # short runs, interleaved, each going first in turn: drift on a busy machine hits both alike
        for turn in range(reps * 5):
            for on in ((True, False) if turn % 2 else (False, True)):
                entry.stack = stack if on else 0
                (saved if on else unsaved).extend(timed(request, max(n // 5, 100), 1))
        entry.stack = stack
        save_us = timed(save_only, n, reps)

        counter = unwind_guest(engine, built["rust_counter_unwind"], cache_dir, "keyed")
        aborting = unwind_guest(engine, built["rust_counter"], cache_dir, "keyed")
        assert counter.run(b"k", b"panic", timeout_ms).status == 500

        def ok() -> object:
            return counter.run(b"k", b"incr", timeout_ms)

        def unwind() -> object:
            return counter.run(b"k", b"panic", timeout_ms)

        def abort_and_fresh() -> object:
            aborting.run(b"k", b"panic", timeout_ms)
            return aborting.run(b"k", b"incr", timeout_ms)

        assert unwind().body.startswith(b"unwind: panicked at") and abort_and_fresh().body == b"1"
        for fn in (ok, unwind, abort_and_fresh):
            timed(fn, min(n, 500), 1)
        rows = [
            ("CorralEntry.handle_request, Rust echo (panic=unwind), __stack_pointer saved", saved),
            ("the same entry with the save turned off (baseline)", unsaved),
            ("one wasmtime_global_get of __stack_pointer alone", save_us),
            ("Guest.run, Rust counter (panic=unwind): a 200 (incr)", timed(ok, n, reps)),
            ("Guest.run, the same: an escaped panic, 500 with its message", timed(unwind, n, reps)),
            ("Guest.run, Rust counter (panic=abort): 502, then a 200 on a fresh instance",
             timed(abort_and_fresh, max(n // 10, 100), reps)),
        ]
    finally:
        ticker.stop()
    tables.unwind(report, opts, rows)
