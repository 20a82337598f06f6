"""The Rust and C example guests: built by guests/build.py, driven through
the corral/1 ABI by hand with wasmtime (no daemon involved).

A missing toolchain fails these tests, naming the package to install."""

import os
import subprocess
import threading
from pathlib import Path

import pytest
import wasmtime

from harness import load_guest_builder

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


build = load_guest_builder()


@pytest.fixture(scope="session")
def built(built_guests):
    return built_guests


@pytest.fixture(scope="session")
def engine():
    return wasmtime.Engine()


@pytest.fixture(scope="session")
def modules(built, engine):
    return {name: wasmtime.Module.from_file(engine, str(path)) for name, path in built.items()}


class Guest:
    """One instance in a store of its own, called the way corral calls it."""

    def __init__(self, engine, module, memory_limit=None):
        self.store = wasmtime.Store(engine)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        self.exports = wasmtime.Instance(self.store, module, []).exports(self.store)
        self.memory = self.exports["memory"]

    def init(self):
        self.exports["corral_init"](self.store)

    def alloc(self, length):
        return self.exports["corral_alloc"](self.store, length)

    def handle(self, ptr, length):
        packed = self.exports["corral_handle"](self.store, ptr, length) & 0xFFFFFFFFFFFFFFFF
        ptr, length = packed >> 32, packed & 0xFFFFFFFF
        assert length >= 1, "a response has at least its status byte"
        assert ptr + length <= self.memory.data_len(self.store)
        response = self.memory.read(self.store, ptr, ptr + length)
        return response[0], bytes(response[1:])

    def call(self, body):
        ptr = self.alloc(len(body))
        assert ptr != 0, "corral_alloc ran out of memory"
        self.memory.write(self.store, body, ptr)
        return self.handle(ptr, len(body))


@pytest.fixture
def guest(engine, modules):
    return lambda name, **options: Guest(engine, modules[name], **options)


def trap_code(call):
    with pytest.raises(wasmtime.Trap) as trap:
        call()
    return trap.value.trap_code


def test_every_guest_is_a_corral_guest_that_imports_only_durable_state(built, modules):
    assert sorted(built) == ["c_aborts", "c_echo", "c_panics", "cpp_throws", "rust_counter", "rust_counter_durable",
                             "rust_counter_durable_unwind", "rust_counter_unwind",
                             "rust_echo", "rust_echo_unwind", "rust_kv", "rust_kv_unwind", "rust_panicky",
                             "rust_panicky_unwind"]
    for name, module in modules.items():
        imports = sorted((i.module, i.name) for i in module.imports)
        if "durable" in name:   # corral_guest::kv and ::alarm (docs/alarms.md), the clock its alarm needs
            assert imports == [("corral", "alarm_set"), ("corral", "kv_delete"), ("corral", "kv_get"),
                               ("corral", "kv_put"), ("wasi_snapshot_preview1", "clock_time_get")], (name, imports)
        else:
            assert imports == [], (name, imports)
        exports = {export.name: export.type for export in module.exports}
        assert isinstance(exports["memory"], wasmtime.MemoryType), name
        alloc, handle = exports["corral_alloc"], exports["corral_handle"]
        assert [str(t) for t in alloc.params] == ["i32"] and [str(t) for t in alloc.results] == ["i32"], name
        assert [str(t) for t in handle.params] == ["i32", "i32"], name
        assert [str(t) for t in handle.results] == ["i64"], name
    kv_init = {e.name: e.type for e in modules["rust_kv"].exports}["corral_init"]
    assert kv_init.params == [] and kv_init.results == []


def test_outputs_are_small_and_not_rebuilt_when_fresh(built):
    assert all(path.stat().st_size < 128 * 1024 for path in built.values())
    before = {name: path.stat().st_mtime_ns for name, path in built.items()}
    again = build.build_all()
    assert {name: path.stat().st_mtime_ns for name, path in again.items()} == before


@pytest.mark.parametrize("name", ["rust_echo", "c_echo"])
def test_echo_round_trips_bytes_exactly(guest, name):
    echo = guest(name)
    for body in [b"", b"x", bytes(range(256)), os.urandom(MIB), b"after the big one", b""]:
        assert echo.call(body) == (0, body)


@pytest.mark.parametrize("name", ["rust_echo", "c_echo"])
def test_alloc_returns_0_when_memory_cannot_grow(guest, name):
    echo = guest(name, memory_limit=2 * MIB)
    assert echo.alloc(4 * MIB) == 0
    assert echo.call(b"still fine") == (0, b"still fine")


@pytest.mark.parametrize("name", ["rust_echo", "c_echo"])
def test_handle_refuses_a_buffer_it_did_not_hand_out(guest, name):
    echo = guest(name)
    ptr = echo.alloc(4)
    status, message = echo.handle(ptr + 64, 4)
    assert status == 1 and b"corral_alloc" in message
    status, _ = echo.handle(ptr, 4)  # that request was used up
    assert status == 1


def test_kv_keeps_data_across_calls_in_one_instance(guest):
    kv = guest("rust_kv")
    kv.init()
    assert kv.call(b"set colour dark blue") == (0, b"")
    assert kv.call(b"set empty ") == (0, b"")
    assert kv.call(b"set raw \x00\xff\n") == (0, b"")
    assert kv.call(b"get colour") == (0, b"dark blue")
    assert kv.call(b"get empty") == (0, b"")
    assert kv.call(b"get raw") == (0, b"\x00\xff\n")
    assert kv.call(b"keys") == (0, b"colour\nempty\nraw")
    assert kv.call(b"del empty") == (0, b"")
    assert kv.call(b"get nothing") == (1, b"no such key: nothing")
    assert kv.call(b"del empty") == (1, b"no such key: empty")
    assert kv.call(b"frobnicate") == (1, b'unknown command "frobnicate"')
    assert kv.call(b"stats") == (0, b"keys=2 inits=1")
    # another instance is another store
    assert guest("rust_kv").call(b"get colour") == (1, b"no such key: colour")


