"""The host functions of module `corral`: kv_get, kv_put, kv_delete, kv_list (docs/state.md)
and alarm_set, alarm_get, alarm_delete (docs/alarms.md).

They are defined once per app on its linker, as raw "unchecked" callbacks
(the arguments arrive in a wasmtime_val_raw_t buffer, the result goes back
in its first slot), and find the running request's write set on the app's
StateCalls. Every pointer and length is checked against the guest's memory
before anything else: one outside it makes the callback return a trap, and
the request is an abort (502, ABI violation) whatever the call would have
returned.
"""

from __future__ import annotations

import ctypes
from ctypes import CFUNCTYPE, c_char_p, c_size_t, c_void_p, memmove, string_at

import wasmtime

# wasmtime-py's private names come checked from abi (its _raw too): a missing one is
# UntestedWasmtime at start-up (exit 70), never an AttributeError later.
from corral.workers.abi import _raw, raw_types
from corral.workers import state
from corral.workers.state import Store, WriteSet

_U32 = 0xFFFFFFFF
_Callback = CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_size_t)
_Finalizer = CFUNCTYPE(None, c_void_p)


_define = _raw("wasmtime_linker_define_func_unchecked", c_void_p, c_void_p, c_char_p, c_size_t, c_char_p,
               c_size_t, c_void_p, _Callback, c_void_p, c_void_p)
_caller_context = _raw("wasmtime_caller_context", c_void_p, c_void_p)
_memory_data = _raw("wasmtime_memory_data", c_void_p, c_void_p, c_void_p)
_memory_size = _raw("wasmtime_memory_data_size", c_size_t, c_void_p, c_void_p)
_trap_new = _raw("wasmtime_trap_new", c_void_p, c_char_p, c_size_t)
_Args = raw_types.wasmtime_val_raw_t * 6

_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()
# name -> (parameters, result): the only imports a guest may take from module `corral`.
SIGNATURES = {
    "kv_get": ((_I32,) * 4, _I64),
    "kv_put": ((_I32,) * 4, _I32),
    "kv_delete": ((_I32,) * 2, _I32),
    "kv_list": ((_I32,) * 6, _I64),
    "alarm_set": ((_I64,), _I32),
    "alarm_get": ((), _I64),
    "alarm_delete": ((), _I32),
}
ALARM_IMPORTS = ("alarm_set", "alarm_get", "alarm_delete")
MODULE = "corral"


class Violation(Exception):
    """A pointer or length outside the guest's memory."""


def _buffer(base: int, args, at: int) -> bytes:
    """The bytes of the (pointer, length) argument pair at `at` (checked by StateCalls._enter)."""
    return string_at(base + (args[at].i32 & _U32), args[at + 1].i32 & _U32)


