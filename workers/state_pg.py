"""Durable state on PostgreSQL (docs/cluster.md): the rules of workers/state.py, on a shared store.

A worker's PgStore is a StagedStore like SQLite's: write sets, the overlay,
group commit and the output gate are the same code; only the reads and the
group's transaction differ. Every service shares one database; its rows
carry the service's name.

Schema (corral_schema.version 2, made at start-up under an advisory lock;
version 1 had no corral_alarms and is brought up to 2 by adding it):
  corral_kv(service, scope, key, value)          the live entries
  corral_scopes(service, scope, bytes)           key + value bytes of each scope (the quota);
                                                 its row is also the scope's commit lock
  corral_tokens(service, run, token, at, status, fault, body)
                                                 replies of committed idempotent requests; `run`
                                                 is the broker's run, whose tickets they are
  corral_stats(service, name, value)             commits and rollbacks
  corral_fences(worker, fenced, at)              one row per worker: fenced by the broker or not
  corral_alarms(service, scope, at_ms)           each scope's one alarm (docs/alarms.md): written
                                                 in the group's transaction, so fenced like the rest

Fencing (docs/cluster.md has the argument): every group commit first reads
its worker's fence row FOR SHARE; the broker's fence is an UPDATE of that
row, which waits for a commit holding the share lock and makes every later
commit of that worker read `fenced`. So once the fence write has returned,
that worker can never commit again. A session that stops talking inside a
transaction (a paused worker) is ended by the server after
IDLE_IN_TRANSACTION_S, so a fence never waits on it for long.

The driver is psycopg 3 (the `postgresql` extra); this module imports it,
workers/state.py does not.
"""

from __future__ import annotations

import os
import time

import psycopg
from psycopg import conninfo

from corral.workers.state import (ERRORS, LIST_BATCH, Fenced, Limits, StagedStore, Unavailable, Unreachable,
                                  WriteSet, _MISSING, _prefix_end)

