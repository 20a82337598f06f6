"""C++ exceptions and C corral_panic: guests built from source with zig,
unwinding out of the guest as Wasm exceptions.

Two layers. `ContractHost` drives a guest in-process the way docs/guest-abi.md
("Exceptions") says the host must (save `__stack_pointer` before a call, restore it
after an escape, hand the exception's payload to
`corral_exception_message`), so the guest side is checked on its own. The
process-level tests send the same requests through the real daemon.
The guests come from the `unwind_guests` fixture (conftest.py).
"""

from __future__ import annotations

import ctypes
import re

import pytest
import wasmtime
from wasmtime import _bindings as ffi


class Escaped(Exception):
    """A Wasm exception left the guest; .message is what corral_exception_message said."""

    def __init__(self, message: bytes | None, tag_is_cpp: bool):
        super().__init__(message)
        self.message = message
        self.tag_is_cpp = tag_is_cpp


class ContractHost:
    """One instance, called by docs/guest-abi.md's rules (wasmtime-py's slow API: clarity over speed)."""

    def __init__(self, engine: wasmtime.Engine, module: wasmtime.Module, restore_stack: bool = True,
                 ask_message: bool = True):
        self.store = wasmtime.Store(engine)
        self.restore_stack = restore_stack
        self.ask_message = ask_message
        self.exports = wasmtime.Instance(self.store, module, []).exports(self.store)
        self.memory = self.exports["memory"]
        self.stack_pointer = self.exports["__stack_pointer"]
        self.tag = self.exports["__cpp_exception"]
        if "corral_init" in self.exports:
            self.enter("corral_init")

    def enter(self, name: str, *args):
        saved = self.stack_pointer.value(self.store)
        try:
            return self.exports[name](self.store, *args)
        except wasmtime.Trap as trap:
            if trap.trap_code is not None:
                raise
            exnref = ffi.wasmtime_exnref_t()
            context = self.store._context()
            assert ffi.wasmtime_context_take_exception(context, ctypes.byref(exnref)), "a trap with no code and no exception"
            try:
                tag = ffi.wasmtime_tag_t()
                assert not ffi.wasmtime_exnref_tag(context, ctypes.byref(exnref), ctypes.byref(tag))
                is_cpp = bool(ffi.wasmtime_tag_eq(context, ctypes.byref(tag), ctypes.byref(self.tag._tag)))
                field = ffi.wasmtime_val_t()
                assert ffi.wasmtime_exnref_field_count(context, ctypes.byref(exnref)) == 1
                assert not ffi.wasmtime_exnref_field(context, ctypes.byref(exnref), 0, ctypes.byref(field))
                payload = field.of.i32
            finally:
                ffi.wasmtime_exnref_unroot(ctypes.byref(exnref))
            if self.restore_stack:
                self.stack_pointer.set_value(self.store, saved)
            message = None
            if is_cpp and self.ask_message and "corral_exception_message" in self.exports:
                message = self.read(self.exports["corral_exception_message"](self.store, payload))
            raise Escaped(message, is_cpp) from None

    def read(self, packed: int) -> bytes:
        packed &= 0xFFFFFFFFFFFFFFFF
        ptr, length = packed >> 32, packed & 0xFFFFFFFF
        assert ptr + length <= self.memory.data_len(self.store)
        return bytes(self.memory.read(self.store, ptr, ptr + length))

    def call(self, body: bytes) -> tuple[int, bytes]:
        ptr = self.enter("corral_alloc", len(body))
        assert ptr != 0
        self.memory.write(self.store, body, ptr)
        response = self.read(self.enter("corral_handle", ptr, len(body)))
        return response[0], response[1:]

    def ok(self, body: bytes) -> bytes:
        status, reply = self.call(body)
        assert status == 0, reply
        return reply


def stats(reply: bytes) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", reply.decode())}


@pytest.fixture(scope="module")
def engine():
    return wasmtime.Engine()


@pytest.fixture(scope="module")
def host(engine, unwind_guests):
    modules = {name: wasmtime.Module.from_file(engine, str(path)) for name, path in unwind_guests.items()}
    return lambda name, **options: ContractHost(engine, modules[name], **options)


# --- in-process, the guest side of the contract ------------------------------

