"""The wasmtime engine and the compiled-module cache, shared by supervisor and workers.

The supervisor compiles every module once (validating it for `corral check`
too) and stores wasmtime's serialized form in the cache, keyed by content
hash and engine config; a worker, respawned or not, only deserializes it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import wasmtime

WASI_MODULE = "wasi_snapshot_preview1"
STATE_MODULE = "corral"   # the durable-state host functions (workers/statecalls.py)


@functools.cache
def _wasmtime_version() -> str:
    # Imported here, not at the top: importlib.metadata costs a worker ~25 ms
    # of start-up, and a worker only needs it when a compiled module is gone.
    import importlib.metadata
    return importlib.metadata.version("wasmtime")


def make_engine(bounded: bool = False) -> wasmtime.Engine:
    """The engine of supervisor and workers alike (compiled code depends on it).

    `bounded`: for workers under an address-space limit (RLIMIT_AS). By
    default wasmtime reserves gigabytes of address space per linear memory
    and elides bounds checks with guard pages; bounded engines reserve only
    what a memory uses, with explicit bounds checks (a little slower).
    """
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.wasm_exceptions = True
    config.cranelift_opt_level = "speed"
    if bounded:
        config.memory_reservation = 0
        config.memory_guard_size = 0
        config.memory_reservation_for_growth = 1 << 20
    return wasmtime.Engine(config)


def _engine_flags(bounded: bool) -> str:
    """Engine settings that change compiled code: part of the cache key."""
    return f"wasmtime={_wasmtime_version()};epoch=1;exceptions=1;opt=speed;bounded={int(bounded)}"


class ModuleProblem(Exception):
    """A module that cannot be served, with the reason."""


@dataclass(frozen=True)
class ModuleInfo:
    """What the host needs to know about a module before instantiating it."""
    corral_abi: bool       # exports the corral/1 ABI, else a plain module
    has_init: bool
    uses_wasi: bool
    min_memory_bytes: int
    uses_state: bool = False   # imports the kv_* (or alarm_*) host functions of module `corral`
    has_alarm: bool = False    # exports corral_alarm (docs/alarms.md)


_CORRAL_EXPORTS = {
    "corral_alloc": ((wasmtime.ValType.i32(),), (wasmtime.ValType.i32(),)),
    "corral_handle": ((wasmtime.ValType.i32(), wasmtime.ValType.i32()), (wasmtime.ValType.i64(),)),
    "corral_init": ((), ()),
    "corral_exception_message": ((wasmtime.ValType.i32(),), (wasmtime.ValType.i64(),)),
}
_ALARM_EXPORT = ((wasmtime.ValType.i32(),), (wasmtime.ValType.i32(),))


def alarm_problem(imports: list[tuple[str, str]], exports: dict) -> str | None:
    """A guest that sets alarms needs the handler they wake (docs/alarms.md)."""
    ty = exports.get("corral_alarm")
    if ty is not None and (not isinstance(ty, wasmtime.FuncType) or
                           (tuple(ty.params), tuple(ty.results)) != _ALARM_EXPORT):
        return "export corral_alarm must be a function (i32) -> i32 (retries -> 0 done, else failed)"
    used = [name for module, name in imports if module == STATE_MODULE and name.startswith("alarm_")]
    if used and ty is None:
        return (f"imports {STATE_MODULE}.{used[0]} but does not export corral_alarm (i32) -> i32, "
                f"the handler its alarms call")
    return None


def inspect(module: wasmtime.Module) -> ModuleInfo:
    """Classify a module as corral/1 or plain; raise ModuleProblem if it cannot be served."""
    from corral.workers.statecalls import SIGNATURES  # not at the top: it loads wasmtime's raw bindings
    imports = [(i.module, i.name) for i in module.imports]
    foreign = [f"{m}.{n}" for m, n in imports if m not in (WASI_MODULE, STATE_MODULE)]
    if foreign:
        raise ModuleProblem(f"imports {', '.join(foreign)}, which corral does not provide "
                            f"(only {WASI_MODULE} and {STATE_MODULE}.kv_*/alarm_*)")
    for item in module.imports:
        if item.module != STATE_MODULE:
            continue
        wanted = SIGNATURES.get(item.name)
        ty = item.type
        if wanted is None:
            raise ModuleProblem(f"imports {STATE_MODULE}.{item.name}, which corral does not provide "
                                f"(module {STATE_MODULE} has {', '.join(SIGNATURES)})")
        if not isinstance(ty, wasmtime.FuncType) or \
                (tuple(ty.params), tuple(ty.results)) != (wanted[0], (wanted[1],)):
            raise ModuleProblem(f"imports {STATE_MODULE}.{item.name} with the wrong type "
                                f"(docs/state.md: ({', '.join(map(str, wanted[0]))}) -> {wanted[1]})")
    exports = {e.name: e.type for e in module.exports}
    problem = alarm_problem(imports, exports)
    if problem:
        raise ModuleProblem(problem)
    for name, (params, results) in _CORRAL_EXPORTS.items():
        ty = exports.get(name)
        if ty is None:
            continue
        if not isinstance(ty, wasmtime.FuncType) or (tuple(ty.params), tuple(ty.results)) != (params, results):
            raise ModuleProblem(f"export {name} has the wrong type for the corral/1 ABI")
    stack = exports.get("__stack_pointer")
    if stack is not None and not (isinstance(stack, wasmtime.GlobalType) and stack.mutable
                                  and stack.content == wasmtime.ValType.i32()):
        raise ModuleProblem("export __stack_pointer must be a mutable i32 global (the shadow-stack pointer)")
    tag = exports.get("__cpp_exception")
    if tag is not None and not isinstance(tag, wasmtime.TagType):
        raise ModuleProblem("export __cpp_exception must be a tag (the one C++ and Rust throw with)")
    memory = exports.get("memory")
    if "corral_exception_message" in exports and not isinstance(memory, wasmtime.MemoryType):
        raise ModuleProblem("exports corral_exception_message but no memory to return the message in")
    min_memory = memory.limits.min * 65536 if isinstance(memory, wasmtime.MemoryType) else 0
    corral_abi = "corral_handle" in exports
    if corral_abi and ("corral_alloc" not in exports or memory is None):
        raise ModuleProblem("exports corral_handle but not corral_alloc and memory (corral/1 ABI)")
    return ModuleInfo(corral_abi=corral_abi, has_init="corral_init" in exports,
                      uses_wasi=any(m == WASI_MODULE for m, _ in imports), min_memory_bytes=min_memory,
                      uses_state=any(m == STATE_MODULE for m, _ in imports),
                      has_alarm="corral_alarm" in exports)


def cache_path(cache_dir: Path, source: bytes, bounded: bool = False) -> Path:
    digest = hashlib.sha256(source)
    digest.update(b"\0" + _engine_flags(bounded).encode())
    return cache_dir / f"{digest.hexdigest()}.cwasm"


def compile_cached(engine: wasmtime.Engine, source_path: Path, cache_dir: Path,
                   bounded: bool = False) -> tuple[wasmtime.Module, Path]:
    """Load the compiled module from the cache, compiling and storing it on a miss.

    `bounded` must be what `engine` was made with."""
    try:
        source = source_path.read_bytes()
    except OSError as exc:
        raise ModuleProblem(f"cannot read {source_path}: {exc.strerror}") from None
    artifact = cache_path(cache_dir, source, bounded)
    if artifact.is_file():
        try:
            return wasmtime.Module.deserialize_file(engine, str(artifact)), artifact
        except wasmtime.WasmtimeError:
            pass  # stale or damaged: compile again below
    try:
        wasm = wasmtime.wat2wasm(source.decode()) if source_path.suffix == ".wat" else source
        module = wasmtime.Module(engine, wasm)
    except (wasmtime.WasmtimeError, UnicodeDecodeError) as exc:
        message = str(exc).strip().replace("--> <anon>:", f"--> {source_path.name}:") or type(exc).__name__
        raise ModuleProblem(f"{source_path.name} does not compile: {message}") from None
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "wb") as stream:
        stream.write(module.serialize())
    os.replace(tmp, artifact)
    return module, artifact


def load_artifact(engine: wasmtime.Engine, artifact: Path, source_path: Path, cache_dir: Path,
                  bounded: bool = False) -> wasmtime.Module:
    """A worker's way in: deserialize what the supervisor compiled, or compile if it is gone."""
    try:
        return wasmtime.Module.deserialize_file(engine, str(artifact))
    except wasmtime.WasmtimeError:
        return compile_cached(engine, source_path, cache_dir, bounded)[0]