SCHEMA_VERSION = 2
SCHEMA_LOCK = 0x636F7272616C          # pg_advisory_xact_lock key: "corral"
CONNECT_TIMEOUT_S = 3
RETRY_AFTER_S = 0.5                   # after a failed connect, reads answer -6 at once for this long
BUSY_TIMEOUT_MS = 5000                # a commit waits this long for a lock (as SQLite's busy timeout)
LOCK_STEP_MS = 50                     # ... in steps this long
IDLE_IN_TRANSACTION_S = 5             # the server ends a session silent inside a transaction
FENCE_WAIT_S = 3 * IDLE_IN_TRANSACTION_S   # a fence waits this long for a commit in progress
# TCP keepalives and a user timeout: a partition ends a session in seconds, not hours.
# The DSN's own settings win.
_DEFAULTS = {"connect_timeout": str(CONNECT_TIMEOUT_S), "keepalives": "1", "keepalives_idle": "5",
             "keepalives_interval": "2", "keepalives_count": "3", "tcp_user_timeout": "10000"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corral_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS corral_kv (service text NOT NULL, scope bytea NOT NULL, key bytea NOT NULL,
                                      value bytea NOT NULL, PRIMARY KEY (service, scope, key));
CREATE TABLE IF NOT EXISTS corral_scopes (service text NOT NULL, scope bytea NOT NULL, bytes bigint NOT NULL,
                                          PRIMARY KEY (service, scope));
CREATE TABLE IF NOT EXISTS corral_tokens (service text NOT NULL, run text NOT NULL, token bigint NOT NULL,
                                          at double precision NOT NULL, status integer NOT NULL,
                                          fault bytea NOT NULL, body bytea NOT NULL,
                                          PRIMARY KEY (service, run, token));
CREATE INDEX IF NOT EXISTS corral_tokens_at ON corral_tokens (at);
CREATE TABLE IF NOT EXISTS corral_stats (service text NOT NULL, name text NOT NULL, value bigint NOT NULL,
                                         PRIMARY KEY (service, name));
CREATE TABLE IF NOT EXISTS corral_fences (worker text PRIMARY KEY, fenced boolean NOT NULL,
                                          at double precision NOT NULL);
CREATE TABLE IF NOT EXISTS corral_alarms (service text NOT NULL, scope bytea NOT NULL, at_ms bigint NOT NULL,
                                          PRIMARY KEY (service, scope));
"""


class SchemaProblem(Exception):
    """The database holds a schema this corral cannot use (newer)."""


def dsn_with_defaults(dsn: str, application: str) -> str:
    values = {**_DEFAULTS, "application_name": application, **conninfo.conninfo_to_dict(dsn)}
    return conninfo.make_conninfo(**values)


def connect(dsn: str, application: str = "corral") -> psycopg.Connection:
    """An autocommit connection with the schema in place; raise psycopg.Error or SchemaProblem."""
    connection = psycopg.connect(dsn_with_defaults(dsn, application), autocommit=True)
    try:
        connection.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_S}s'")
        connection.execute(f"SET lock_timeout = '{BUSY_TIMEOUT_MS}ms'")
        ensure_schema(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def ensure_schema(connection: psycopg.Connection) -> None:
    """Create (or check) corral's tables: one statement when they are there already."""
    if _schema_version(connection) == SCHEMA_VERSION:
        return
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        connection.execute(_SCHEMA)
        version = _schema_version(connection)
        if version is None:
            connection.execute("INSERT INTO corral_schema VALUES (%s)", (SCHEMA_VERSION,))
        elif version > SCHEMA_VERSION:
            raise SchemaProblem(f"schema version {version} is newer than this corral's ({SCHEMA_VERSION})")
        elif version < SCHEMA_VERSION:   # the tables it lacked are made above
            connection.execute("UPDATE corral_schema SET version = %s", (SCHEMA_VERSION,))


def _schema_version(connection) -> int | None:
    try:
        row = connection.execute("SELECT max(version) FROM corral_schema").fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return row[0]


def prepare(dsn: str) -> str | None:
    """At start-up: the schema made or checked. A problem to refuse the config for (a schema too
    new), or None; an unreachable database is no config problem (the workers retry)."""
    try:
        connect(dsn, "corral check").close()
    except SchemaProblem as exc:
        return f"durable state: PostgreSQL ({describe(dsn)}): {exc}"
    except psycopg.Error:
        return None
    return None


def reachable(dsn: str) -> str | None:
    """Why the database cannot be reached now, or None."""
    try:
        connect(dsn, "corral check").close()
    except (psycopg.Error, SchemaProblem) as exc:
        return str(exc).strip()
    return None


# What libpq may read to resolve a host name and to find its password (docs/confinement.md).
_RESOLVER_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf",
                   "/etc/ssl")


def reach(dsn: str, uid: int | None = None) -> tuple[list[int], list[str]]:
    """Before a worker confines itself: what it needs to reach this store, the TCP ports it
    connects to (none when every host is a unix-socket folder, libpq's default) and the files
    libpq reads (the password file, the resolver's, CA certificates). The DSN's settings
    first, then libpq's environment variables, as libpq itself does.

    It also names the user (PGUSER) and the password file (PGPASSFILE) in the environment
    unless they are set: libpq would look the process's user up in the passwd database at
    each connect, which a confined worker cannot read (and nss-systemd, for a systemd
    DynamicUser, would load libcap, whose first prctl the seccomp filter forbids). `uid`: the
    user the worker drops to (None: its own)."""
    import pwd
    values = conninfo.conninfo_to_dict(dsn)

    def setting(name: str, variable: str, default: str = "") -> str:
        return str(values.get(name) or os.environ.get(variable) or default)

    try:
        account = pwd.getpwuid(os.getuid() if uid is None else uid)
        name, home = account.pw_name, account.pw_dir
    except KeyError:   # a uid without a name: libpq would fail the same way
        name, home = str(os.getuid() if uid is None else uid), "/nonexistent"
    # Whatever the DSN says: psycopg asks libpq for its defaults too (PQconndefaults), and the
    # DSN's own settings win over these.
    os.environ.setdefault("PGUSER", name)
    os.environ.setdefault("PGPASSFILE", os.path.join(home, ".pgpass"))
    hosts = [h for h in setting("host", "PGHOST").split(",") if h]
    addresses = [a for a in setting("hostaddr", "PGHOSTADDR").split(",") if a]
    reads = [setting("passfile", "PGPASSFILE"), os.path.join(home, ".pg_service.conf"),
             os.path.join(home, ".postgresql")]
    if not addresses and not any(not h.startswith("/") and not h.startswith("@") for h in hosts):
        return [], reads
    ports = sorted({int(p) for p in setting("port", "PGPORT", "5432").split(",") if p.strip().isdigit()})
    return ports, reads + list(_RESOLVER_FILES)


