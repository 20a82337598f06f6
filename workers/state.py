"""Durable state for guests (docs/state.md): one SQLite database per service, write sets, group commit.

Runs in workers (the host functions and the commits) and in the arbiter and
the CLI (checking, exporting, importing, backing up): it imports nothing but
the standard library.

A request's writes live in its WriteSet while the guest runs; nothing
touches the database's write lock then. When the request ends 200 or 422
its write set is staged on its service's Store; the worker commits every
staged write set of a store in one transaction (group commit) just before
it sends their replies (the output gate). Staged writes are visible to the
requests the worker runs after them, so a keyed scope served by one worker
stays serializable although its commits are batched. A write set dropped
(500, 502, 504, a dead worker) leaves nothing.

Schema (user_version 2; version 1 had no alarms table and is brought up to 2 when opened):
  kv(scope, key, value)         the live entries; scope b"" is a non-keyed service's
  scopes(scope, bytes)          key + value bytes of each scope's live entries (the quota)
  tokens(token, at, status, fault, body)
                                replies of committed idempotent requests, by the
                                broker's token, so a re-dispatched one is answered
                                without running again (pruned after restart.period_s)
  stats(name, value)            commits and rollbacks (requests), for status and metrics
  alarms(scope, at_ms)          each scope's one alarm (docs/alarms.md), wall-clock ms

Alarms are part of a write set like its kv writes. The SQL that touches the
alarms table is in a few functions of its own (ALARM SQL below), so that
another backend can mirror them one for one.
"""

from __future__ import annotations

import heapq
import os
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000
LOCK_STEP_MS = 50
PRUNE_EVERY_S = 1.0
LIST_BATCH = 256

