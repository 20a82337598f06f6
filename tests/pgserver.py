"""A real PostgreSQL server for the tests, started from the Debian binaries in a temp dir.

The server refuses to run as root, so every server command runs as the
`postgres` user (runuser) in a directory of its own under /tmp (pytest's
tmp_path is private to root). Clients reach it over a unix socket in that
directory, and over a loopback TCP port when asked (hosts in other network
namespaces reach it through a veth address: `listen`). Authentication is
`trust`: the tests do not exercise passwords, and no secret is left on disk.
`./dev test` installs the `postgresql` package where the binaries are
missing; a missing binary here is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

USER = "postgres"
_names = itertools.count()


def bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: "
                           "./dev test installs the `postgresql` package with apt")
    return Path(found[-1]).parent


class PgServer:
    """One server: initdb, start, stop, start again (the data stays), destroy."""

    def __init__(self, listen: str = "", port: int = 0, durable: bool = False):
        """`listen`: TCP addresses to listen on besides the unix socket ("" for none);
        `durable`: fsync as a production server does (the bench), not off (the tests)."""
        self.bin = bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="corral-pg-"))
        account = pwd.getpwnam(USER)
        os.chown(self.root, account.pw_uid, account.pw_gid)
        self.data = self.root / "data"
        self.socket_dir = self.root      # the socket file: .s.PGSQL.PORT
        self.log = self.root / "server.log"
        self.listen = listen
        self.port = port or _free_port()
        self.running = False
        self.run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                 "--no-instructions", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '{listen}'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n"
                       + ("" if durable else "fsync = off\nfull_page_writes = off\n") +  # tests: speed
                       "max_connections = 200\nshared_buffers = 16MB\n")
        if listen:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write("host all all 0.0.0.0/0 trust\n")

    def run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # Without the caller's libpq settings (PGUSER, PGHOST, ...): the server's own tools talk
        # to the server as its superuser, whatever a test or a worker's set-up left in the environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return subprocess.run(["runuser", "-u", USER, "--", str(self.bin / program), *args],
                              capture_output=True, text=True, timeout=60, check=check, cwd=self.root, env=env)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """`mode`: fast (disconnect and shut down cleanly) or immediate (as a crash)."""
        if self.running:
            self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
            self.running = False

    def dsn(self, dbname: str = "postgres", tcp_host: str = "") -> str:
        host = tcp_host or str(self.socket_dir)
        return f"host={host} port={self.port} dbname={dbname} user={USER}"

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}{os.getpid()}_{next(_names)}"
        self.sql(f"CREATE DATABASE {name}")
        return name

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run one statement with psql; its unaligned output."""
        done = self.run("psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                        "-p", str(self.port), "-d", dbname, "-c", statement, check=False)
        if done.returncode:   # say why (the server's words), not only psql's exit status
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"psql {statement!r}: exit {done.returncode}: {done.stderr.strip()}\n"
                               f"server log (end):\n{tail}")
        return done.stdout

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def running(**settings):
    """A started PgServer(**settings), destroyed (stopped, its files removed) when the block ends."""
    server = PgServer(**settings)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
