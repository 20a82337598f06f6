"""Calls into a guest: the corral/1 ABI and plain numeric exports. The hot path.

wasmtime-py's `Func.__call__` looks the function type up over FFI and boxes
every value on each call (about 30 us). Here the types are known when the
instance is made, so a call goes straight to `wasmtime_func_call_unchecked`
with a raw argument buffer allocated once per instance (about 3 us), and
guest memory is copied with `memmove`/`string_at` after checking every
pointer the guest hands back against the memory's current size.

An exception that escapes an export skips the epilogues that would restore
the guest's shadow-stack pointer, so every call saves an exported
`__stack_pointer` first (into a value struct made once per instance) and an
escape writes it back: without that, each escape leaks a frame of linear
memory and the instance soon faults. An escaped exception thrown with the
module's exported `__cpp_exception` tag carries one i32 (an
`_Unwind_Exception*`); `corral_exception_message` turns it into the 500's
detail and frees it inside the guest.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import math
from ctypes import addressof, byref, c_bool, c_size_t, c_uint8, c_uint64, c_void_p, memmove, string_at

import wasmtime

from corral.wire.exits import TESTED_WASMTIME, UntestedWasmtime
from corral.workers import outcome
from corral.workers.outcome import Outcome
from corral.wire.protocol import Status

# Epoch ticks: a ticker thread bumps the engine's epoch every TICK_MS.
TICK_MS = 5
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


# The names below are wasmtime-py's private ones (not re-exported, free to
# change in any release): checked once, when a worker imports this module, so
# that a wasmtime it was not tested with fails at start-up, naming what is gone.
_PRIVATE_TYPES = ("wasmtime_val_raw_t", "wasm_trap_t", "wasmtime_error_t", "wasmtime_exnref_t")
_PRIVATE_METHODS = (("Store", "_context"), ("Trap", "_from_ptr"), ("Trap", "ptr"),
                    ("WasmtimeError", "_from_ptr"), ("Linker", "ptr"), ("FuncType", "ptr"))  # the last two: statecalls


def check_private_names():
    """The private modules (`wasmtime._bindings`, `wasmtime._ffi.dll`), checked
    for every type and method named above; raises UntestedWasmtime."""
    try:
        bindings = importlib.import_module("wasmtime._bindings")
        ffi = importlib.import_module("wasmtime._ffi")
    except ImportError as exc:
        raise UntestedWasmtime.missing(f"module {exc.name}") from None
    if not hasattr(ffi, "dll"):
        raise UntestedWasmtime.missing("wasmtime._ffi.dll")
    for name in _PRIVATE_TYPES:
        if not hasattr(bindings, name):
            raise UntestedWasmtime.missing(f"wasmtime._bindings.{name}")
    for cls, name in _PRIVATE_METHODS:
        if not hasattr(getattr(wasmtime, cls, None), name):
            raise UntestedWasmtime.missing(f"wasmtime.{cls}.{name}")
    return bindings, ffi.dll


raw_types, dll = check_private_names()


def _raw(name: str, restype, *argtypes):
    # dll[name] makes a fresh function object, so wasmtime-py's own
    # prototypes (dll.name) keep their argument types.
    try:
        function = dll[name]
    except AttributeError:
        raise UntestedWasmtime.missing(f"C function {name} in wasmtime._ffi.dll") from None
    function.restype = restype
    function.argtypes = argtypes
    return function


_call = _raw("wasmtime_func_call_unchecked", c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p)
_memory_data = _raw("wasmtime_memory_data", c_void_p, c_void_p, c_void_p)
_memory_size = _raw("wasmtime_memory_data_size", c_size_t, c_void_p, c_void_p)
_set_deadline = _raw("wasmtime_context_set_epoch_deadline", None, c_void_p, c_uint64)
_trap_code = _raw("wasmtime_trap_code", c_bool, c_void_p, c_void_p)
_has_exception = _raw("wasmtime_context_has_exception", c_bool, c_void_p)
_take_exception = _raw("wasmtime_context_take_exception", c_bool, c_void_p, c_void_p)
_exnref_unroot = _raw("wasmtime_exnref_unroot", None, c_void_p)
_exnref_tag = _raw("wasmtime_exnref_tag", c_void_p, c_void_p, c_void_p, c_void_p)
_exnref_field_count = _raw("wasmtime_exnref_field_count", c_size_t, c_void_p, c_void_p)
_exnref_field = _raw("wasmtime_exnref_field", c_void_p, c_void_p, c_void_p, c_size_t, c_void_p)
_tag_eq = _raw("wasmtime_tag_eq", c_bool, c_void_p, c_void_p, c_void_p)
_global_get = _raw("wasmtime_global_get", None, c_void_p, c_void_p, c_void_p)
_global_set = _raw("wasmtime_global_set", c_void_p, c_void_p, c_void_p, c_void_p)
_val_unroot = _raw("wasmtime_val_unroot", None, c_void_p)
_error_delete = _raw("wasmtime_error_delete", None, c_void_p)

_I32_KIND = 0  # WASMTIME_I32
MESSAGE_LIMIT = 4096  # bytes of an exception message kept for the 500's detail


def _address(pointer) -> int:
    return ctypes.cast(pointer, c_void_p).value or 0


class Entry:
    """The raw handles of one instance: store context, memory, exports, buffers."""

    __slots__ = ("store", "instance", "context", "memory", "args", "args_at", "trap", "trap_at",
                 "base", "size", "stack", "saved_stack", "saved_stack_at", "tag", "exception_message",
                 "exnref", "exnref_at", "_keep")

    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance, arg_slots: int = 2):
        self.store = store
        self.instance = instance
        self.context = _address(store._context())
        exports = instance.exports(store)
        memory = exports.get("memory")
        self.memory = addressof(memory._memory) if isinstance(memory, wasmtime.Memory) else 0
        self.args = (raw_types.wasmtime_val_raw_t * max(arg_slots, 2))()
        self.args_at = addressof(self.args)
        self.trap = c_void_p()
        self.trap_at = addressof(self.trap)
        self.base = self.size = 0  # linear memory as last seen (see memory_view)
        self._keep = [memory]  # the Python objects that own the raw structs
        stack = exports.get("__stack_pointer")
        self.stack = addressof(stack._global) if isinstance(stack, wasmtime.Global) else 0
        self.saved_stack = raw_types.wasmtime_val_t()
        self.saved_stack_at = addressof(self.saved_stack)
        tag = exports.get("__cpp_exception")
        self.tag = addressof(tag._tag) if isinstance(tag, wasmtime.Tag) else 0
        self._keep += [stack, tag]
        self.exception_message = (self.function("corral_exception_message")
                                  if self.tag and "corral_exception_message" in exports else 0)
        self.exnref = raw_types.wasmtime_exnref_t()
        self.exnref_at = addressof(self.exnref)

    def function(self, name: str) -> int:
        """The address of an exported function's handle (kept alive by this entry)."""
        func = self.instance.exports(self.store)[name]
        self._keep.append(func)
        return addressof(func._func)

    def enter(self, func: int, nargs: int, timeout_ms: int) -> Outcome | None:
        """Call `func` with the arguments in `self.args`; None, or the fault's outcome."""
        if self.stack:
            _global_get(self.context, self.stack, self.saved_stack_at)
        error = _call(self.context, func, self.args_at, nargs, self.trap_at)
        if error or self.trap.value:
            return self._fault(error, timeout_ms)
        return None

    def set_deadline(self, timeout_ms: int) -> None:
        _set_deadline(self.context, timeout_ms // TICK_MS + 1)

    def _fault(self, error: int | None, timeout_ms: int) -> Outcome:
        code, message = self._take_trap(error)
        if code is None and _has_exception(self.context):
            payload = self._take_exception()
            self._restore_stack()
            if payload is None or not self.exception_message:
                return outcome.unwound()
            return self._describe_exception(payload, timeout_ms)
        return outcome.from_trap(code, message, timeout_ms)

    def _take_trap(self, error: int | None) -> tuple[int | None, str]:
        """The trap code (None if it has none) and message of a failed call, freeing the trap."""
        if not self.trap.value:
            return None, str(wasmtime.WasmtimeError._from_ptr(
                ctypes.cast(error, ctypes.POINTER(raw_types.wasmtime_error_t))))
        trap = wasmtime.Trap._from_ptr(ctypes.cast(self.trap.value, ctypes.POINTER(raw_types.wasm_trap_t)))
        self.trap.value = None
        found = c_uint8()
        code = found.value if _trap_code(_address(trap.ptr()), byref(found)) else None
        return code, trap.message

    def _take_exception(self) -> int | None:
        """Take the pending exception out of the store (so the next call starts clean); its
        i32 payload if it was thrown with the module's `__cpp_exception` tag, else None."""
        if not _take_exception(self.context, self.exnref_at):
            return None
        try:
            return self._payload() if self.tag else None
        finally:
            _exnref_unroot(self.exnref_at)

    def _payload(self) -> int | None:
        tag = raw_types.wasmtime_tag_t()
        error = _exnref_tag(self.context, self.exnref_at, addressof(tag))
        if error:
            _error_delete(error)
            return None
        if not _tag_eq(self.context, addressof(tag), self.tag):
            return None
        if _exnref_field_count(self.context, self.exnref_at) != 1:
            return None
        field = raw_types.wasmtime_val_t()
        error = _exnref_field(self.context, self.exnref_at, 0, addressof(field))
        if error:
            _error_delete(error)
            return None
        if field.kind != _I32_KIND:
            _val_unroot(addressof(field))
            return None
        return field.of.i32 & _U32

    def _restore_stack(self) -> None:
        if self.stack:
            error = _global_set(self.context, self.stack, self.saved_stack_at)
            if error:  # cannot happen for the mutable i32 that modules.inspect checked
                _error_delete(error)

    def _describe_exception(self, payload: int, timeout_ms: int) -> Outcome:
        """Ask the guest for the escaped exception's message, under what is left of the deadline."""
        args = self.args
        args[0].i32 = payload - (1 << 32) if payload >= 1 << 31 else payload
        error = _call(self.context, self.exception_message, self.args_at, 1, self.trap_at)
        if error or self.trap.value:
            code, message = self._take_trap(error)
            if code is None and _has_exception(self.context):
                self._take_exception()
                self._restore_stack()
                return outcome.exception_message_failed("threw an exception of its own")
            if code == outcome.INTERRUPT:
                return outcome.from_trap(code, message, timeout_ms)
            return outcome.exception_message_failed(f"trapped: {outcome.trap_text(code, message)}")
        packed = args[0].i64 & _U64
        at, length = packed >> 32, packed & _U32
        base, memory_size = self.memory_view()
        if at + length > memory_size or (length and not at):
            return outcome.exception_message_failed(
                f"returned [{at}, {at + length}), outside memory of {memory_size} bytes")
        text = string_at(base + at, min(length, MESSAGE_LIMIT)) if length else b""
        return outcome.unwound(text.decode("utf-8", errors="replace").encode())

    def memory_view(self) -> tuple[int, int]:
        """Base address and size of linear memory, after any call that may have grown it.

        The size is read every time; the base only when the size changed: a
        memory never shrinks, and it can move only when it grows."""
        size = _memory_size(self.context, self.memory)
        if size != self.size:
            self.base = _memory_data(self.context, self.memory) or 0
            self.size = size
        return self.base, size


class CorralEntry(Entry):
    """An instance of a corral/1 guest."""

    __slots__ = ("alloc", "handle", "init", "alarm")

    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance, has_init: bool,
                 has_alarm: bool = False):
        super().__init__(store, instance)
        self.alloc = self.function("corral_alloc")
        self.handle = self.function("corral_handle")
        self.init = self.function("corral_init") if has_init else 0
        self.alarm = self.function("corral_alarm") if has_alarm else 0

    def run_alarm(self, retries: int, timeout_ms: int) -> Outcome:
        """corral_alarm(retries) (docs/alarms.md): 0 is done (200); anything else failed (422),
        and the worker keeps none of the run's writes."""
        if not self.alarm:
            return Outcome(Status.NOT_FOUND, b"the guest exports no corral_alarm")
        self.set_deadline(timeout_ms)
        self.args[0].i32 = retries
        fault = self.enter(self.alarm, 1, timeout_ms)
        if fault:
            return fault
        returned = self.args[0].i32
        if returned:
            return Outcome(Status.GUEST_ERROR, b"corral_alarm returned %d" % returned)
        return Outcome(Status.OK, b"")

    def handle_request(self, body: bytes, timeout_ms: int) -> Outcome:
        self.set_deadline(timeout_ms)
        args = self.args
        size = len(body)
        args[0].i32 = size
        fault = self.enter(self.alloc, 1, timeout_ms)
        if fault:
            return fault
        at = args[0].i32 & _U32
        if size:
            if at == 0:
                return outcome.abi_violation(f"corral_alloc({size}) returned 0 (out of memory)")
            base, memory_size = self.memory_view()
            if at + size > memory_size:
                return outcome.abi_violation(
                    f"corral_alloc({size}) returned {at}, outside memory of {memory_size} bytes")
            memmove(base + at, body, size)
        args[0].i32 = at
        args[1].i32 = size
        fault = self.enter(self.handle, 2, timeout_ms)
        if fault:
            return fault
        packed = args[0].i64 & _U64
        at, length = packed >> 32, packed & _U32
        if length == 0:
            return outcome.abi_violation("empty response: no status byte")
        base, memory_size = self.memory_view()
        if at + length > memory_size:
            return outcome.abi_violation(
                f"response [{at}, {at + length}) lies outside memory of {memory_size} bytes")
        return outcome.from_response(string_at(base + at, length))


