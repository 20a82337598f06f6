"""Smoke tests of the benchmark tools: they run, print what they promise, and clean up.

No timing is asserted: benchmarks are not tests, and these machines are noisy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from harness import REPO

NUMBER = r"[\d,]+(?:\.\d+)?"


def bench_dirs() -> set[Path]:
    return set(Path("/tmp").glob("crlb-*"))


@pytest.mark.timeout(240)
def test_bench_run_quick_prints_every_table_and_leaves_nothing_behind(built_guests):
    # built_guests: the unwind section's Rust guests are built (once per run) before the clock starts
    before = bench_dirs()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=220)
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr}"
    # throughput table: one row per system, then both ratios
    for row in (r"a  pyzmq ROUTER echo, one hop", r"b  zmq\.proxy \+ 2 Python REP workers",
                r"c  corral, echo guest, 2 workers"):
        assert len(re.findall(rf"^{row}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", out, re.M)) == 2, out
    assert re.search(rf"^ratio c/a = {NUMBER}", out, re.M), out
    assert re.search(rf"^ratio c/b = {NUMBER}", out, re.M), out
    # half load, host overhead, instantiation, abort-to-serving
    assert re.search(rf"^corral p99 at half load = {NUMBER} ms", out, re.M), out
    # security: CURVE beside plain tcp, as a ratio
    assert re.search(rf"^CURVE / plain tcp throughput: {NUMBER}x; CURVE adds -?{NUMBER} us per request", out, re.M), out
    # hops: three round trips, and corral's seven parts, all traced
    assert len(re.findall(rf"\(\d ZeroMQ hops\)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M)) == 3, out
    assert len(re.findall(rf"^   \S.*\s{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M)) >= 7, out
    traced = re.search(rf"^corral at p50: {NUMBER} us in its 4 hops, {NUMBER} us in the broker and the worker "
                       rf"\((\d+) of (\d+) requests traced whole", out, re.M)
    assert traced and int(traced[1]) >= 0.9 * int(traced[2]) > 0, out
    assert re.search(rf"^corral\s+Guest\.run.*\s{NUMBER}\s+{NUMBER}$", out, re.M), out
    assert re.search(rf"^wasmtime-py\s+Func\.__call__ \+ Memory.*\s{NUMBER}\s+{NUMBER}$", out, re.M), out
    assert re.search(rf"^ratio by-hand/corral = {NUMBER}", out, re.M), out
    assert re.search(rf"^fresh instance = {NUMBER} us", out, re.M), out
    assert re.search(rf"^reinstantiate\s+trap sent .*\s{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M), out
    assert re.search(rf"^respawn\s+trap reply .*\s{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M), out
    # fairness: the light client's p99 beside a flood on its service and on another
    assert len(re.findall(rf"^ratio p99 beside a flood on echo2? / alone = {NUMBER}", out, re.M)) == 2, out
    assert re.search(rf"^ratio saved/baseline = {NUMBER} \(medians\)", out, re.M), out
    assert re.search(rf"^Guest\.run, the same: an escaped panic, 500 .*\s{NUMBER}\s+{NUMBER}$", out, re.M), out
    # frames: corral.wire.frames against plain pyzmq, both ways, per message
    assert re.search(rf"^ratio send_multipart/send_frames = {NUMBER}   ratio recv_multipart/drain = {NUMBER}",
                     out, re.M), out
    # cluster: the durable counter on PostgreSQL beside SQLite, as ratios
    assert re.search(rf"^PostgreSQL \(fsync on, unix socket\)\s+{NUMBER}\s+{NUMBER}x", out, re.M), out
    # clean-up: no private directory, no process started from one
    assert bench_dirs() <= before, f"left behind: {bench_dirs() - before}"
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"])
            if any("/tmp/crlb-" in part for part in (p.info["cmdline"] or []))]
    assert not left, f"processes left behind: {left}"


def corral_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral", "bench", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_corral_bench_verb_reports_throughput_percentiles_and_statuses(start_daemon):
    daemon = start_daemon()
    done = corral_bench("echo", "-n", "2000", "--progress", "-e", daemon.frontend)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(rf"throughput\s+{NUMBER} req/s", out), out
    assert re.search(rf"p50 {NUMBER}\s+p90 {NUMBER}\s+p99 {NUMBER}\s+max {NUMBER}", out), out
    assert re.search(r"status\s+200: 2000$", out, re.M), out
    assert re.search(r"failed\s+0$", out, re.M), out
    assert "2000/2000" in done.stderr   # the progress bar, asked for (stderr is not a terminal here)
    quiet = corral_bench("echo", "-n", "200", "-e", daemon.frontend)
    assert quiet.returncode == 0 and "200/200" not in quiet.stderr

    # keyed, with more than one client process: every request answered, in order per key
    done = corral_bench("counter", "", "-n", "600", "--key", "bench", "--clients", "2", "-e", daemon.frontend)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"status\s+200: 600$", done.stdout, re.M), done.stdout
    # (each client's connection check and warm-up requests count too)
    assert int(daemon.call("counter", b"get", key="bench").body) >= 600

    # open loop at a fixed rate: 1,000 requests at 2,000 req/s take about half a second
    done = corral_bench("echo", "-n", "1000", "--rate", "2000", "-e", daemon.frontend)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "open loop at 2000 req/s offered" in done.stdout, done.stdout
    assert re.search(r"status\s+200: 1000$", done.stdout, re.M), done.stdout
    assert re.search(rf"sender lag\s+max {NUMBER} ms", done.stdout), done.stdout

    # failures are counted and make the exit status non-zero
    done = corral_bench("nosuch", "-n", "100", "-e", daemon.frontend)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"status\s+404: 100$", done.stdout, re.M), done.stdout
    assert re.search(r"failed\s+100$", done.stdout, re.M), done.stdout


@pytest.mark.timeout(120)
def test_bench_compare_loads_corral_from_the_other_checkout(tmp_path):
    other = tmp_path / "other"
    for package in ("supervisor", "workers"):
        shutil.copytree(REPO / package, other / package, ignore=shutil.ignore_patterns("__pycache__"))
    # Every process that imports the other checkout's corral leaves a mark.
    with open(other / "supervisor" / "__init__.py", "a") as init:
        init.write('\nimport os as _os\nopen(_os.path.join(_os.path.dirname(_os.path.realpath(__file__)), f"imported-{_os.getpid()}"), "w").close()\n')
    before = bench_dirs()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--half-load",
                           "--systems", "cd", "--compare", str(other)],
                          cwd=REPO, capture_output=True, text=True, timeout=100)
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr}"
    for row in (r"c  corral, echo guest, 2 workers", r"d  corral other, echo guest, 2 workers"):
        assert len(re.findall(rf"^{row}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", out, re.M)) == 2, out
    assert re.search(rf"^ratio c/d = {NUMBER}", out, re.M), out
    marks = list((other / "supervisor").glob("imported-*"))
    assert len(marks) >= 3, marks   # (d)'s daemon and its two workers
    assert not list((REPO / "supervisor").glob("imported-*"))
    assert bench_dirs() <= before, f"left behind: {bench_dirs() - before}"


def test_bench_processes_share_the_scripts_session_and_lead_their_own_groups(tmp_path, monkeypatch):
    """One session for every system: Linux schedules a session as one group (CFS
    autogroup), and a session per server process starved the load generator (bench/README.md,
    "Noise"). A process group each, so that each can be stopped whole."""
    monkeypatch.syspath_prepend(str(REPO))   # bench/ is a package of the checkout, not installed
    from bench.systems import Processes
    procs = Processes(tmp_path)
    started = [procs.start([sys.executable, "-c", "import time; time.sleep(30)"]) for _ in range(2)]
    try:
        for process in started:
            assert os.getsid(process.pid) == os.getsid(0)
            assert os.getpgid(process.pid) == process.pid
    finally:
        procs.stop_all()
    assert all(process.poll() is not None for process in started)
