"""What a newcomer tripped over, each fixed: commands aimed at no daemon, compile
messages, a second daemon's control socket, signals from outside, and the
small sayings of the CLI and the client."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from harness import GUESTS, REPO


def corral(*args, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nowhere(tmp_path):
    """A config whose endpoints nobody serves: an ipc path that does not exist, a tcp port nobody binds."""
    port = free_port()
    path = tmp_path / "corral.toml"
    path.write_text(f'[supervisor]\nfrontend = "tcp://127.0.0.1:{port}"\n'
                    f'control = "ipc://{tmp_path}/no-such.sock"\n'
                    f'[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n')
    return path, port


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verb", [
    ["call", "echo", "x", "--timeout", "30"],           # the frontend: a refused tcp connect
    ["bench", "echo", "-n", "10"],
    ["status"],                                          # the control endpoint: no such ipc path
    ["scale", "3"],
])
def test_a_command_aimed_at_no_daemon_says_so_at_once(nowhere, verb):
    config, port = nowhere
    started = time.monotonic()
    done = corral(*verb, "-c", config)
    elapsed = time.monotonic() - started
    endpoint = f"tcp://127.0.0.1:{port}" if verb[0] in ("call", "bench") else f"ipc://{config.parent}/no-such.sock"
    assert done.returncode == 3, done
    assert done.stderr == f"corral: nothing is listening on {endpoint} (is the daemon running?)\n"
    assert elapsed < 5, elapsed   # not after --timeout (30 s) or the control wait (5 s)


@pytest.mark.timeout(60)
def test_corral_call_to_an_ipc_path_that_does_not_exist(tmp_path):
    done = corral("call", "echo", "x", "-e", f"ipc://{tmp_path}/gone.sock", "--timeout", "30")
    assert done.returncode == 3
    assert done.stderr == f"corral: nothing is listening on ipc://{tmp_path}/gone.sock (is the daemon running?)\n"
