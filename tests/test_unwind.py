"""The unwind half of the fault model, in-process: the host's save and restore
of `__stack_pointer` and its use of `corral_exception_message`, driven with
the hand-written guests in guests/unwind/ through corral.workers.host.Guest
(the worker's own code, no daemon; the process-level tests are in
test_unwind_rust.py)."""

from __future__ import annotations

import struct

import pytest
import wasmtime

from harness import GUESTS

from corral.workers import modules
from corral.workers.host import Guest
from corral.workers.spec import AppSpec

UNWIND = GUESTS / "unwind" / "unwind.wat"
INIT_THROWS = GUESTS / "unwind" / "init_throws.wat"
STACK_TOP = 196608


@pytest.fixture(scope="module")
def engine(worker_engine):
    return worker_engine


def make_guest(engine, path, tmp_path, timeout_ms=1000) -> Guest:
    module, artifact = modules.compile_cached(engine, path, tmp_path)
    app = AppSpec(name="g", module=str(path), artifact=str(artifact), instances="keyed",
                  timeout_ms=timeout_ms, max_memory_mib=16, on_abort="reinstantiate")
    return Guest(engine, app, tmp_path, restart_intensity=100, restart_period_s=30.0, bounded=False,
                 module=module)


@pytest.fixture
def guest(engine, tmp_path):
    return make_guest(engine, UNWIND, tmp_path)


def count(result) -> int:
    assert result.status == 200, result
    return struct.unpack("<i", result.body)[0]


def stack_pointer(guest: Guest, key=b"k") -> int:
    entry = guest.instances[key]
    return entry.instance.exports(entry.store)["__stack_pointer"].value(entry.store)


def test_an_escaped_exception_is_500_with_the_guests_message_and_the_state_is_kept(guest):
    assert [count(guest.run(b"k", b"c", 1000)) for _ in range(3)] == [1, 2, 3]
    result = guest.run(b"k", b"t0", 1000)
    # the guest's message export checks the stack pointer was restored before it ran
    assert (result.status, result.body, result.poisoned) == (500, b"unwind: boom: stack restored", False)
    assert count(guest.run(b"k", b"g", 1000)) == 3
    assert stack_pointer(guest) == STACK_TOP


def test_a_thousand_escapes_leave_the_stack_pointer_where_it_was(guest):
    # each escape skips the guest's epilogue and would leak 4 KiB of shadow
    # stack: without the restore the 49th escape faults outside memory
    count(guest.run(b"k", b"c", 1000))
    for _ in range(1000):
        result = guest.run(b"k", b"t0", 1000)
        assert result.status == 500, result
    assert stack_pointer(guest) == STACK_TOP
    assert count(guest.run(b"k", b"c", 1000)) == 2


def test_another_tag_gets_the_generic_detail_and_the_stack_is_still_restored(guest):
    count(guest.run(b"k", b"c", 1000))
    for _ in range(100):
        result = guest.run(b"k", b"o", 1000)
        assert (result.status, result.body) == (500, b"unwind: a Wasm exception escaped the export")
    assert stack_pointer(guest) == STACK_TOP
    assert count(guest.run(b"k", b"g", 1000)) == 1


def test_an_exception_escaping_corral_alloc_is_an_unwind(guest):
    count(guest.run(b"k", b"c", 1000))
    count(guest.run(b"k", b"a", 1000))   # arms the next corral_alloc to throw
    result = guest.run(b"k", b"c", 1000)
    assert (result.status, result.body, result.poisoned) == (500, b"unwind: boom: stack restored", False)
    assert stack_pointer(guest) == STACK_TOP
    assert count(guest.run(b"k", b"c", 1000)) == 2


@pytest.mark.parametrize("mode, detail", [
    (b"1", b"abort: corral_exception_message trapped: trap unreachable"),
    (b"2", b"abort: corral_exception_message threw an exception of its own"),
    (b"3", b"abort: corral_exception_message returned [4294901760, 4294901776), outside memory"),
])
def test_a_message_export_that_fails_makes_the_request_an_abort(guest, mode, detail):
    count(guest.run(b"k", b"c", 1000))
    result = guest.run(b"k", b"t" + mode, 1000)
    assert result.status == 502 and result.poisoned, result
    assert result.body.startswith(detail), result.body
    assert b"k" not in guest.instances   # never entered again
    assert count(guest.run(b"k", b"g", 1000)) == 0   # a fresh instance


def test_a_message_export_that_spins_is_stopped_at_the_requests_deadline(engine, tmp_path):
    guest = make_guest(engine, UNWIND, tmp_path, timeout_ms=100)
    result = guest.run(b"k", b"t5", 100)
    assert result.status == 504 and result.poisoned, result


def test_a_long_message_is_cut_at_4_kib_and_invalid_utf8_replaced(guest):
    result = guest.run(b"k", b"t4", 1000)
    assert result.status == 500 and not result.poisoned
    text = result.body.decode()   # valid UTF-8 now
    assert text == "unwind: \ufffd" + "x" * 4095


def test_an_exception_escaping_corral_init_fails_the_instantiation(engine, tmp_path):
    guest = make_guest(engine, INIT_THROWS, tmp_path)
    result = guest.run(b"k", b"anything", 1000)
    assert result.status == 502 and result.poisoned, result
    assert result.body == b"abort: instantiation failed: an exception escaped corral_init"
    assert b"k" not in guest.instances


def compile_wat(engine, text):
    return wasmtime.Module(engine, wasmtime.wat2wasm(text))


ABI = """
  (memory (export "memory") 1)
  (func (export "corral_alloc") (param i32) (result i32) (i32.const 0))
  (func (export "corral_handle") (param i32 i32) (result i64) (i64.const 0))
"""


@pytest.mark.parametrize("export, problem", [
    ('(global (export "__stack_pointer") i32 (i32.const 0))', "__stack_pointer"),
    ('(global (export "__stack_pointer") (mut i64) (i64.const 0))', "__stack_pointer"),
    ('(func (export "__stack_pointer"))', "__stack_pointer"),
    ('(global (export "__cpp_exception") i32 (i32.const 0))', "__cpp_exception"),
    ('(func (export "corral_exception_message") (param i32) (result i32) (i32.const 0))',
     "corral_exception_message"),
    ('(func (export "corral_exception_message") (param i64) (result i64) (i64.const 0))',
     "corral_exception_message"),
])
def test_inspect_names_an_unwind_export_of_the_wrong_type(engine, export, problem):
    module = compile_wat(engine, f"(module {ABI} {export})")
    with pytest.raises(modules.ModuleProblem, match=problem):
        modules.inspect(module)


def test_inspect_accepts_the_unwind_exports_and_a_message_export_needs_memory(engine):
    modules.inspect(compile_wat(engine, UNWIND.read_text()))
    with pytest.raises(modules.ModuleProblem, match="corral_exception_message"):
        modules.inspect(compile_wat(engine, """(module
          (func (export "corral_exception_message") (param i32) (result i64) (i64.const 0)))"""))


def test_corral_check_refuses_a_module_whose_corral_init_throws(tmp_path):
    from test_config import corral_check
    config = tmp_path / "corral.toml"
    config.write_text(f'[apps.x]\nmodule = "{INIT_THROWS}"\n')
    run = corral_check(config, tmp_path)
    assert run.returncode == 78, run.stdout + run.stderr
    assert "an exception escaped corral_init" in run.stderr
