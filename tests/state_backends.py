"""The two durable-state backends, seen the same way by the state tests (tests/test_state.py):
a store for unit tests, the config section for a daemon, what a service's rows are (read
behind corral's back), and a blocker that holds the write lock as another writer would."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from corral.workers import state


class Sqlite:
    name = "sqlite"
    extra: dict = {}

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path

    def make_store(self, service: str = "svc", busy_timeout_ms: int = 200, **limits) -> state.Store:
        return state.Store(self.tmp_path / f"{service}.sqlite3", "os", state.Limits(**limits), token_period_s=30,
                           busy_timeout_ms=busy_timeout_ms)

    def path(self, daemon, service: str) -> Path:
        return state.database_path(daemon.root / "state" / "default", service) if daemon else self.tmp_path / f"{service}.sqlite3"

    def rows(self, daemon, service: str) -> dict[tuple[bytes, bytes], bytes]:
        path = self.path(daemon, service)
        if not path.exists():
            return {}
        connection = sqlite3.connect(path)
        try:
            return {(bytes(s), bytes(k)): bytes(v) for s, k, v in connection.execute("SELECT scope, key, value FROM kv")}
        finally:
            connection.close()

    def stats(self, daemon, service: str) -> dict:
        return state.read_stats(self.path(daemon, service))

    def alarms(self, daemon, service: str) -> list[tuple[bytes, int]]:
        return state.read_alarms(self.path(daemon, service))

    @contextlib.contextmanager
    def blocker(self, daemon, service: str):
        """Hold the write lock (another writer's transaction) while the block runs; `hold()`
        and `release()` take and give it back inside."""
        connection = sqlite3.connect(self.path(daemon, service), isolation_level=None)
        try:
            yield Lock(lambda: connection.execute("BEGIN IMMEDIATE"), lambda: connection.execute("ROLLBACK"))
        finally:
            connection.close()


class Postgresql:
    name = "postgresql"

    def __init__(self, server):
        self.server = server
        self.dsn = server.dsn(server.create_database())
        self.extra = {"state": {"backend": "postgresql", "dsn": self.dsn}}
        from corral.workers import state_pg
        state_pg.connect(self.dsn).close()   # the schema, as a daemon makes it at start-up

    def make_store(self, service: str = "svc", busy_timeout_ms: int = 200, **limits):
        from corral.workers import state_pg
        return state_pg.PgStore(self.dsn, service, "os", state.Limits(**limits), token_period_s=30, run="test",
                                busy_timeout_ms=busy_timeout_ms)

    def rows(self, daemon, service: str) -> dict[tuple[bytes, bytes], bytes]:
        import psycopg
        with psycopg.connect(self.dsn) as connection:
            try:
                found = connection.execute("SELECT scope, key, value FROM corral_kv WHERE service = %s",
                                           (service,)).fetchall()
            except psycopg.errors.UndefinedTable:
                return {}
        return {(bytes(s), bytes(k)): bytes(v) for s, k, v in found}

    def stats(self, daemon, service: str) -> dict:
        from corral.workers import state_pg
        return state_pg.read_stats(self.dsn, service)

    def alarms(self, daemon, service: str) -> list[tuple[bytes, int]]:
        from corral.workers import state_pg
        return state_pg.read_alarms(self.dsn, service)

    @contextlib.contextmanager
    def blocker(self, daemon, service: str):
        """Another transaction holding corral_scopes exclusively: every commit waits for it."""
        import psycopg
        connection = psycopg.connect(self.dsn, autocommit=True)

        def hold():
            connection.execute("BEGIN")
            connection.execute("LOCK TABLE corral_scopes IN EXCLUSIVE MODE")

        try:
            yield Lock(hold, lambda: connection.execute("ROLLBACK"))
        finally:
            connection.close()


class Lock:
    def __init__(self, hold, release):
        self.hold = hold
        self.release = release