@pytest.mark.parametrize("name", ["cpp_throws", "c_panics"])
def test_guest_imports_nothing_and_exports_what_the_host_needs(engine, unwind_guests, name):
    module = wasmtime.Module.from_file(engine, str(unwind_guests[name]))
    assert module.imports == []
    exports = {e.name for e in module.exports}
    assert {"memory", "corral_alloc", "corral_handle", "corral_exception_message",
            "__stack_pointer", "__cpp_exception"} <= exports


def test_cpp_uncaught_throw_escapes_with_its_what_and_the_state_stays(host):
    guest = host("cpp_throws")
    assert guest.ok(b"incr") == b"1"
    with pytest.raises(Escaped) as escaped:
        guest.call(b"throw the ledger is on fire")
    assert escaped.value.tag_is_cpp
    assert escaped.value.message == b"the ledger is on fire"
    assert guest.ok(b"get") == b"2"   # the throw's own increment stayed too
    after = stats(guest.ok(b"stats"))
    assert after["uncaught"] == 0 and after["live"] == 0
    assert after["destroyed"] == 2   # both guards ran on the way out


def test_cpp_exception_stays_uncaught_until_corral_exception_message_takes_it(host):
    for ask, left in ((False, 3), (True, 0)):
        guest = host("cpp_throws", ask_message=ask)
        for _ in range(3):
            with pytest.raises(Escaped):
                guest.call(b"throw unattended")
        assert stats(guest.ok(b"stats"))["uncaught"] == left


def test_cpp_caught_throw_answers_and_ran_its_destructors(host):
    guest = host("cpp_throws")
    assert guest.ok(b"catch inside") == b"caught inside, 2 guards destroyed"
    assert stats(guest.ok(b"stats"))["uncaught"] == 0


def test_cpp_throws_from_libcxx_and_of_other_types_are_named(host):
    guest = host("cpp_throws")
    with pytest.raises(Escaped) as escaped:
        guest.call(b"at")
    assert escaped.value.message == b"basic_string"
    with pytest.raises(Escaped) as escaped:
        guest.call(b"int")
    assert escaped.value.message == b"an exception of type i"


def test_c_panic_escapes_with_its_message_and_the_count_stays(host):
    guest = host("c_panics")
    assert guest.ok(b"tick") == b"1"
    with pytest.raises(Escaped) as escaped:
        guest.call(b"panic out of cheese")
    assert escaped.value.tag_is_cpp and escaped.value.message == b"out of cheese (count 2)"
    assert guest.call(b"caught by hand") == (2, b"by hand")
    assert guest.ok(b"get") == b"2"


@pytest.mark.parametrize("name, request_body", [("cpp_throws", b"throw again"), ("c_panics", b"panic again")])
def test_escapes_leave_the_stack_where_it_was_only_if_the_host_restores_it(host, name, request_body):
    def frame(guest):
        if name == "cpp_throws":
            return stats(guest.ok(b"stats"))["stack"]
        return int(guest.ok(b"stack"))

    for restore in (True, False):
        guest = host(name, restore_stack=restore)
        before = frame(guest)
        for _ in range(20):
            with pytest.raises(Escaped):
                guest.call(request_body)
        if restore:
            assert frame(guest) == before
        else:
            # the mechanism this guards: each escape skips the epilogues
            assert frame(guest) < before


# --- through the daemon -------------------------------------------------------

@pytest.fixture
def unwind_daemon(start_daemon, unwind_guests):
    # keyed: every request for a key meets the same instance, so its state is visible
    return start_daemon({
        "cpp": {"module": unwind_guests["cpp_throws"], "instances": "keyed"},
        "c": {"module": unwind_guests["c_panics"], "instances": "keyed"},
    }, supervisor={"workers": 1})


def aborts(daemon) -> list[dict]:
    return [e for e in daemon.events("request.failed") if e.get("status") in (502, 504)]


@pytest.mark.timeout(90)
def test_daemon_cpp_uncaught_throw_is_500_with_what_and_the_count_survives(unwind_daemon):
    client = unwind_daemon.client()
    assert client.call("cpp", b"incr", key="k").body == b"1"
    reply = client.call("cpp", b"throw the ledger is on fire", key="k")
    assert reply.status == 500
    assert b"the ledger is on fire" in reply.body
    assert client.call("cpp", b"get", key="k").body == b"2"
    after = stats(client.call("cpp", b"stats", key="k").body)
    assert after["uncaught"] == 0 and after["live"] == 0 and after["destroyed"] == 2


