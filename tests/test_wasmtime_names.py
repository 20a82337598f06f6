"""The wasmtime-py private names the worker's hot path uses are checked when a
worker imports corral.workers.abi, and the range pyproject.toml allows is the
range that is tested."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def import_abi_after(prelude: str) -> subprocess.CompletedProcess:
    """Import corral.workers.abi in a fresh interpreter (as a worker does: -P)
    after `prelude` has taken something out of wasmtime-py."""
    return subprocess.run([sys.executable, "-P", "-c", prelude + "\nimport corral.workers.abi\n"],
                          capture_output=True, text=True, timeout=60)


def test_the_installed_wasmtime_has_every_name():
    done = import_abi_after("")
    assert done.returncode == 0, done.stderr


def test_a_missing_bindings_type_is_named_with_the_version():
    done = import_abi_after("import wasmtime._bindings as b\ndel b.wasmtime_exnref_t")
    version = importlib.metadata.version("wasmtime")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"corral.wire.exits.UntestedWasmtime: wasmtime {version} has no "
                    "wasmtime._bindings.wasmtime_exnref_t, which corral's hot path "
                    "(corral/workers/abi.py) uses; corral is tested with wasmtime>=50,<51"), last


def test_a_missing_c_function_is_named():
    prelude = """
import wasmtime._ffi as ffi
class WithoutOne:
    def __init__(self, dll):
        self.dll = dll
    def __getattr__(self, name):
        return getattr(self.dll, name)
    def __getitem__(self, name):
        if name == "wasmtime_context_take_exception":
            raise AttributeError(name)
        return self.dll[name]
ffi.dll = WithoutOne(ffi.dll)
"""
    done = import_abi_after(prelude)
    assert done.returncode != 0
    assert "has no C function wasmtime_context_take_exception in wasmtime._ffi.dll" in done.stderr


def test_a_missing_private_method_is_named():
    done = import_abi_after("import wasmtime\ndel wasmtime.Store._context")
    assert done.returncode != 0
    assert "has no wasmtime.Store._context, which" in done.stderr


def test_pyproject_allows_only_the_tested_range():
    from corral.workers import abi
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = {r.name: r for r in map(Requirement, project["dependencies"])}
    assert str(requirements["wasmtime"].specifier) == str(Requirement("wasmtime" + abi.TESTED_WASMTIME).specifier)
    for name, requirement in requirements.items():
        installed = importlib.metadata.version(name)
        assert requirement.specifier.contains(installed), f"{name} {installed} is outside {requirement}"
        assert any(s.operator == "<" for s in requirement.specifier), f"{name}: no upper bound"


def test_check_and_run_say_so_and_exit_70(tmp_path):
    """A whole daemon start with an untested wasmtime (one name taken out by a
    sitecustomize on PYTHONPATH, which every process of it loads)."""
    import json
    import os
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import wasmtime._bindings as b\ndel b.wasmtime_exnref_t\n")
    config = tmp_path / "corral.toml"
    config.write_text(f'[supervisor]\nfrontend = "ipc://{tmp_path}/f.sock"\ncontrol = "ipc://{tmp_path}/c.sock"\n'
                      f'cache_dir = "{tmp_path}/cache"\n[apps.echo]\nmodule = "{ROOT / "guests" / "echo.wat"}"\n')
    env = {**os.environ, "PYTHONPATH": str(site), "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    expected = (f"wasmtime {importlib.metadata.version('wasmtime')} has no wasmtime._bindings.wasmtime_exnref_t, "
                "which corral's hot path (corral/workers/abi.py) uses; corral is tested with wasmtime>=50,<51")
    check = subprocess.run([sys.executable, "-m", "corral", "check", "-c", str(config)],
                           capture_output=True, text=True, timeout=60, env=env)
    assert (check.returncode, check.stderr) == (70, f"corral: {expected}\n")
    run = subprocess.run([sys.executable, "-m", "corral", "run", "-c", str(config)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 70
    line = json.loads(run.stderr.strip().splitlines()[-1])
    assert (line["event"], line["level"], line["error"]) == ("daemon.start_failed", "error", expected)