def describe(dsn: str) -> str:
    """The DSN without anything secret, for logs and messages."""
    values = conninfo.conninfo_to_dict(dsn)
    return " ".join(f"{k}={v}" for k, v in values.items() if k in ("host", "hostaddr", "port", "dbname", "user"))


def read_stats(dsn: str, service: str) -> dict[str, int]:
    """commits, rollbacks, bytes and scopes of a service (empty when the database is unreachable)."""
    try:
        with psycopg.connect(dsn_with_defaults(dsn, "corral status"), autocommit=True) as connection:
            stats = dict(connection.execute("SELECT name, value FROM corral_stats WHERE service = %s",
                                            (service,)).fetchall())
            nbytes, scopes = connection.execute(
                "SELECT coalesce(sum(bytes), 0), count(*) FROM corral_scopes WHERE service = %s AND bytes > 0",
                (service,)).fetchone()
    except psycopg.Error:
        return {}
    return {"commits": stats.get("commits", 0), "rollbacks": stats.get("rollbacks", 0),
            "bytes": int(nbytes), "scopes": scopes}


def session_name(worker: str) -> str:
    """A worker's sessions' application_name: how a fence finds the session that holds its row."""
    return f"corral worker {worker}"[:63]   # (NAMEDATALEN - 1)


def fence(dsn_or_connection, worker: str) -> None:
    """Fence a worker: once this returns, none of its commits can succeed (docs/cluster.md).
    One write; it waits for a commit of that worker in progress. A worker paused inside its
    commit before the server saw the end of its pipeline is not "idle in transaction", and
    a paused machine still answers TCP keepalives: after FENCE_WAIT_S the fence ends that
    worker's sessions (pg_terminate_backend: its transaction rolls back, nothing of it is
    kept) and writes again. Raise psycopg.Error."""
    if isinstance(dsn_or_connection, str):
        with connect(dsn_or_connection, "corral fence") as connection:
            fence(connection, worker)
        return
    connection = dsn_or_connection
    try:
        _fence_once(connection, worker)
    except psycopg.errors.LockNotAvailable:
        connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                           "AND pid <> pg_backend_pid()", (session_name(worker),))
        _fence_once(connection, worker)


def _fence_once(connection, worker: str) -> None:
    with connection.transaction():
        connection.execute(f"SET LOCAL lock_timeout = '{FENCE_WAIT_S}s'")
        connection.execute("INSERT INTO corral_fences VALUES (%s, true, %s) ON CONFLICT (worker) "
                           "DO UPDATE SET fenced = true, at = excluded.at", (worker, time.time()))


