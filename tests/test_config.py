"""Config validation: every problem named with its file and key, and `corral check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import GUESTS
from corral import config
from corral.config import ConfigError
from corral.config import to_toml as toml

EX_CONFIG = 78


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    return caught.value.problems


ECHO = f'[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n'


def test_defaults_are_filled_in(tmp_path):
    loaded = config.load(write(tmp_path, ECHO))
    assert loaded.supervisor.workers == 2
    assert loaded.supervisor.frontend == ("tcp://127.0.0.1:5555",)
    assert (loaded.supervisor.max_inflight_per_client, loaded.supervisor.max_client_backlog_mib) == (1000, 64)
    assert loaded.apps["echo"].instances == "reuse"
    assert loaded.apps["echo"].on_abort == "respawn"
    assert loaded.apps["echo"].module == GUESTS / "echo.wat"


def test_keyed_apps_reinstantiate_on_abort_by_default(tmp_path):
    loaded = config.load(write(tmp_path, ECHO + 'instances = "keyed"\n'))
    assert loaded.apps["echo"].on_abort == "reinstantiate"
    loaded = config.load(write(tmp_path, ECHO + 'instances = "keyed"\non_abort = "respawn"\n'))
    assert loaded.apps["echo"].on_abort == "respawn"


def test_module_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "e.wat").write_text((GUESTS / "echo.wat").read_text())
    loaded = config.load(write(tmp_path, '[apps.e]\nmodule = "g/e.wat"\n'))
    assert loaded.apps["e"].module == tmp_path / "g" / "e.wat"


def test_frontend_may_list_several_endpoints(tmp_path):
    loaded = config.load(write(tmp_path, f'[supervisor]\nfrontend = ["tcp://127.0.0.1:7000", '
                                         f'"ipc://{tmp_path}/f.sock"]\n' + ECHO))
    assert loaded.supervisor.frontend == ("tcp://127.0.0.1:7000", f"ipc://{tmp_path}/f.sock")


@pytest.mark.parametrize("text, where, words", [
    ("[supervisor]\nwokers = 2\n", "[supervisor] wokers", "unknown key"),
    ("[supervisor]\nworkers = \"two\"\n", "[supervisor] workers", "must be an integer"),
    ("[supervisor]\nworkers = 0\n", "[supervisor] workers", "between 1 and 256"),
    ("[supervisor]\nworkers = true\n", "[supervisor] workers", "must be an integer"),
    ("[supervisor]\nfrontend = \"http://localhost:80\"\n", "[supervisor] frontend", "not a tcp://"),
    ("[supervisor]\nfrontend = \"tcp://127.0.0.1:99999\"\n", "[supervisor] frontend", "out of range"),
    ("[supervisor]\nfrontend = \"ipc://\"\n", "[supervisor] frontend", "has no path"),
    ("[supervisor]\nfrontend = \"ipc:///" + "x" * 120 + "\"\n", "[supervisor] frontend", "longer"),
    ("[supervisor]\ncontrol = \"udp://x\"\n", "[supervisor] control", "not a tcp://"),
    ("[supervisor]\ngraceful_timeout_s = -1\n", "[supervisor] graceful_timeout_s", "greater than 0"),
    ("[supervisor]\nmax_inflight_per_client = 0\n", "[supervisor] max_inflight_per_client", "between 1 and"),
    ("[supervisor]\nmax_client_backlog_mib = 0\n", "[supervisor] max_client_backlog_mib", "between 1 and"),
    ("[restart]\nintensity = 1.5\n", "[restart] intensity", "must be an integer"),
    ("[restart]\nbackoff_initial_ms = 500\nbackoff_max_ms = 100\n", "[restart] backoff_initial_ms", "exceed"),
    ("[logging]\nformat = \"xml\"\n", "[logging] format", "one of"),
    ("[logging]\nlevel = \"loud\"\n", "[logging] level", "one of"),
    ("[metrics]\nlisten = \"nowhere\"\n", "[metrics] listen", "HOST:PORT"),
    ("[extra]\nx = 1\n", "[extra]", "unknown section"),
])
def test_each_bad_value_is_named_with_file_and_key(tmp_path, text, where, words):
    found = problems(tmp_path, text + ECHO)
    assert len(found) == 1, found
    assert found[0].startswith(str(tmp_path / "corral.toml") + ": " + where + ":"), found[0]
    assert words in found[0]


@pytest.mark.parametrize("app, where, words", [
    ({"instances": "keyed"}, "[apps.x] module", "missing"),
    ({"module": "nowhere.wat"}, "[apps.x] module", "does not exist"),
    ({"module": "x.txt"}, "[apps.x] module", "not a .wasm or .wat"),
    ({"module": str(GUESTS / "echo.wat"), "instances": "pooled"}, "[apps.x] instances", "one of"),
    ({"module": str(GUESTS / "echo.wat"), "on_abort": "ignore"}, "[apps.x] on_abort", "one of"),
    ({"module": str(GUESTS / "echo.wat"), "timeout_ms": 0}, "[apps.x] timeout_ms", "between"),
    ({"module": str(GUESTS / "echo.wat"), "idempotent": "yes"}, "[apps.x] idempotent", "boolean"),
    ({"module": str(GUESTS / "echo.wat"), "memory": 5}, "[apps.x] memory", "unknown key"),
    ({"module": str(GUESTS / "echo.wat"), "max_keys": -1}, "[apps.x] max_keys", "0 or more"),
])
def test_bad_apps_are_named(tmp_path, app, where, words):
    found = problems(tmp_path, toml({"apps": {"x": app}}))
    assert any(p.startswith(f"{tmp_path / 'corral.toml'}: {where}:") and words in p for p in found), found


def test_all_problems_are_reported_at_once(tmp_path):
    found = problems(tmp_path, "[supervisor]\nworkers = 0\nliveness = \"x\"\n[apps.a]\nmodule = \"none.wat\"\n")
    assert len(found) == 3


def test_reserved_service_names(tmp_path):
    found = problems(tmp_path, toml({"apps": {"mmi.x": {"module": str(GUESTS / "echo.wat")}}}))
    assert "must not start with 'mmi.'" in found[0]


def test_toml_syntax_errors_name_the_file(tmp_path):
    found = problems(tmp_path, "[supervisor\nworkers = 2\n")
    assert found[0].startswith(f"{tmp_path / 'corral.toml'}: not valid TOML")


def test_no_apps_is_an_error(tmp_path):
    assert "nothing to serve" in problems(tmp_path, "[supervisor]\nworkers = 1\n")[0]


def corral_check(path: Path, scratch: Path) -> subprocess.CompletedProcess:
    """`corral check`, its module cache (and any runtime directory) kept in `scratch`."""
    env = {**os.environ, "XDG_CACHE_HOME": str(scratch / "cache"), "RUNTIME_DIRECTORY": str(scratch / "run")}
    env.pop("CACHE_DIRECTORY", None)
    return subprocess.run([sys.executable, "-m", "corral", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_corral_check_accepts_the_packaged_config(tmp_path):
    run = corral_check(Path(__file__).resolve().parent.parent / "config" / "corral.toml", tmp_path)
    assert run.returncode == 0, run.stderr
    assert "ok, 3 apps" in run.stdout


@pytest.mark.parametrize("text, words", [
    ("[supervisor]\nwokers = 2\n" + ECHO, "[supervisor] wokers: unknown key"),
    ("[supervisor]\nworkers = \"2\"\n" + ECHO, "[supervisor] workers: must be an integer"),
    ("[apps.echo]\nmodule = \"missing.wasm\"\n", "[apps.echo] module: file"),
    ("[supervisor]\nfrontend = \"tcp://localhost\"\n" + ECHO, "[supervisor] frontend:"),
    ("[apps.bad]\nmodule = \"bad.wat\"\n", "[apps.bad] module: bad.wat does not compile"),
    ("[apps.imports]\nmodule = \"imports.wat\"\n", "[apps.imports] module: imports env.now"),
    ("[apps.big]\nmodule = \"big.wat\"\nmax_memory_mib = 1\n", "[apps.big] module: needs 2 MiB"),
    ("[apps.half]\nmodule = \"half.wat\"\n", "[apps.half] module: exports corral_handle but not"),
    ("[apps.start]\nmodule = \"start.wat\"\n",
     "[apps.start] module: its first instance fails: abort: trap unreachable"),
    ("[apps.data]\nmodule = \"data.wat\"\n", "[apps.data] module: its first instance fails: abort: trap memory_out_of_bounds"),
    ("[apps.exit]\nmodule = \"exit.wat\"\n",
     "[apps.exit] module: its first instance fails: abort: the guest called proc_exit(7)"),
    ("[apps.spin]\nmodule = \"spin.wat\"\ntimeout_ms = 50\n",
     "[apps.spin] module: its first instance fails: deadline: interrupted after 50 ms"),
])
def test_corral_check_names_file_key_and_problem(tmp_path, text, words):
    (tmp_path / "bad.wat").write_text("(module (func (export \"f\") i32.add))")
    (tmp_path / "imports.wat").write_text('(module (import "env" "now" (func)))')
    (tmp_path / "big.wat").write_text('(module (memory (export "memory") 32))')
    (tmp_path / "half.wat").write_text(
        '(module (func (export "corral_handle") (param i32 i32) (result i64) i64.const 0))')
    # compile, but no instance can be made: a start function that traps or never
    # returns, a data segment past the end of memory
    (tmp_path / "start.wat").write_text('(module (func $f unreachable) (start $f))')
    (tmp_path / "spin.wat").write_text('(module (func $f (loop (br 0))) (start $f))')
    (tmp_path / "data.wat").write_text('(module (memory 1) (data (i32.const 65535) "xy"))')
    (tmp_path / "exit.wat").write_text('(module (import "wasi_snapshot_preview1" "proc_exit" (func $x (param i32)))'
                                       ' (memory (export "memory") 1)'
                                       ' (func $f (call $x (i32.const 7))) (start $f))')
    run = corral_check(write(tmp_path, text), tmp_path)
    assert run.returncode == EX_CONFIG, run.stdout
    assert str(tmp_path / "corral.toml") in run.stderr
    assert words in run.stderr, run.stderr


def test_corral_run_names_an_endpoint_it_cannot_bind(tmp_path):
    path = write(tmp_path, f'[supervisor]\nfrontend = "ipc:///no/such/dir/f.sock"\n'
                           f'control = "ipc://{tmp_path}/c.sock"\ncache_dir = "{tmp_path}/cache"\n' + ECHO)
    run = subprocess.run([sys.executable, "-m", "corral", "run", "-c", str(path)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RUNTIME_DIRECTORY": str(tmp_path / "run")})
    assert run.returncode == 69
    assert "daemon.bind_failed" in run.stderr and "/no/such/dir/f.sock" in run.stderr


def test_corral_run_exits_with_the_config_error_code(tmp_path):
    run = subprocess.run([sys.executable, "-m", "corral", "run", "-c", str(write(tmp_path, "[supervisor]\nx=1\n"))],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == EX_CONFIG
    assert "[supervisor] x: unknown key" in run.stderr
