"""The exit codes of `corral run` and `corral check` (sysexits.h), each defined once, and
the one exception that has a code of its own.

Wasmtime-free: the daemon and the CLI import this, and never load wasmtime.
"""

from __future__ import annotations

EX_UNAVAILABLE = 69   # an endpoint cannot be bound
EX_SOFTWARE = 70      # the installed wasmtime is not one corral was tested with (UntestedWasmtime)
EX_NOPERM = 77        # a runtime or cache directory belongs to someone else
EX_CONFIG = 78        # a configuration error (systemd: RestartPreventExitStatus=78)

TESTED_WASMTIME = ">=50,<51"  # pyproject.toml's range


class UntestedWasmtime(ImportError):
    """The installed wasmtime-py lacks a private name the worker's hot path uses: nothing
    can be served. Raised in a worker or the check child as `missing(name)`; the daemon
    raises it again with the child's words, and exits EX_SOFTWARE."""

    @classmethod
    def missing(cls, name: str) -> "UntestedWasmtime":
        import importlib.metadata   # only now: a worker that starts well never pays for it
        try:
            version = importlib.metadata.version("wasmtime")
        except importlib.metadata.PackageNotFoundError:
            version = "(version unknown)"
        exc = cls(f"wasmtime {version} has no {name}, which corral's hot path "
                  f"(corral/workers/abi.py) uses; corral is tested with wasmtime{TESTED_WASMTIME}")
        exc.missing_name = name
        return exc