class PgStore(StagedStore):
    """One service's entries in the shared PostgreSQL database, as a worker uses them."""

    def __init__(self, dsn: str, service: str, durability: str, limits: Limits, token_period_s: float,
                 log=None, run: str = "", worker: str = "", busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        """`run`: the broker's run, which its tokens belong to; `worker`: this worker's fence name
        ("": never fenced, for tools and tests)."""
        super().__init__(durability, limits, token_period_s, log)
        self.dsn = dsn
        self.service = service
        self.run = run
        self.worker = worker
        self.db: psycopg.Connection | None = None
        self.retry_at = 0.0
        self.busy_timeout_ms = busy_timeout_ms
        self.counts_commits = True   # False for `corral state import`: its rows are no requests

    def __str__(self) -> str:
        return f"postgresql:{self.service}"

    def open(self) -> bool:
        if self.db is not None and not self.db.closed:
            return True
        self.db = None
        now = time.monotonic()
        if now < self.retry_at:
            return False
        try:
            self.db = connect(self.dsn, session_name(self.worker) if self.worker else "corral worker")
            if self.worker:
                # Its fence row, unfenced, before its first commit; a fence written already stays.
                self.db.execute("INSERT INTO corral_fences VALUES (%s, false, %s) ON CONFLICT (worker) DO NOTHING",
                                (self.worker, time.time()))
        except (psycopg.Error, SchemaProblem) as exc:
            if self.db is not None:
                self.db.close()
                self.db = None
            self.retry_at = now + RETRY_AFTER_S
            if self.log is not None:
                self.log.error("state.unavailable", store=str(self), error=str(exc).strip())
        return self.db is not None

    def close(self) -> None:
        if self.db is not None:
            if self.rollbacks:
                try:
                    self.db.execute(_ADD_STAT, (self.service, "rollbacks", self.rollbacks))
                except psycopg.Error:
                    pass
            self.db.close()
            self.db = None

    def _execute(self, query, arguments=()):
        """Run one statement; a lost connection is dropped (the next call reconnects)."""
        started = time.monotonic()
        try:
            if not self.open():
                raise Unreachable("storage unavailable")
            try:
                return self.db.execute(query, arguments)
            except psycopg.Error as exc:
                raise self._failed(exc) from exc
        finally:
            self.read_s += time.monotonic() - started

    def _failed(self, exc: psycopg.Error) -> Unavailable:
        """What to raise for a driver error; a lost connection is dropped (reconnected later)."""
        if self.db is not None and (self.db.closed or self.db.broken):
            self.db.close()
            self.db = None
            return Unreachable(str(exc).strip())
        return Unavailable(str(exc).strip())

    # --- reads: committed data under the staged writes ----------------------

    def visible(self, scope: bytes, key: bytes) -> bytes | None:
        found = self.overlay.get((scope, key), _MISSING)
        if found is not _MISSING:
            return found
        row = self._execute("SELECT value FROM corral_kv WHERE service = %s AND scope = %s AND key = %s",
                            (self.service, scope, key)).fetchone()
        return row[0] if row else None

    def committed_bytes(self, scope: bytes) -> int:
        row = self._execute("SELECT bytes FROM corral_scopes WHERE service = %s AND scope = %s",
                            (self.service, scope)).fetchone()
        return (row[0] if row else 0) + self.overlay_delta.get(scope, 0)

    def committed_keys(self, scope: bytes, prefix: bytes, after: bytes):
        end = _prefix_end(prefix)
        query = "SELECT key FROM corral_kv WHERE service = %s AND scope = %s AND key >= %s AND key > %s"
        if end is not None:
            query += " AND key < %s"
        query += f" ORDER BY key LIMIT {LIST_BATCH}"
        last = after
        while True:
            arguments = (self.service, scope, prefix, last) + (() if end is None else (end,))
            rows = self._execute(query, arguments).fetchall()
            for (key,) in rows:
                yield key
            if len(rows) < LIST_BATCH:
                return
            last = rows[-1][0]

    def visible_alarm(self, scope: bytes) -> int | None:
        found = self.alarm_overlay.get(scope, _MISSING)
        if found is not _MISSING:
            return found
        row = self._execute("SELECT at_ms FROM corral_alarms WHERE service = %s AND scope = %s",
                            (self.service, scope)).fetchone()
        return row[0] if row else None

    def recorded_reply(self, token: int) -> tuple[int, bytes, bytes] | None:
        try:
            row = self._execute("SELECT status, fault, body FROM corral_tokens WHERE service = %s AND run = %s "
                                "AND token = %s", (self.service, self.run, token)).fetchone()
        except Unavailable:
            return None
        return (row[0], bytes(row[1]), bytes(row[2])) if row else None

    # --- the group's transaction --------------------------------------------

    def write_group(self, overlay, staged, now, prune_before, waiting) -> list[tuple[bytes, int | None]]:
        """As SQLite's: a lock held by another writer is waited for in steps of LOCK_STEP_MS,
        calling `waiting()` in between (the worker heartbeats), up to BUSY_TIMEOUT_MS."""
        give_up = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                return self.write_group_once(overlay, staged, now, prune_before)
            except Unavailable as exc:
                if not isinstance(exc.__cause__, psycopg.errors.LockNotAvailable) or \
                        time.monotonic() >= give_up or self.db is None:
                    raise
            if waiting is not None:
                waiting()

    def write_group_once(self, overlay, staged, now, prune_before) -> list[tuple[bytes, int | None]]:
        """Pipelined: the statements go out together and the server runs them in order; the
        client waits twice, for the fence and the old sizes, and for the COMMIT."""
        db, service = self.db, self.service
        try:
            with db.pipeline() as pipeline, db.transaction():
                db.execute(f"SET LOCAL lock_timeout = '{LOCK_STEP_MS}ms'")
                fence = self.lock_fence(db) if self.worker else None
                scopes = sorted({scope for scope, _ in overlay})
                deltas = dict.fromkeys(scopes, 0)
                sizes = None
                if overlay:
                    # Each scope's row is its commit lock, taken in order (no deadlock between
                    # workers): the sizes read below stay true until this commits.
                    db.execute("INSERT INTO corral_scopes SELECT %s, s, 0 FROM unnest(%s::bytea[]) AS s "
                               "ON CONFLICT DO NOTHING", (service, scopes))
                    db.execute("SELECT 1 FROM corral_scopes WHERE service = %s AND scope = ANY(%s) "
                               "ORDER BY scope FOR UPDATE", (service, scopes))
                    pairs = list(overlay)
                    sizes = db.execute("SELECT scope, key, octet_length(key) + octet_length(value) FROM corral_kv "
                                       "WHERE service = %s AND (scope, key) IN "
                                       "(SELECT * FROM unnest(%s::bytea[], %s::bytea[]))",
                                       (service, [s for s, _ in pairs], [k for _, k in pairs]))
                # A Sync, not just a flush: the server is then "idle in transaction" while it
                # waits for the rest, so idle_in_transaction_session_timeout covers a worker
                # paused from here to its COMMIT (a fence never waits on it for long).
                pipeline.sync()
                if fence is not None:
                    self.check_fence(db, fence)
                if sizes is not None:
                    for scope, key, size in sizes.fetchall():
                        deltas[bytes(scope)] -= size
                    gone = [(s, k) for (s, k), v in overlay.items() if v is None]
                    kept = [(s, k, v) for (s, k), v in overlay.items() if v is not None]
                    if gone:
                        db.execute("DELETE FROM corral_kv WHERE service = %s AND (scope, key) IN "
                                   "(SELECT * FROM unnest(%s::bytea[], %s::bytea[]))",
                                   (service, [s for s, _ in gone], [k for _, k in gone]))
                    if kept:
                        db.execute("INSERT INTO corral_kv SELECT %s, * FROM unnest(%s::bytea[], %s::bytea[], "
                                   "%s::bytea[]) ON CONFLICT (service, scope, key) DO UPDATE SET value = excluded.value",
                                   (service, [s for s, _, _ in kept], [k for _, k, _ in kept],
                                    [v for _, _, v in kept]))
                        for scope, key, value in kept:
                            deltas[scope] += len(key) + len(value)
                    changed = [(scope, delta) for scope, delta in deltas.items() if delta]
                    if changed:
                        db.execute("UPDATE corral_scopes SET bytes = corral_scopes.bytes + d.delta FROM "
                                   "unnest(%s::bytea[], %s::bigint[]) AS d(scope, delta) "
                                   "WHERE service = %s AND corral_scopes.scope = d.scope",
                                   ([s for s, _ in changed], [d for _, d in changed], service))
                changes = self.write_alarms(db, staged)
                tokens = [w for w in staged if w.token]
                if tokens:
                    db.execute("INSERT INTO corral_tokens SELECT %s, %s, * FROM unnest(%s::bigint[], "
                               "%s::float8[], %s::int[], %s::bytea[], %s::bytea[]) "
                               "ON CONFLICT (service, run, token) DO UPDATE SET at = excluded.at, "
                               "status = excluded.status, fault = excluded.fault, body = excluded.body",
                               (service, self.run, [w.token for w in tokens], [now] * len(tokens),
                                [w.reply[0] for w in tokens], [w.reply[1] for w in tokens],
                                [w.reply[2] for w in tokens]))
                if prune_before is not None:
                    db.execute("DELETE FROM corral_tokens WHERE service = %s AND at < %s", (service, prune_before))
                if staged and self.counts_commits:
                    db.execute(_ADD_STAT, (service, "commits", len(staged)))
                if self.rollbacks:
                    db.execute(_ADD_STAT, (service, "rollbacks", self.rollbacks))
            return [(bytes(scope), at_ms) for scope, at_ms in changes.fetchall()] if changes is not None else []
        except Fenced:
            raise
        except psycopg.Error as exc:
            raise self._failed(exc) from exc

    def write_alarms(self, db, staged):
        """The alarm writes of the staged write sets, in order, as workers/state.py's alarm_apply
        does on SQLite; returns a cursor of (scope, at_ms or None) of each scope touched, as it
        is once they are applied (read after the COMMIT), or None when none was."""
        touched: dict[bytes, None] = {}
        for writes in staged:
            if writes.alarm is not _MISSING:
                if writes.alarm is None:
                    db.execute("DELETE FROM corral_alarms WHERE service = %s AND scope = %s",
                               (self.service, writes.scope))
                else:
                    db.execute("INSERT INTO corral_alarms VALUES (%s, %s, %s) ON CONFLICT (service, scope) "
                               "DO UPDATE SET at_ms = excluded.at_ms", (self.service, writes.scope, writes.alarm))
            elif writes.fired >= 0:
                db.execute("DELETE FROM corral_alarms WHERE service = %s AND scope = %s AND at_ms = %s",
                           (self.service, writes.scope, writes.fired))
            else:
                continue
            touched[writes.scope] = None
        if not touched:
            return None
        return db.execute("SELECT s.scope, a.at_ms FROM unnest(%s::bytea[]) AS s(scope) LEFT JOIN corral_alarms a "
                          "ON a.service = %s AND a.scope = s.scope", (list(touched), self.service))

    def lock_fence(self, db):
        """Inside the group's transaction, first: lock this worker's fence row FOR SHARE until
        the commit (the broker's fence UPDATE waits for this lock); the cursor, read by
        check_fence once the pipeline has run it."""
        return db.execute("SELECT fenced FROM corral_fences WHERE worker = %s FOR SHARE", (self.worker,))

    def check_fence(self, db, cursor=None) -> None:
        """Fail (Fenced) if the broker has fenced this worker: a commit that locks the row after
        the fence reads it fenced."""
        row = (cursor or self.lock_fence(db)).fetchone()
        if row is None:   # its row is made when the store opens; made here if it is gone
            db.execute("INSERT INTO corral_fences VALUES (%s, false, %s) ON CONFLICT (worker) DO NOTHING",
                       (self.worker, time.time()))
            row = self.lock_fence(db).fetchone()
        if row[0]:
            raise Fenced(f"worker {self.worker} is fenced")


_ADD_STAT = ("INSERT INTO corral_stats VALUES (%s, %s, %s) ON CONFLICT (service, name) "
             "DO UPDATE SET value = corral_stats.value + excluded.value")


# --- operators' tools: export, import, backup ---------------------------------

def export_rows(dsn: str, service: str, scope: bytes | None = None, connection=None):
    """(scope, key, value) of every live entry of a service, then (scope, at_ms) of every alarm,
    in one consistent read (a REPEATABLE READ snapshot; on `connection` when given, in its
    transaction)."""
    def read(connection):
        query = "SELECT scope, key, value FROM corral_kv WHERE service = %s"
        arguments: tuple = (service,)
        if scope is not None:
            query += " AND scope = %s"
            arguments += (scope,)
        with connection.cursor(name="corral_export") as cursor:
            cursor.itersize = 1000
            cursor.execute(query + " ORDER BY scope, key", arguments)
            for row in cursor:
                yield bytes(row[0]), bytes(row[1]), bytes(row[2])
        for row in alarm_rows(connection, service, scope):
            yield row
    if connection is not None:
        yield from read(connection)
        return
    with snapshot(dsn) as connection:
        yield from read(connection)


def snapshot(dsn: str) -> psycopg.Connection:
    """A connection in a read-only REPEATABLE READ transaction: every read sees one moment."""
    connection = psycopg.connect(dsn_with_defaults(dsn, "corral state"), autocommit=False)
    connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    connection.read_only = True
    return connection


def import_rows(dsn: str, service: str, rows) -> int:
    """Write (scope, key, value) entries and (scope, at_ms) alarms in one transaction, replacing
    what is there; the quota bookkeeping follows (under the scopes' commit locks, as a worker's
    commit). Returns how many."""
    rows = list(rows)
    store = PgStore(dsn, service, "fsync", Limits(), token_period_s=0)
    store.counts_commits = False
    if not store.open():
        raise Unavailable(f"cannot reach PostgreSQL ({describe(dsn)})")
    overlay, alarms = {}, []
    for row in rows:
        if len(row) == 2:   # an alarm: a write set that only sets it
            alarm = WriteSet(store, row[0])
            alarm.alarm = row[1]
            alarms.append(alarm)
        else:
            scope, key, value = row
            overlay[(scope, key)] = value
    try:
        store.write_group(overlay, alarms, time.time(), None, None)
    finally:
        store.close()
    return len(rows)


def backup_lines(dsn: str, services):
    """(service, row) of every listed service, all from one snapshot: a row is (scope, key,
    value) or (scope, at_ms), as export_rows gives them."""
    with snapshot(dsn) as connection:
        for service in services:
            for row in export_rows(dsn, service, connection=connection):
                yield service, row


# --- the arbiter's reads of alarms (docs/alarms.md) -----------------------------

def alarm_rows(connection, service: str, scope: bytes | None = None) -> list[tuple[bytes, int]]:
    """(scope, at_ms) of every alarm of a service (or the one scope's), the earliest first."""
    query, arguments = "SELECT scope, at_ms FROM corral_alarms WHERE service = %s", (service,)
    if scope is not None:
        query, arguments = query + " AND scope = %s", (service, scope)
    return [(bytes(s), at) for s, at in connection.execute(query + " ORDER BY at_ms, scope", arguments)]


def read_alarms(dsn: str, service: str) -> list[tuple[bytes, int]]:
    """Every pending alarm of a service (the arbiter's start-up and reload); raise psycopg.Error."""
    with connect(dsn, "corral alarms") as connection:
        return alarm_rows(connection, service)


def read_alarm(dsn: str, service: str, scope: bytes) -> int | None:
    """One scope's alarm (the arbiter, after a worker died holding its requests); raise psycopg.Error."""
    with connect(dsn, "corral alarms") as connection:
        rows = alarm_rows(connection, service, scope)
    return rows[0][1] if rows else None


__all__ = ["PgStore", "ERRORS", "fence", "prepare", "read_stats", "export_rows", "import_rows", "backup_lines",
           "read_alarms", "read_alarm"]