def test_counter_counts_and_a_panic_is_an_unreachable_trap(guest):
    counter = guest("rust_counter")
    assert [counter.call(b"")[1] for _ in range(3)] == [b"1", b"2", b"3"]
    assert counter.call(b"get") == (0, b"3")
    assert counter.call(b"incr") == (0, b"4")
    assert trap_code(lambda: counter.call(b"panic")) == wasmtime.TrapCode.UNREACHABLE
    assert guest("rust_counter").call(b"get") == (0, b"0")  # a fresh instance starts from nothing


def test_panicky_counts_and_fails_each_way_on_request(guest):
    panicky = guest("rust_panicky", memory_limit=16 * MIB)
    assert [panicky.call(b"hello")[1] for _ in range(3)] == [b"1", b"2", b"3"]
    assert panicky.call(b"error") == (1, b"panicky: asked for an error")
    assert panicky.call(b"alloc 1000000") == (0, b"1000000")
    assert panicky.call(b"try-alloc 100000000") == (1, b"panicky: out of memory")
    assert panicky.call(b"alloc x") == (1, b"panicky: expected a byte count")
    assert panicky.call(b"hello") == (0, b"4")  # errors left the instance and its count alone

    assert trap_code(lambda: panicky.call(b"panic")) == wasmtime.TrapCode.UNREACHABLE
    assert guest("rust_panicky").call(b"hello") == (0, b"1")


def test_panicky_aborts_when_an_allocation_fails(guest):
    # memory.grow returns -1 at the limit; Rust's allocation error handler aborts
    panicky = guest("rust_panicky", memory_limit=16 * MIB)
    assert trap_code(lambda: panicky.call(b"alloc 100000000")) == wasmtime.TrapCode.UNREACHABLE


def test_panicky_stack_exhaustion_traps(guest):
    # Rust puts its shadow stack first in linear memory: running off its
    # bottom is an out-of-bounds access, before Wasm's own call stack is full
    assert trap_code(lambda: guest("rust_panicky").call(b"stack")) == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS


def test_panicky_loop_spins_until_the_epoch_deadline(built):
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    panicky = Guest(engine, wasmtime.Module.from_file(engine, str(built["rust_panicky"])))
    panicky.store.set_epoch_deadline(1)
    ticker = threading.Timer(0.2, engine.increment_epoch)
    ticker.start()
    try:
        assert trap_code(lambda: panicky.call(b"loop")) == wasmtime.TrapCode.INTERRUPT
    finally:
        ticker.cancel()


def test_c_aborts_traps_with_the_code_for_each_fault(guest):
    aborts = guest("c_aborts")
    assert [aborts.call(b"hi")[1] for _ in range(2)] == [b"1", b"2"]
    assert trap_code(lambda: aborts.call(b"abort")) == wasmtime.TrapCode.UNREACHABLE
    assert trap_code(lambda: guest("c_aborts").call(b"oob")) == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS
    assert trap_code(lambda: guest("c_aborts").call(b"div0")) == wasmtime.TrapCode.INTEGER_DIVISION_BY_ZERO
    assert guest("c_aborts").call(b"hi") == (0, b"1")


def test_both_rust_builds_export_the_stack_pointer_and_only_unwind_the_exception_exports(modules):
    for example in build.RUST_EXAMPLES:
        aborting = {e.name: e.type for e in modules[f"rust_{example}"].exports}
        unwinding = {e.name: e.type for e in modules[f"rust_{example}_unwind"].exports}
        for exports in (aborting, unwinding):
            assert isinstance(exports["__stack_pointer"], wasmtime.GlobalType), example
            assert exports["__stack_pointer"].mutable, example
        assert "corral_exception_message" not in aborting and "__cpp_exception" not in aborting
        assert isinstance(unwinding["__cpp_exception"], wasmtime.TagType), example
        message = unwinding["corral_exception_message"]
        assert [str(t) for t in message.params] == ["i32"] and [str(t) for t in message.results] == ["i64"]


def test_an_unwinding_rust_panic_escapes_as_a_wasm_exception_and_the_instance_lives_on(guest):
    counter = guest("rust_counter_unwind")
    assert [counter.call(b"")[1] for _ in range(2)] == [b"1", b"2"]
    with pytest.raises(wasmtime.Trap) as trap:
        counter.call(b"panic")
    assert trap.value.trap_code is None and "thrown Wasm exception" in trap.value.message
    assert counter.call(b"get") == (0, b"3")   # the increment before the panic, kept


def test_crate_panic_hook_and_catch_unwind_natively(built, tmp_path):
    # the hook that records a panic's location and message, and catch_unwind
    # clearing thread::panicking(), run on the host target too
    rustc = build.find_rust().rustc
    binary = tmp_path / "corral_guest_tests"
    compiled = subprocess.run(
        [rustc, "--edition", "2021", "--test", str(build.CRATE), "-o", str(binary)],
        capture_output=True, text=True,
    )
    assert compiled.returncode == 0, compiled.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "the_hook_records_location_and_message_and_panicking_is_cleared ... ok" in ran.stdout


def test_a_missing_toolchain_names_the_package():
    with pytest.raises(build.ToolchainMissing) as missing:
        build.find_rust(["/nonexistent/rustc"])
    assert "rust-web-src" in str(missing.value)
