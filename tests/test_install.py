"""Issue 12's layout holes, tried for real: packages planted where the daemon runs, and
supervisord (whose import name is `supervisor`) installed beside corral."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import psutil
import pytest

from harness import GUESTS, REPO, Daemon

CONSOLE_SCRIPT = Path(sys.executable).with_name("corral")   # how systemd and users start corral
PLANTED = """import pathlib
pathlib.Path({marker!r}).write_text("planted {name} ran")
"""


def plant(root: Path) -> list[Path]:
    """A `workers/` and a `corral/` package (with corral/workers/ and the check entry) in
    `root`: each writes a marker file when imported. Returns the markers."""
    markers = []
    for package in ("workers", "corral", "corral/workers"):
        folder = root / package
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("__init__.py", "__main__.py", *(["check.py"] if package == "corral/workers" else [])):
            marker = root / f"PLANTED-{package.replace('/', '.')}-{name}"
            (folder / name).write_text(PLANTED.format(marker=str(marker), name=f"{package}/{name}"))
            markers.append(marker)
    return markers


@pytest.mark.timeout(120)
def test_packages_planted_in_the_working_directory_never_run(cache_dir):
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT}: corral is not installed in this environment"
    daemon = Daemon({"echo": {"module": GUESTS / "echo.wat"}}, cache_dir, command=[str(CONSOLE_SCRIPT)])
    try:
        markers = plant(daemon.root)
        daemon.start()
        assert daemon.call("echo", b"real").body == b"real"
        pids = daemon.worker_pids()
        assert len(pids) == 2
        for pid in pids:
            worker = psutil.Process(pid)
            assert Path(worker.cwd()) == daemon.root, "the plant was not where the worker runs"
            assert worker.cmdline()[1:4] == ["-P", "-m", "corral.workers"], worker.cmdline()
        assert daemon.stop() == 0
        ran = [marker.name for marker in markers if marker.exists()]
        assert not ran, f"planted code ran: {ran}"
    finally:
        killed = daemon.cleanup()
    assert not killed, f"processes left behind: {killed}"


# --- supervisord beside corral --------------------------------------------------------------

def run(*command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=240, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def scratch_venv(tmp_path_factory):
    """A fresh venv holding a wheel of corral (built once from this checkout, as pip builds it) and nothing else of
    it; corral's dependencies are borrowed from this test environment by a .pth line, which
    adds their folder to sys.path without running the .pth files in it (so this environment's
    editable corral stays out)."""
    root = tmp_path_factory.mktemp("venv")
    wheels = root / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO)
    venv = root / "v"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "-q", "--no-deps", next(wheels.glob("corral-*.whl")))
    yield venv, site
    shutil.rmtree(root, ignore_errors=True)


def package_files(site: Path, package: str) -> set[str]:
    return {str(p.relative_to(site)) for p in (site / package).rglob("*") if "__pycache__" not in p.parts}


@pytest.mark.timeout(300)
def test_supervisord_and_corral_share_an_environment_and_leave_each_other_whole(scratch_venv, cache_dir):
    venv, site = scratch_venv
    python, pip = venv / "bin" / "python", [venv / "bin" / "python", "-m", "pip"]
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    where = run(python, "-c", "import corral; print(corral.__file__)", env=env, cwd=venv).stdout
    assert where.startswith(str(site)), f"corral comes from {where}, not the scratch venv"
    corral_files = package_files(site, "corral")
    assert not (site / "supervisor").exists() and not (site / "workers").exists()

    run(*pip, "install", "-q", "supervisor", env=env)
    supervisor_files = package_files(site, "supervisor")
    assert "supervisor/supervisord.py" in supervisor_files
    assert package_files(site, "corral") == corral_files and not supervisor_files & corral_files

    def corral_works() -> None:
        run(venv / "bin" / "corral", "--help", env=env, cwd=venv)
        run(python, "-c", "import corral.daemon, corral.workers.host, corral.wire.frames", env=env, cwd=venv)
        daemon = Daemon({"echo": {"module": GUESTS / "echo.wat"}}, cache_dir, command=[str(venv / "bin" / "corral")],
                        env=env)
        try:
            daemon.start()
            assert daemon.call("echo", b"beside supervisord").body == b"beside supervisord"
        finally:
            killed = daemon.cleanup()
        assert not killed

    def supervisord_works() -> None:
        run(python, "-c", "import supervisor.supervisord, supervisor.supervisorctl", env=env, cwd=venv)
        assert run(venv / "bin" / "supervisord", "--version", env=env, cwd=venv).stdout.strip()

    corral_works()
    supervisord_works()

    run(*pip, "uninstall", "-q", "-y", "supervisor", env=env)
    assert not (site / "supervisor").exists()
    assert package_files(site, "corral") == corral_files
    corral_works()

    run(*pip, "install", "-q", "supervisor", env=env)
    run(*pip, "uninstall", "-q", "-y", "corral", env=env)
    assert not (site / "corral").exists()
    assert package_files(site, "supervisor") == supervisor_files
    supervisord_works()
