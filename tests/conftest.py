"""Fixtures: real daemons in private directories, stopped and checked at the end of each test."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from harness import FAULTS, GUESTS, Daemon, load_guest_builder


@pytest.fixture(scope="session")
def cache_dir():
    """One compiled-module cache for the whole run (compiling is the slow part of a start)."""
    path = Path(tempfile.mkdtemp(prefix="crl-cache-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


_built: dict = {}


def pytest_collection_finish(session) -> None:
    """Build the compiled guests once, before the first test and outside every test's
    timeout, if any test wants them: a cold build (std rebuilt for each Rust panic
    strategy) takes minutes on two busy cores; a warm one well under a second."""
    if any("built_guests" in getattr(item, "fixturenames", ()) for item in session.items):
        _built["result"] = _build_guests()


def _build_guests() -> dict[str, Path] | str:
    build = load_guest_builder()
    try:
        return build.build_all()
    except (build.ToolchainMissing, build.BuildFailed) as error:
        return str(error)


@pytest.fixture(scope="session")
def built_guests() -> dict[str, Path]:
    """The Rust and C example guests, compiled from source (guests/build.py)."""
    result = _built.get("result") or _build_guests()
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return result


@pytest.fixture(scope="session")
def unwind_guests() -> dict[str, Path]:
    """The C and C++ guests that unwind (c_panics, cpp_throws): they need zig alone."""
    build = load_guest_builder()
    build.OUT.mkdir(parents=True, exist_ok=True)
    try:
        return {**build.build_c_unwind(build.OUT), **build.build_cpp(build.OUT)}
    except (build.ToolchainMissing, build.BuildFailed) as error:
        pytest.fail(str(error), pytrace=False)


def example_apps() -> dict:
    return {
        "echo": {"module": GUESTS / "echo.wat"},
        "counter": {"module": GUESTS / "counter.wat", "instances": "keyed"},
        "calc": {"module": GUESTS / "calc.wat"},
    }


@pytest.fixture
def start_daemon(cache_dir):
    """start_daemon(apps, supervisor={...}, restart={...}, ...) -> a running Daemon.

    Every daemon started is stopped at the end of the test, and the test fails
    if any of its processes had to be killed then.
    """
    started: list[Daemon] = []

    def start(apps: dict | None = None, wait: bool = True, **sections) -> Daemon:
        daemon = Daemon(apps if apps is not None else example_apps(), cache_dir, **sections)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    leftovers = {}
    for daemon in started:
        killed = daemon.cleanup()
        if killed:
            leftovers[str(daemon.root)] = killed
    assert not leftovers, f"processes left behind after the daemon stopped: {leftovers}"


@pytest.fixture(scope="module")
def shared_daemon(cache_dir):
    """One daemon for the tests of a module that only read from it."""
    apps = example_apps()
    apps["faults"] = {"module": FAULTS, "on_abort": "reinstantiate", "max_memory_mib": 16}
    daemon = Daemon(apps, cache_dir)
    daemon.start()
    yield daemon
    killed = daemon.cleanup()
    assert not killed, f"processes left behind: {killed}"


@pytest.fixture(scope="module")
def worker_engine():
    """A worker's engine (corral.workers.modules) with its epoch ticking, as in a worker."""
    from corral.workers import modules
    from corral.workers.host import EpochTicker
    engine = modules.make_engine()
    ticker = EpochTicker(engine)
    ticker.start()
    yield engine
    ticker.stop()


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the whole run (tests/pgserver.py), removed at the end."""
    from pgserver import running
    with running() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server):
    """A fresh database of its own for one test, on the session's server: its libpq DSN."""
    return pg_server.dsn(pg_server.create_database())


@pytest.fixture(params=["sqlite", "postgresql"])
def state_backend(request, tmp_path):
    """Each durable-state backend in turn (tests/state_backends.py); PostgreSQL on the
    session's server, in a database of the test's own."""
    from state_backends import Postgresql, Sqlite
    if request.param == "sqlite":
        return Sqlite(tmp_path)
    return Postgresql(request.getfixturevalue("pg_server"))


@pytest.fixture
def namespaces():
    """namespaces() -> a new network namespace joined by a veth pair (tests/netns.py); all of
    them, and their links, are removed at the end of the test, and the test fails if any is left."""
    from netns import Namespace, leftovers
    made: list = []

    def make():
        made.append(Namespace())
        return made[-1]

    yield make
    for namespace in made:
        namespace.remove()
    assert not leftovers(), f"namespaces or links left behind: {leftovers()}"