class StateCalls:
    """The host functions of one app, and what they act on while a request runs."""

    def __init__(self, store: Store | None):
        self.store = store
        self.memory = 0                    # the running instance's memory (wasmtime_memory_t address)
        self.writes: WriteSet | None = None
        self.violation: str | None = None  # why the last call trapped, for the request's outcome
        self._keep: list = []

    def define(self, linker: wasmtime.Linker) -> None:
        for name, (params, result) in SIGNATURES.items():
            callback = _Callback(self._guarded(name, getattr(self, "_" + name)))
            self._keep.append(callback)
            ty = wasmtime.FuncType(list(params), [result])
            self._keep.append(ty)
            encoded = name.encode()
            error = _define(ctypes.cast(linker.ptr(), c_void_p), MODULE.encode(), len(MODULE), encoded,
                            len(encoded), ctypes.cast(ty.ptr(), c_void_p), callback, None, None)
            if error:
                raise wasmtime.WasmtimeError._from_ptr(
                    ctypes.cast(error, ctypes.POINTER(raw_types.wasmtime_error_t)))

    def begin(self, memory: int, writes: WriteSet | None) -> None:
        self.memory = memory
        self.writes = writes
        self.violation = None

    def end(self) -> str | None:
        """After the request's calls: the ABI violation that trapped it, if any."""
        violation, self.violation, self.writes, self.memory = self.violation, None, None, 0
        return violation

    # --- the callbacks ---------------------------------------------------------

    def _enter(self, caller: int, args_at: int, *buffers: int) -> tuple[int, object]:
        """Base address of memory, after checking the (pointer, length) pairs at those argument
        positions; raise Violation."""
        args = _Args.from_address(args_at)
        context = _caller_context(caller)
        size = _memory_size(context, self.memory) if self.memory else 0
        for at in buffers:
            pointer, length = args[at].i32 & _U32, args[at + 1].i32 & _U32
            if pointer + length > size:
                raise Violation(f"buffer [{pointer}, {pointer + length}) lies outside memory of {size} bytes")
        return (_memory_data(context, self.memory) or 0) if size else 0, args

    def _guarded(self, name: str, call):
        """The C callback around one host function: a Violation traps (an abort, docs/state.md),
        and so does any other exception, so that a bug here never takes the worker down."""
        def callback(env, caller, args_at, count) -> int:
            try:
                return call(caller, args_at)
            except Violation as exc:
                return self._trap(name, str(exc))
            except Exception as exc:
                return self._trap(name, f"host function failed: {exc!r}")
        return callback

    def _trap(self, name: str, detail: str) -> int:
        self.violation = f"{name}: {detail}"
        message = self.violation.encode()
        return _trap_new(message, len(message)) or 0

    def _kv_get(self, caller, args_at) -> int:
        base, args = self._enter(caller, args_at, 0, 2)
        writes = self.writes
        if writes is None:
            args[0].i64 = state.UNAVAILABLE
            return 0
        key = _buffer(base, args, 0)
        found = writes.get(key)
        if isinstance(found, int):
            args[0].i64 = found
            return 0
        if len(found) <= args[3].i32 & _U32:
            memmove(base + (args[2].i32 & _U32), found, len(found))
        args[0].i64 = len(found)
        return 0

    def _kv_put(self, caller, args_at) -> int:
        base, args = self._enter(caller, args_at, 0, 2)
        writes = self.writes
        if writes is None:
            args[0].i32 = state.UNAVAILABLE
            return 0
        key = _buffer(base, args, 0)
        value = _buffer(base, args, 2)
        args[0].i32 = writes.put(key, value)
        return 0

    def _kv_delete(self, caller, args_at) -> int:
        base, args = self._enter(caller, args_at, 0)
        writes = self.writes
        if writes is None:
            args[0].i32 = state.UNAVAILABLE
            return 0
        args[0].i32 = writes.delete(_buffer(base, args, 0))
        return 0

    def _kv_list(self, caller, args_at) -> int:
        base, args = self._enter(caller, args_at, 0, 2, 4)
        writes = self.writes
        if writes is None:
            args[0].i64 = state.UNAVAILABLE
            return 0
        prefix = _buffer(base, args, 0)
        after = _buffer(base, args, 2)
        found = writes.list(prefix, after, args[5].i32 & _U32)
        if isinstance(found, int):
            args[0].i64 = found
            return 0
        memmove(base + (args[4].i32 & _U32), found, len(found))
        args[0].i64 = len(found)
        return 0

    def _alarm_set(self, caller, args_at) -> int:
        args = _Args.from_address(args_at)
        writes = self.writes
        args[0].i32 = state.UNAVAILABLE if writes is None else writes.alarm_set(args[0].i64)
        return 0

    def _alarm_get(self, caller, args_at) -> int:
        args = _Args.from_address(args_at)
        writes = self.writes
        args[0].i64 = state.UNAVAILABLE if writes is None else writes.alarm_get()
        return 0

    def _alarm_delete(self, caller, args_at) -> int:
        args = _Args.from_address(args_at)
        writes = self.writes
        args[0].i32 = state.UNAVAILABLE if writes is None else writes.alarm_delete()
        return 0
