"""The fault vocabulary: how a return, a trap or an exception becomes a status.

docs/guest-abi.md, "Outcomes", in one place:
  status byte 0 -> 200 ok, 1 -> 422 guest error, 2 -> 500 unwind (caught panic)
  a Wasm exception escaping the export       -> 500 unwind, instance kept; the detail
                                                is corral_exception_message's text if the
                                                guest exports it
  corral_exception_message failing           -> 502 abort, instance poisoned
  a Wasm exception escaping corral_init      -> 502 abort (the instance never served)
  a trap with a trap code                    -> 502 abort, instance poisoned
  the epoch interrupt at the deadline        -> 504 deadline, instance poisoned
  the guest breaking the ABI (bad pointers)  -> 502 abort, instance poisoned
  a WASI guest calling proc_exit             -> 502 abort, instance poisoned
"""

from __future__ import annotations

from dataclasses import dataclass

from wasmtime import TrapCode

from corral.wire.protocol import Status

_TRAP_NAMES = {code.value: code.name.lower() for code in TrapCode}
INTERRUPT = TrapCode.INTERRUPT.value

STATUS_BYTES = {0: Status.OK, 1: Status.GUEST_ERROR, 2: Status.UNWIND}


@dataclass(slots=True)
class Outcome:  # not frozen: a frozen dataclass costs three times as much to make, once per request
    status: Status
    body: bytes              # the response body, or for a fault the detail
    fault: bytes = b""       # trap code name, b"exception", b"abi", ...
    poisoned: bool = False   # the instance is in an undefined state: never enter it again


def from_response(response: bytes) -> Outcome:
    """A corral/1 response: a status byte, then the body."""
    status = STATUS_BYTES.get(response[0])
    if status is None:
        return abi_violation(f"response status byte {response[0]} is not 0, 1 or 2")
    if status is Status.UNWIND:
        return Outcome(status, b"unwind: " + response[1:], b"panic")
    return Outcome(status, response[1:])


UNWOUND = b"unwind: a Wasm exception escaped the export"


def unwound(message: bytes = b"") -> Outcome:
    """An exception escaped an export: the guest's message for it, or a generic detail."""
    return Outcome(Status.UNWIND, b"unwind: " + message if message else UNWOUND, b"exception")


def exception_message_failed(detail: str) -> Outcome:
    """corral_exception_message trapped, threw or answered garbage: nothing it says can be trusted."""
    return Outcome(Status.ABORT, f"abort: corral_exception_message {detail}".encode(), b"exception_message",
                   poisoned=True)


def init_unwound(unwind: Outcome) -> Outcome:
    """An exception escaped corral_init: the instance never became ready to serve."""
    detail = b"abort: instantiation failed: an exception escaped corral_init"
    if unwind.body != UNWOUND:
        detail += b": " + unwind.body.removeprefix(b"unwind: ")
    return Outcome(Status.ABORT, detail, b"instantiate", poisoned=True)


def trap_text(code: int | None, message: str) -> str:
    """`trap NAME: CAUSE`, as abort details say it."""
    name = _TRAP_NAMES.get(code, "trap") if code is not None else "host"
    return f"trap {name}: {_cause(message) or name}"


def from_trap(code: int | None, message: str, timeout_ms: int) -> Outcome:
    """A trap (an escaped exception is not one: abi.Entry takes it out first, see unwound)."""
    if code == INTERRUPT:
        return Outcome(Status.DEADLINE, b"deadline: interrupted after %d ms" % timeout_ms,
                       b"interrupt", poisoned=True)
    if code is None and "Exited with i32 exit status" in message:
        status_code = message.split("Exited with i32 exit status", 1)[1].split()[0]
        return Outcome(Status.ABORT, f"abort: the guest called proc_exit({status_code})".encode(),
                       b"exit", poisoned=True)
    name = _TRAP_NAMES.get(code, "trap") if code is not None else "host"
    return Outcome(Status.ABORT, f"abort: {trap_text(code, message)}".encode(), name.encode(), poisoned=True)


def _cause(message: str) -> str:
    """The line of a wasmtime trap message that says what happened, without the backtrace."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if "wasm trap:" in line:
            return line.split("wasm trap:", 1)[1].strip()
    return lines[-1] if lines else ""


def abi_violation(detail: str) -> Outcome:
    return Outcome(Status.ABORT, f"abort: ABI violation: {detail}".encode(), b"abi", poisoned=True)


def instantiation_failed(message: str) -> Outcome:
    return Outcome(Status.ABORT, f"abort: instantiation failed: {_cause(message)}".encode(), b"instantiate",
                   poisoned=True)


def bad_call(detail: str) -> Outcome:
    """A plain-module request that names no callable export or passes bad arguments."""
    return Outcome(Status.BAD_REQUEST, detail.encode())


def expired() -> Outcome:
    """The request's deadline passed before the guest was entered: nothing is poisoned."""
    return Outcome(Status.DEADLINE, b"deadline: expired before the guest was entered")