_KINDS = {"i32", "i64", "f32", "f64"}
_I32_RANGE = (-(1 << 31), (1 << 32) - 1)
_I64_RANGE = (-(1 << 63), (1 << 64) - 1)


class PlainExport:
    __slots__ = ("address", "params", "results")

    def __init__(self, address: int, params: list[str], results: list[str]):
        self.address = address
        self.params = params
        self.results = results


class PlainEntry(Entry):
    """An instance of a plain module: JSON {"call", "args"} in, {"results"} out."""

    __slots__ = ("exports",)

    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance):
        self.exports: dict[str, PlainExport] = {}
        types: dict[str, tuple[list[str], list[str]]] = {}
        for name, item in instance.exports(store).items():
            if isinstance(item, wasmtime.Func):
                ty = item.type(store)
                kinds = [str(t) for t in ty.params], [str(t) for t in ty.results]
                if set(kinds[0]) | set(kinds[1]) <= _KINDS:
                    types[name] = kinds
        slots = max([len(p) + len(r) for p, r in types.values()] + [2])
        super().__init__(store, instance, slots)
        for name, (params, results) in types.items():
            self.exports[name] = PlainExport(self.function(name), params, results)

    def call(self, body: bytes, timeout_ms: int) -> Outcome:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return outcome.bad_call('body must be JSON {"call": "<export>", "args": [<numbers>]}')
        if not isinstance(request, dict) or not isinstance(request.get("call"), str):
            return outcome.bad_call('body must be JSON {"call": "<export>", "args": [<numbers>]}')
        name, values = request["call"], request.get("args", [])
        export = self.exports.get(name)
        if export is None:
            return outcome.bad_call(f"no exported function {name!r} with numeric parameters and results")
        if not isinstance(values, list) or len(values) != len(export.params):
            return outcome.bad_call(f"{name} takes {len(export.params)} arguments "
                                    f"({', '.join(export.params)})")
        args = self.args
        for i, (kind, value) in enumerate(zip(export.params, values)):
            problem = _store_value(args[i], kind, value)
            if problem:
                return outcome.bad_call(f"argument {i} of {name}: {problem}")
        self.set_deadline(timeout_ms)
        fault = self.enter(export.address, max(len(export.params), len(export.results)), timeout_ms)
        if fault:
            return fault
        results = [_load_value(args[i], kind) for i, kind in enumerate(export.results)]
        return Outcome(Status.OK, json.dumps({"results": results}).encode())


def _store_value(slot, kind: str, value: object) -> str | None:
    if kind in ("i32", "i64"):
        if type(value) is not int:
            return f"{kind} needs an integer, not {value!r}"
        lo, hi = _I32_RANGE if kind == "i32" else _I64_RANGE
        if not lo <= value <= hi:
            return f"{value} does not fit in {kind}"
        if kind == "i32":
            slot.i32 = value - (1 << 32) if value >= 1 << 31 else value
        else:
            slot.i64 = value - (1 << 64) if value >= 1 << 63 else value
        return None
    if type(value) not in (int, float):
        return f"{kind} needs a number, not {value!r}"
    setattr(slot, kind, float(value))
    return None


def _load_value(slot, kind: str) -> int | float | str:
    value = getattr(slot, kind)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value