@pytest.mark.timeout(90)
def test_daemon_cpp_throw_caught_inside_the_guest_is_200_and_ran_its_destructors(unwind_daemon):
    client = unwind_daemon.client()
    reply = client.call("cpp", b"catch mine", key="k")
    assert (reply.status, reply.body) == (200, b"caught mine, 2 guards destroyed")
    assert stats(client.call("cpp", b"stats", key="k").body)["live"] == 0


@pytest.mark.timeout(90)
def test_daemon_cpp_library_and_non_std_throws_are_500_with_their_names(unwind_daemon):
    client = unwind_daemon.client()
    at = client.call("cpp", b"at", key="k")
    assert at.status == 500 and b"basic_string" in at.body
    other = client.call("cpp", b"int", key="k")
    assert other.status == 500 and b"an exception of type i" in other.body


@pytest.mark.timeout(90)
def test_daemon_cpp_out_of_memory_is_bad_alloc_unwinding_and_the_instance_stays(start_daemon, unwind_guests):
    daemon = start_daemon({"cpp": {"module": unwind_guests["cpp_throws"], "instances": "keyed",
                                   "max_memory_mib": 8}}, supervisor={"workers": 1})
    client = daemon.client()
    assert client.call("cpp", b"incr", key="k").body == b"1"
    assert client.call("cpp", b"alloc 2", key="k").body == b"%d" % (2 << 20)
    reply = client.call("cpp", b"alloc 64", key="k")
    assert reply.status == 500 and b"std::bad_alloc" in reply.body
    assert client.call("cpp", b"incr", key="k").body == b"2"


@pytest.mark.timeout(90)
def test_daemon_cpp_throw_through_noexcept_is_an_abort_and_the_count_restarts(unwind_daemon):
    client = unwind_daemon.client()
    assert client.call("cpp", b"incr", key="k").body == b"1"
    reply = client.call("cpp", b"terminate", key="k")
    assert reply.status == 502 and b"unreachable" in reply.body
    assert client.call("cpp", b"incr", key="k").body == b"1"   # keyed: reinstantiated


@pytest.mark.timeout(90)
def test_daemon_c_corral_panic_is_500_with_its_message_and_the_count_survives(unwind_daemon):
    client = unwind_daemon.client()
    assert client.call("c", b"tick", key="k").body == b"1"
    reply = client.call("c", b"panic out of cheese", key="k")
    assert reply.status == 500 and b"out of cheese (count 2)" in reply.body
    caught = client.call("c", b"caught by hand", key="k")
    assert caught.status == 500 and b"by hand" in caught.body
    assert client.call("c", b"get", key="k").body == b"2"


ESCAPES = 1500


@pytest.mark.timeout(180)
@pytest.mark.parametrize("service, body", [("cpp", b"throw over and over"), ("c", b"panic over and over")])
def test_daemon_many_escapes_on_one_instance_leave_it_whole(unwind_daemon, service, body):
    """Each escape skips the guest's epilogues: without the host's __stack_pointer
    restore the frame below moves down on every one (and the instance would
    fault once the shadow stack ran out); without corral_exception_message the
    C++ exceptions would pile up uncaught."""
    client = unwind_daemon.client()
    pid = unwind_daemon.worker_pids()

    def probe() -> dict[str, int]:
        if service == "cpp":
            return stats(client.call(service, b"stats", key="k").body)
        return {"stack": int(client.call(service, b"stack", key="k").body)}

    before = probe()
    for start in range(0, ESCAPES, 100):
        ids = [client.send(service, body, key="k") for _ in range(min(100, ESCAPES - start))]
        replies = client.gather(ids, timeout=60)
        wrong = [(r.status, r.body[:80]) for r in replies.values()
                 if r.status != 500 or b"over and over" not in r.body]
        assert not wrong, f"after {start} escapes: {wrong[:3]}"
    after = probe()
    assert after["stack"] == before["stack"]
    if service == "cpp":
        assert after["count"] == before["count"] + ESCAPES
        assert (after["uncaught"], after["live"]) == (0, 0)
        assert after["pages"] == before["pages"]
    else:
        assert client.call(service, b"get", key="k").body == b"%d" % ESCAPES
    assert unwind_daemon.worker_pids() == pid
    assert aborts(unwind_daemon) == []
