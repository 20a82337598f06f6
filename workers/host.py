"""The wasmtime host: one engine, its epoch ticker, and the instances of every app.

Each instance lives in a store of its own, with the app's memory limit. An
instance whose call poisoned it (a trap, the deadline) is dropped and never
entered again; what happens next is the app's `on_abort` policy:

  respawn        the worker retires: the broker re-dispatches what it held
  reinstantiate  a fresh instance is made on the next request, in-process;
                 more than restart.intensity aborts within restart.period_s
                 retire the worker anyway (the escalation ladder)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import wasmtime

from corral.wire.protocol import RetireReason, Status
from corral.wire.window import SlidingWindow
from corral.workers import modules, outcome, state
from corral.workers.abi import TICK_MS, CorralEntry, PlainEntry
from corral.workers.outcome import Outcome
from corral.workers.spec import AppSpec, WorkerSpec
from corral.workers.statecalls import StateCalls

MIB = 1024 * 1024
FIRST_INSTANCE_TIMEOUT_MS = 10_000   # first_instance_fault: at most this, even if timeout_ms is longer


class EpochTicker(threading.Thread):
    """Advances the engine's epoch every TICK_MS: one thread per engine, never one per request.

    ctypes releases the GIL while Wasm runs, so this thread runs beside a guest
    in an infinite loop and the epoch deadline interrupts it.
    """

    def __init__(self, engine: wasmtime.Engine):
        super().__init__(name="epoch-ticker", daemon=True)
        self.engine = engine
        self.stopped = False

    def run(self) -> None:
        interval = TICK_MS / 1000
        while not self.stopped:
            time.sleep(interval)
            self.engine.increment_epoch()

    def stop(self) -> None:
        self.stopped = True
        self.join()


class Guest:
    """One app: its compiled module and its live instances (one, or one per key)."""

    def __init__(self, engine: wasmtime.Engine, app: AppSpec, cache_dir: Path,
                 restart_intensity: int, restart_period_s: float, bounded: bool,
                 module: wasmtime.Module | None = None, store: state.StagedStore | None = None):
        """`module`: the app's, already compiled or deserialized; by default read from app.artifact.
        `store`: its durable state, for a module that imports the kv_* functions (without one,
        they answer "storage unavailable")."""
        self.app = app
        self.engine = engine
        if module is None:
            module = modules.load_artifact(engine, Path(app.artifact), Path(app.module), cache_dir, bounded)
        self.info = modules.inspect(module)
        linker = wasmtime.Linker(engine)
        if self.info.uses_wasi:
            linker.define_wasi()
        self.state = StateCalls(store) if self.info.uses_state else None
        if self.state is not None:
            self.state.define(linker)
        self.pre = linker.instantiate_pre(module)
        self.memory_limit = app.max_memory_mib * MIB
        self.keep_instances = app.instances != "per-request"
        self.instances: dict[bytes | None, CorralEntry | PlainEntry] = {}
        self.intensity = restart_intensity
        self.aborts = SlidingWindow(restart_period_s)

    def instantiate(self, timeout_ms: int) -> CorralEntry | PlainEntry | Outcome:
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=self.memory_limit)
        store.set_epoch_deadline(timeout_ms // TICK_MS + 1)
        if self.info.uses_wasi:
            store.set_wasi(wasmtime.WasiConfig())
        try:
            instance = self.pre.instantiate(store)
        except wasmtime.Trap as trap:
            return outcome.from_trap(trap.trap_code.value if trap.trap_code else None,
                                     trap.message, timeout_ms)
        except wasmtime.ExitTrap as exc:   # proc_exit in a start function
            return outcome.from_trap(None, str(exc), timeout_ms)
        except wasmtime.WasmtimeError as exc:
            return outcome.instantiation_failed(str(exc))
        if not self.info.corral_abi:
            return PlainEntry(store, instance)
        entry = CorralEntry(store, instance, self.info.has_init, self.info.has_alarm)
        if entry.init:
            entry.set_deadline(timeout_ms)
            if self.state is not None:
                self.state.begin(entry.memory, None)   # no request: the kv_* calls answer -6
            fault = entry.enter(entry.init, 0, timeout_ms)
            violation = self.state.end() if self.state is not None else None
            if violation is not None:
                return outcome.abi_violation(violation)
            if fault:
                # an instance whose init did not finish holds half-made state
                return outcome.init_unwound(fault) if fault.status is Status.UNWIND else fault
        return entry

    def run(self, key: bytes | None, body: bytes, timeout_ms: int,
            writes: state.WriteSet | None = None, alarm_retries: int = -1) -> Outcome:
        """`writes`: the request's write set, for a guest that uses durable state.
        `alarm_retries` >= 0: an alarm run (docs/alarms.md): corral_alarm(retries), no body."""
        entry = self.instances.get(key)
        if entry is None:
            made = self.instantiate(timeout_ms)
            if isinstance(made, Outcome):
                return made
            entry = made
            if self.keep_instances:
                self.instances[key] = entry
        calls = self.state
        if calls is not None:
            calls.begin(entry.memory, writes)
        if alarm_retries >= 0:
            result = (entry.run_alarm(alarm_retries, timeout_ms) if self.info.corral_abi else
                      Outcome(Status.NOT_FOUND, b"a plain module has no corral_alarm"))
        elif self.info.corral_abi:
            result = entry.handle_request(body, timeout_ms)
        else:
            result = entry.call(body, timeout_ms)
        if calls is not None:
            violation = calls.end()
            if violation is not None:  # its trap ended the call: an abort, whatever else it says
                result = outcome.abi_violation(violation)
        if result.poisoned and self.keep_instances:
            del self.instances[key]  # never entered again
        return result

    def abort_escalates(self, now: float) -> RetireReason | None:
        """After a poisoning fault: does the worker retire, per on_abort and the ladder?"""
        if self.app.on_abort == "respawn":
            return RetireReason.ABORT
        self.aborts.add(now)
        return RetireReason.ESCALATION if self.aborts.count(now) > self.intensity else None


def first_instance_fault(engine: wasmtime.Engine, app: AppSpec, module: wasmtime.Module, cache_dir: Path,
                         bounded: bool) -> str | None:
    """Make one instance of `app` as a worker would (corral_init included) and drop it: what
    went wrong, or None. The engine's epoch must be ticking.

    A start function or corral_init that traps, a data segment out of bounds,
    an initial memory over the limit: such a module passes compilation, yet
    no instance of it can ever serve, and every request would abort."""
    guest = Guest(engine, app, cache_dir, restart_intensity=0, restart_period_s=1.0, bounded=bounded,
                  module=module)
    made = guest.instantiate(min(app.timeout_ms, FIRST_INSTANCE_TIMEOUT_MS))
    return made.body.decode(errors="replace") if isinstance(made, Outcome) else None


def open_store(spec: WorkerSpec, app: AppSpec, log) -> state.StagedStore:
    """The app's store on the configured backend (not connected yet: that is at first use,
    after the worker has dropped its privileges)."""
    limits = state.Limits(max_key_bytes=app.max_state_key_bytes, max_value_bytes=app.max_state_value_kib * 1024,
                          max_scope_bytes=app.max_state_mib * MIB)
    if spec.state_backend == "postgresql":
        from corral.workers import state_pg
        return state_pg.PgStore(spec.state_dsn, app.name, app.state_durability, limits, spec.restart_period_s,
                                log, run=spec.run_id)
    return state.Store(state.database_path(spec.state_dir, app.name), app.state_durability, limits,
                       spec.restart_period_s, log)


class Host:
    """Every app of the worker's spec, on one engine."""

    def __init__(self, spec: WorkerSpec, log=None):
        bounded = spec.max_address_space_mib > 0
        self.engine = modules.make_engine(bounded)
        cache_dir = Path(spec.cache_dir)
        self.stores: dict[bytes, state.StagedStore] = {}
        self.guests = {}
        for app in spec.apps:
            module = modules.load_artifact(self.engine, Path(app.artifact), Path(app.module), cache_dir, bounded)
            store = None
            if modules.inspect(module).uses_state and (spec.state_dir or spec.state_backend != "sqlite"):
                store = self.stores[app.name.encode()] = open_store(spec, app, log)
            self.guests[app.name.encode()] = Guest(self.engine, app, cache_dir, spec.restart_intensity,
                                                   spec.restart_period_s, bounded, module=module, store=store)
        EpochTicker(self.engine).start()

    def warm(self) -> None:
        """Make the shared instance of every `reuse` app now, not on its first request."""
        for guest in self.guests.values():
            if guest.app.instances == "reuse":
                made = guest.instantiate(guest.app.timeout_ms)
                if not isinstance(made, Outcome):
                    guest.instances[None] = made