# Return codes of the host functions (docs/state.md).
ABSENT = -1
BAD_KEY = -2
TOO_LARGE = -3
OVER_QUOTA = -4
NO_ROOM = -5
UNAVAILABLE = -6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (scope BLOB NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
                               PRIMARY KEY (scope, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scopes (scope BLOB PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (token INTEGER PRIMARY KEY, at REAL NOT NULL, status INTEGER NOT NULL,
                                   fault BLOB NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS tokens_at ON tokens (at);
CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alarms (scope BLOB PRIMARY KEY, at_ms INTEGER NOT NULL) WITHOUT ROWID;
"""
_LEN = struct.Struct("<I")


class StateProblem(Exception):
    """A state file that cannot be used, with the file named."""


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int = 2048
    max_value_bytes: int = 128 * 1024
    max_scope_bytes: int = 64 * 1024 * 1024


def database_path(state_dir: str | os.PathLike[str], service: str) -> Path:
    """Service names are letters, digits, '_', '.', '-' (config.py), so they are safe file names."""
    return Path(state_dir) / f"{service}.sqlite3"


def connect(path: Path, durability: str = "fsync", busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open (making if missing) a service's database in WAL mode with the schema; raise sqlite3.Error."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                 timeout=busy_timeout_ms / 1000)
    try:
        connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this corral's "
                                        f"({SCHEMA_VERSION})")
        if connection.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise sqlite3.DatabaseError("cannot switch to WAL mode")
        connection.execute(f"PRAGMA synchronous = {'FULL' if durability == 'fsync' else 'NORMAL'}")
        if version < SCHEMA_VERSION:
            connection.executescript("BEGIN IMMEDIATE;" + _SCHEMA +
                                     f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    except BaseException:
        connection.close()
        raise
    return connection


def check_file(path: Path, create: bool, prune_tokens: bool = False) -> None:
    """Can this state file be served? Raise StateProblem naming it, and why.

    `create`: make it (and its folder, 0700) if missing, as the daemon does at
    start-up; otherwise (`corral check`) a missing file is fine when its
    folder could be made. `prune_tokens`: forget every recorded reply (at
    daemon start-up: no request of an earlier run can be re-dispatched)."""
    if not path.exists() and not create:
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StateProblem(f"state file {path}: cannot be created: {parent} is not writable")
        return
    try:
        if create:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        connection = connect(path)
        try:
            verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"damaged: {verdict}")
            if prune_tokens:
                connection.execute("DELETE FROM tokens")
            if not os.access(path, os.W_OK):
                raise sqlite3.DatabaseError("not writable")
        finally:
            connection.close()
    except (sqlite3.Error, OSError) as exc:
        raise StateProblem(f"state file {path}: {exc}") from None


def read_stats(path: Path) -> dict[str, int]:
    """commits, rollbacks, bytes and scopes of a service's database (empty if it has none)."""
    if not path.is_file():
        return {}
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
        try:
            stats = dict(connection.execute("SELECT name, value FROM stats").fetchall())
            nbytes, scopes = connection.execute("SELECT coalesce(sum(bytes), 0), count(*) FROM scopes "
                                                "WHERE bytes > 0").fetchone()
        finally:
            connection.close()
    except sqlite3.Error:
        return {}
    return {"commits": stats.get("commits", 0), "rollbacks": stats.get("rollbacks", 0),
            "bytes": nbytes, "scopes": scopes}


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string starting with `prefix` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class Unavailable(Exception):
    """The store could not be reached, or refused a statement: any backend (docs/cluster.md)."""


class Unreachable(Unavailable):
    """The store cannot be reached at all (no connection): requests get 503 "state unavailable"."""


class Fenced(Unavailable):
    """The broker has fenced this worker: its commits fail and keep nothing (docs/cluster.md)."""


def fence_name(run_id: str, identity: bytes) -> str:
    """A worker's name in the fences of a shared store: the broker's run and the worker's
    identity (slot and generation), so that no two workers ever share one."""
    return f"{run_id}/{identity.decode(errors='replace')}"


# What a store's reads and commits raise when the store is not there (WriteSet: -6; the
# worker's output gate: 503). SQLite raises its own errors; other backends raise Unavailable.
ERRORS = (sqlite3.Error, Unavailable)


class StagedStore:
    """What every backend shares: the staged write sets of one service and their replies, and
    the overlay that later requests of the worker read through. A backend adds open, close,
    visible, committed_bytes, committed_keys, recorded_reply and write_group (one transaction
    for a group: entries, the scopes' byte counts, tokens, stats)."""

    def __init__(self, durability: str, limits: Limits, token_period_s: float, log=None):
        self.durability = durability
        self.limits = limits
        self.token_period_s = token_period_s
        self.log = log
        self.staged: list[WriteSet] = []
        self.overlay: dict[tuple[bytes, bytes], bytes | None] = {}  # staged writes, newest last
        self.overlay_delta: dict[bytes, int] = {}
        self.alarm_overlay: dict[bytes, int | None] = {}   # staged alarms: scope -> at_ms, None deleted
        # After each commit: (scope, at_ms or None) of every scope whose alarm the group touched,
        # as the database holds it then; the worker tells the broker (docs/alarms.md).
        self.alarm_changes: list[tuple[bytes, int | None]] = []
        self.rollbacks = 0     # not yet counted in the database
        self.next_prune = 0.0
        self.worker = ""       # this worker's fence name: a shared store's commits check it
        self.read_s = 0.0      # seconds its reads waited on a networked store, in all

    def stage(self, writes: "WriteSet", status: int, fault: bytes, body: bytes) -> None:
        """A request that ended 200/422: its writes commit with the next group, reply and all."""
        writes.reply = (status, fault, body)
        self.staged.append(writes)
        scope = writes.scope
        for key, value in writes.writes.items():
            self.overlay[(scope, key)] = value
        self.overlay_delta[scope] = self.overlay_delta.get(scope, 0) + writes.delta
        if writes.alarm is not _MISSING:
            self.alarm_overlay[scope] = writes.alarm
        elif writes.fired >= 0:
            # A successful alarm run that set no alarm: its alarm goes, unless another request
            # has replaced it meanwhile (the commit's SQL checks again).
            try:
                if self.visible_alarm(scope) == writes.fired:
                    self.alarm_overlay[scope] = None
            except ERRORS:
                pass

    def discard(self, writes: "WriteSet") -> None:
        """A request that ended 500/502/504: nothing of it is kept."""
        if writes.writes:
            self.rollbacks += 1

    def commit(self, now: float | None = None, waiting=None) -> list["WriteSet"]:
        """Commit every staged write set in one transaction; returns them. Raise one of ERRORS
        (nothing of them is kept then, and they are unstaged all the same). `waiting()` is
        called while another writer holds the lock."""
        staged, overlay = self.staged, self.overlay
        self.staged, self.overlay, self.overlay_delta, self.alarm_overlay = [], {}, {}, {}
        self.alarm_changes = []
        if not staged and not self.rollbacks:
            return staged
        if not self.open():
            self.rollbacks += len(staged)
            if not staged:
                return staged   # only counts to save, and no database to save them in
            raise Unreachable("storage unavailable")
        now = time.time() if now is None else now
        prune_before = None
        if now >= self.next_prune:
            self.next_prune = now + PRUNE_EVERY_S
            prune_before = now - self.token_period_s
        try:
            self.alarm_changes = self.write_group(overlay, staged, now, prune_before, waiting)
            self.rollbacks = 0
        except BaseException:
            self.rollbacks += len(staged)
            raise
        return staged

    def open(self) -> bool:
        raise NotImplementedError

    def visible_alarm(self, scope: bytes) -> int | None:
        """The scope's alarm (at_ms), staged or committed; raise one of ERRORS."""
        raise NotImplementedError

    def write_group(self, overlay, staged, now, prune_before, waiting) -> list[tuple[bytes, int | None]]:
        """In one transaction: overlay's entries (None: deleted) and the scopes' byte counts,
        the alarms and the tokens and replies of `staged`, the commit and rollback counts, tokens
        older than prune_before (None: not now) pruned. Raise one of ERRORS, keeping nothing.
        Returns (scope, at_ms or None) of each scope whose alarm it touched, as committed."""
        raise NotImplementedError


class Store(StagedStore):
    """One service's SQLite database, as a worker uses it."""

    def __init__(self, path: Path, durability: str, limits: Limits, token_period_s: float, log=None,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        """`busy_timeout_ms`: how long a commit waits for another writer before it fails."""
        super().__init__(durability, limits, token_period_s, log)
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.db: sqlite3.Connection | None = None
        # Opened at first use, not here: a worker opens it after dropping privileges.

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> bool:
        if self.db is not None:
            return True
        try:
            # SQLite waits for the lock in steps of LOCK_STEP_MS; commit() repeats them, so
            # that the worker can heartbeat in between (the broker hears nothing otherwise).
            self.db = connect(self.path, self.durability, LOCK_STEP_MS)
        except (sqlite3.Error, OSError) as exc:
            if self.log is not None:
                self.log.error("state.unavailable", file=str(self.path), error=str(exc))
            self.db = None
        return self.db is not None

    def close(self) -> None:
        if self.db is not None:
            if self.rollbacks:
                try:
                    self.db.execute("INSERT INTO stats VALUES ('rollbacks', ?) ON CONFLICT(name) "
                                    "DO UPDATE SET value = value + excluded.value", (self.rollbacks,))
                except sqlite3.Error:
                    pass
            self.db.close()
            self.db = None

    # --- reads: committed data under the staged writes ----------------------

    def visible(self, scope: bytes, key: bytes) -> bytes | None:
        """Raise one of ERRORS when the database cannot be read."""
        found = self.overlay.get((scope, key), _MISSING)
        if found is not _MISSING:
            return found
        if not self.open():
            raise Unavailable("storage unavailable")
        row = self.db.execute("SELECT value FROM kv WHERE scope = ? AND key = ?", (scope, key)).fetchone()
        return row[0] if row else None

    def committed_bytes(self, scope: bytes) -> int:
        if not self.open():
            raise Unavailable("storage unavailable")
        row = self.db.execute("SELECT bytes FROM scopes WHERE scope = ?", (scope,)).fetchone()
        return (row[0] if row else 0) + self.overlay_delta.get(scope, 0)

    def committed_keys(self, scope: bytes, prefix: bytes, after: bytes):
        """Keys of the database (not the overlay) in the scope that start with prefix and sort
        after `after`, ascending."""
        if not self.open():
            raise Unavailable("storage unavailable")
        end = _prefix_end(prefix)
        query = "SELECT key FROM kv WHERE scope = ? AND key >= ? AND key > ?"
        if end is not None:
            query += " AND key < ?"
        query += f" ORDER BY key LIMIT {LIST_BATCH}"
        last = after
        while True:
            arguments = (scope, prefix, last) if end is None else (scope, prefix, last, end)
            rows = self.db.execute(query, arguments).fetchall()
            for (key,) in rows:
                yield key
            if len(rows) < LIST_BATCH:
                return
            last = rows[-1][0]

    def visible_alarm(self, scope: bytes) -> int | None:
        found = self.alarm_overlay.get(scope, _MISSING)
        if found is not _MISSING:
            return found
        if not self.open():
            raise Unavailable("storage unavailable")
        return alarm_read(self.db, scope)

    def recorded_reply(self, token: int) -> tuple[int, bytes, bytes] | None:
        """The reply a committed request with this token got, if any."""
        if not self.open():
            return None
        try:
            row = self.db.execute("SELECT status, fault, body FROM tokens WHERE token = ?", (token,)).fetchone()
        except sqlite3.Error:
            return None
        return (row[0], bytes(row[1]), bytes(row[2])) if row else None

    # --- the end of a request ----------------------------------------------

    def write_group(self, overlay, staged, now, prune_before, waiting) -> list[tuple[bytes, int | None]]:
        db = self.db
        try:
            self.lock(waiting)
            deltas: dict[bytes, int] = {}
            for (scope, key), value in overlay.items():
                row = db.execute("SELECT length(value) FROM kv WHERE scope = ? AND key = ?",
                                 (scope, key)).fetchone()
                old = len(key) + row[0] if row else 0
                if value is None:
                    if row:
                        db.execute("DELETE FROM kv WHERE scope = ? AND key = ?", (scope, key))
                    new = 0
                else:
                    db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (scope, key, value))
                    new = len(key) + len(value)
                if new != old:
                    deltas[scope] = deltas.get(scope, 0) + new - old
            for scope, delta in deltas.items():
                db.execute("INSERT INTO scopes VALUES (?, ?) ON CONFLICT(scope) "
                           "DO UPDATE SET bytes = bytes + excluded.bytes", (scope, delta))
            changes = alarm_apply(db, staged)
            tokens = [(w.token, now, *w.reply) for w in staged if w.token]
            if tokens:
                db.executemany("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?)", tokens)
            if prune_before is not None:
                db.execute("DELETE FROM tokens WHERE at < ?", (prune_before,))
            if staged:
                db.execute("INSERT INTO stats VALUES ('commits', ?) ON CONFLICT(name) "
                           "DO UPDATE SET value = value + excluded.value", (len(staged),))
            if self.rollbacks:
                db.execute("INSERT INTO stats VALUES ('rollbacks', ?) ON CONFLICT(name) "
                           "DO UPDATE SET value = value + excluded.value", (self.rollbacks,))
            db.execute("COMMIT")
            return changes
        except BaseException:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    def lock(self, waiting) -> None:
        """BEGIN IMMEDIATE: wait for the write lock up to busy_timeout_ms; raise sqlite3.Error."""
        give_up = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() >= give_up:
                    raise
            if waiting is not None:
                waiting()


_MISSING = object()


class WriteSet:
    """One request's reads and writes in one scope: the committed data (and what is staged)
    under its own writes and deletes."""

    __slots__ = ("store", "scope", "token", "writes", "delta", "base_bytes", "reply", "ticket", "saw_staged",
                 "alarm", "fired")

    def __init__(self, store: StagedStore, scope: bytes, token: int = 0, ticket: int = 0):
        self.store = store
        self.scope = scope
        self.token = token
        self.ticket = ticket
        self.writes: dict[bytes, bytes | None] = {}
        self.delta = 0           # bytes this write set adds to the scope (or takes, below 0)
        self.base_bytes = -1     # the scope's bytes under this write set, read at the first put
        self.reply: tuple[int, bytes, bytes] = (0, b"", b"")
        # It read writes that are staged, not yet committed: its reply shares their fate.
        self.saw_staged = False
        self.alarm: int | None | object = _MISSING   # alarm_set's at_ms, None after alarm_delete
        # An alarm run's: the at_ms it fired for, deleted at its commit unless it set another;
        # -1 for any other request.
        self.fired = -1

    @property
    def changed(self) -> bool:
        """Has it anything to commit?"""
        return bool(self.writes) or self.alarm is not _MISSING or self.fired >= 0

    def bad_key(self, key: bytes) -> bool:
        return not key or len(key) > self.store.limits.max_key_bytes

    def get(self, key: bytes) -> bytes | int:
        """The value, or ABSENT, BAD_KEY, UNAVAILABLE."""
        if self.bad_key(key):
            return BAD_KEY
        value = self.writes.get(key, _MISSING)
        if value is _MISSING:
            if (self.scope, key) in self.store.overlay:
                self.saw_staged = True
            try:
                value = self.store.visible(self.scope, key)
            except ERRORS:
                return UNAVAILABLE
        return ABSENT if value is None else value

    def size_now(self, key: bytes) -> int:
        value = self.writes.get(key, _MISSING)
        if value is _MISSING:
            value = self.store.visible(self.scope, key)
        return 0 if value is None else len(key) + len(value)

    def put(self, key: bytes, value: bytes) -> int:
        limits = self.store.limits
        if self.bad_key(key):
            return BAD_KEY
        if len(value) > limits.max_value_bytes:
            return TOO_LARGE
        try:
            old = self.size_now(key)
            new = len(key) + len(value)
            if new > old:
                if self.base_bytes < 0:
                    self.base_bytes = self.store.committed_bytes(self.scope)
                if self.base_bytes + self.delta + new - old > limits.max_scope_bytes:
                    return OVER_QUOTA
        except ERRORS:
            return UNAVAILABLE
        self.writes[key] = value
        self.delta += new - old
        return 0

    def delete(self, key: bytes) -> int:
        """1 deleted, 0 was absent, or BAD_KEY, UNAVAILABLE."""
        if self.bad_key(key):
            return BAD_KEY
        try:
            old = self.size_now(key)
        except ERRORS:
            return UNAVAILABLE
        if old == 0 and key not in self.writes:
            return 0
        self.writes[key] = None
        self.delta -= old
        return 1 if old else 0

    # --- the scope's alarm (docs/alarms.md) ----------------------------------

    def alarm_get(self) -> int:
        """The scope's alarm time (ms), ABSENT, or UNAVAILABLE."""
        found = self.alarm
        if found is _MISSING:
            if self.scope in self.store.alarm_overlay:
                self.saw_staged = True
            try:
                found = self.store.visible_alarm(self.scope)
            except ERRORS:
                return UNAVAILABLE
        return ABSENT if found is None else found

    def alarm_set(self, at_ms: int) -> int:
        """0, or BAD_KEY for a negative time (the guest's -2)."""
        if at_ms < 0:
            return BAD_KEY
        self.alarm = at_ms
        return 0

    def alarm_delete(self) -> int:
        """1 deleted, 0 there was none, UNAVAILABLE."""
        found = self.alarm_get()
        if found == UNAVAILABLE:
            return UNAVAILABLE
        self.alarm = None
        return 0 if found == ABSENT else 1

    def list(self, prefix: bytes, after: bytes, cap: int) -> bytes | int:
        """As many whole keys (u32 LE length, bytes) as fit in cap, ascending: the bytes, or
        NO_ROOM when the first key alone does not fit, or UNAVAILABLE. b"" when none is left."""
        scope = self.scope
        shadow: dict[bytes, bool] = {}   # key -> live, from what is staged and this write set
        for (s, key), value in self.store.overlay.items():
            if s == scope and key > after and key.startswith(prefix):
                shadow[key] = value is not None
                self.saw_staged = True
        for key, value in self.writes.items():
            if key > after and key.startswith(prefix):
                shadow[key] = value is not None
        live_shadow = sorted(k for k, live in shadow.items() if live)
        out = bytearray()
        try:
            committed = (k for k in self.store.committed_keys(scope, prefix, after) if k not in shadow)
            for key in heapq.merge(committed, live_shadow):
                if len(out) + 4 + len(key) > cap:
                    if not out:
                        return NO_ROOM
                    break
                out += _LEN.pack(len(key))
                out += key
        except ERRORS:
            return UNAVAILABLE
        return bytes(out)


# --- ALARM SQL: every statement on the alarms table (docs/alarms.md) -----------

def alarm_read(db: sqlite3.Connection, scope: bytes) -> int | None:
    row = db.execute("SELECT at_ms FROM alarms WHERE scope = ?", (scope,)).fetchone()
    return row[0] if row else None


def alarm_apply(db: sqlite3.Connection, staged: list["WriteSet"]) -> list[tuple[bytes, int | None]]:
    """Inside a commit's transaction: the alarm writes of the staged write sets, in order;
    returns (scope, at_ms or None) of each scope touched, as it is once they are applied."""
    touched: dict[bytes, None] = {}
    for writes in staged:
        scope = writes.scope
        if writes.alarm is not _MISSING:
            if writes.alarm is None:
                db.execute("DELETE FROM alarms WHERE scope = ?", (scope,))
            else:
                db.execute("INSERT OR REPLACE INTO alarms VALUES (?, ?)", (scope, writes.alarm))
        elif writes.fired >= 0:
            db.execute("DELETE FROM alarms WHERE scope = ? AND at_ms = ?", (scope, writes.fired))
        else:
            continue
        touched[scope] = None
    return [(scope, alarm_read(db, scope)) for scope in touched]


def alarm_rows(db: sqlite3.Connection, scope: bytes | None = None):
    """(scope, at_ms) of every alarm (or the one scope's), the earliest first."""
    if scope is None:
        return db.execute("SELECT scope, at_ms FROM alarms ORDER BY at_ms, scope")
    return db.execute("SELECT scope, at_ms FROM alarms WHERE scope = ?", (scope,))


def alarm_import(db: sqlite3.Connection, scope: bytes, at_ms: int) -> None:
    db.execute("INSERT OR REPLACE INTO alarms VALUES (?, ?)", (scope, at_ms))


def read_alarm(path: Path, scope: bytes) -> int | None:
    """One scope's alarm, read-only (the arbiter, after a worker died holding its requests)."""
    if not path.is_file():
        return None
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        return alarm_read(connection, scope)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    finally:
        connection.close()


def read_alarms(path: Path) -> list[tuple[bytes, int]]:
    """Every pending alarm of a service's database, read-only (the arbiter's start-up and
    reload); empty when it has no database yet, or an older one without alarms."""
    if not path.is_file():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        try:
            return [(bytes(scope), at_ms) for scope, at_ms in alarm_rows(connection)]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
    finally:
        connection.close()


# --- operators' tools: export, import, backup ---------------------------------

def export_rows(path: Path, scope: bytes | None = None):
    """(scope, key, value) of every live entry, then (scope, at_ms) of every alarm, in one
    consistent read."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        connection.execute("BEGIN")
        if scope is None:
            rows = connection.execute("SELECT scope, key, value FROM kv ORDER BY scope, key")
        else:
            rows = connection.execute("SELECT scope, key, value FROM kv WHERE scope = ? ORDER BY key", (scope,))
        for row in rows:
            yield bytes(row[0]), bytes(row[1]), bytes(row[2])
        if connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'alarms'").fetchone():
            for row in alarm_rows(connection, scope):
                yield bytes(row[0]), row[1]
        connection.execute("COMMIT")
    finally:
        connection.close()


def import_rows(path: Path, rows, durability: str = "fsync") -> int:
    """Write (scope, key, value) entries and (scope, at_ms) alarms in one transaction, replacing
    what is there; the quota bookkeeping follows. Returns how many were written."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    connection = connect(path, durability)
    count = 0
    try:
        connection.execute("BEGIN IMMEDIATE")
        deltas: dict[bytes, int] = {}
        for entry in rows:
            if len(entry) == 2:
                alarm_import(connection, *entry)
                count += 1
                continue
            scope, key, value = entry
            row = connection.execute("SELECT length(value) FROM kv WHERE scope = ? AND key = ?",
                                     (scope, key)).fetchone()
            old = len(key) + row[0] if row else 0
            connection.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (scope, key, value))
            deltas[scope] = deltas.get(scope, 0) + len(key) + len(value) - old
            count += 1
        for scope, delta in deltas.items():
            connection.execute("INSERT INTO scopes VALUES (?, ?) ON CONFLICT(scope) "
                               "DO UPDATE SET bytes = bytes + excluded.bytes", (scope, delta))
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    finally:
        connection.close()
    return count


def backup(path: Path, target: Path) -> None:
    """A consistent copy of a live database (SQLite's online backup API)."""
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
    finally:
        source.close()
