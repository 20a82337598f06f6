"""Alarms (docs/alarms.md): the schedule (supervisor/alarms.py) as a plain object, the write
set's alarm (workers/state.py), and the real daemon firing guests/alarm.wat's corral_alarm.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from base64 import b64encode
from pathlib import Path

import pytest

from harness import GUESTS
from corral.alarms import Alarms, Run
from corral.workers import state

ALARM = GUESTS / "alarm.wat"


# --- the schedule, without sockets ----------------------------------------------

def test_due_runs_come_earliest_first_and_never_before_their_time():
    alarms = Alarms(rng=random.Random(1))
    alarms.load(b"s", [(b"b", 2000), (b"a", 1000), (b"c", 3000)])
    assert alarms.next_due() == 1000
    assert alarms.due(999) == []
    assert [r.scope for r in alarms.due(2500)] == [b"a", b"b"]
    assert alarms.next_due() == 3000
    assert alarms.due(2600) == []   # a running scope is never handed out twice


def test_a_change_replaces_the_time_and_a_delete_forgets_it_without_a_scan():
    alarms = Alarms()
    alarms.update(b"s", b"a", 5000)
    alarms.update(b"s", b"a", 7000)
    alarms.update(b"s", b"b", 6000)
    alarms.update(b"s", b"b", None)
    assert alarms.next_due() == 7000 and alarms.pending(b"s") == 1
    assert [(r.scope, r.at_ms) for r in alarms.due(10_000)] == [(b"a", 7000)]


def test_success_deletes_and_a_run_that_set_a_new_alarm_keeps_it():
    alarms = Alarms()
    alarms.update(b"s", b"a", 1000)
    alarms.update(b"s", b"b", 1000)
    run_a, run_b = alarms.due(1000)
    alarms.update(b"s", b"a", None)          # the worker's report of the commit, before the reply
    assert alarms.finished(run_a, True, 1010) == "fired"
    alarms.update(b"s", b"b", 1500)          # the run set another one
    assert alarms.finished(run_b, True, 1010) == "fired"
    assert alarms.pending(b"s") == 1 and alarms.next_due() == 1500
    assert alarms.due(1500)[0].retries == 0


def test_failures_back_off_from_the_end_of_the_run_doubling_within_a_quarter_then_drop():
    alarms = Alarms(rng=random.Random(7))
    alarms.update(b"s", b"a", 1000)
    now = 1000
    seen = []
    for expected_retries in range(7):
        (run,) = alarms.due(now)
        assert run.retries == expected_retries and not run.drop
        end = now + 30
        assert alarms.finished(run, False, end) == "failed"
        now = alarms.next_due()
        seen.append(now - end)
    # six backoffs (1, 2, 4, 8, 16, 32 s, each within 25%), then the drop is due at once
    for retry, gap in enumerate(seen[:6], 1):
        base = 1000 * 2 ** (retry - 1)
        assert 0.75 * base <= gap <= 1.25 * base, (retry, gap)
    assert seen[6] == 0
    (drop,) = alarms.due(now)
    assert drop.drop and drop.at_ms == 1000
    assert alarms.finished(drop, False, now) == "retry"      # the delete failed: tried again
    (drop,) = alarms.due(alarms.next_due())
    alarms.update(b"s", b"a", None)
    assert alarms.finished(drop, True, now + 2000) == "dropped"
    assert alarms.counts(b"s") == {"pending": 0, "fired": 0, "failed": 7, "dropped": 1}


def test_a_new_time_set_while_failing_starts_again_at_retries_zero():
    alarms = Alarms()
    alarms.update(b"s", b"a", 1000)
    (run,) = alarms.due(1000)
    alarms.update(b"s", b"a", 9000)          # another request replaced it meanwhile
    alarms.finished(run, False, 1100)
    (run,) = alarms.due(9000)
    assert (run.at_ms, run.retries) == (9000, 0)


def test_at_most_max_running_runs_of_a_service_are_out():
    alarms = Alarms(max_running=3)
    alarms.load(b"s", [(b"%d" % i, 1000 + i) for i in range(10)])
    alarms.load(b"t", [(b"x", 1000)])
    runs = alarms.due(5000)
    assert sorted(r.service for r in runs) == [b"s"] * 3 + [b"t"]
    alarms.finished(runs[0], True, 5000)
    assert len(alarms.due(5000)) == 1 and alarms.next_due() is None


def test_ten_thousand_pending_alarms_cost_a_heap_not_a_scan():
    alarms = Alarms(max_running=1 << 30)
    rows = [(b"k%d" % i, 1_000_000 + i) for i in range(10_000)]
    started = time.perf_counter()
    alarms.load(b"s", rows)
    for _ in range(10_000):
        alarms.next_due()
    runs = alarms.due(2_000_000)
    for run in runs:
        alarms.finished(run, True, 2_000_000)
    assert len(runs) == 10_000 and alarms.pending(b"s") == 0
    assert [r.at_ms for r in runs] == sorted(r.at_ms for r in runs)
    # (no timing asserted here: bench/sections/alarms.py measures it)
    assert time.perf_counter() - started < 60


# --- the write set's alarm, without a daemon ----------------------------------------

def test_an_alarm_is_part_of_the_write_set_and_its_commit(tmp_path):
    store = state.Store(tmp_path / "s.sqlite3", "os", state.Limits(), 30.0)
    writes = state.WriteSet(store, b"k")
    assert writes.alarm_get() == state.ABSENT
    assert writes.alarm_set(-1) == state.BAD_KEY
    assert writes.alarm_set(1234) == 0 and writes.alarm_get() == 1234
    other = state.WriteSet(store, b"k")
    assert other.alarm_get() == state.ABSENT         # not committed, not staged: not seen
    store.stage(writes, 200, b"", b"")
    later = state.WriteSet(store, b"k")
    assert later.alarm_get() == 1234 and later.saw_staged   # staged: seen, and its fate shared
    store.commit()
    assert store.alarm_changes == [(b"k", 1234)]
    assert state.read_alarms(store.path) == [(b"k", 1234)]
    dropped = state.WriteSet(store, b"k")
    assert dropped.alarm_delete() == 1
    store.discard(dropped)
    store.commit()
    assert state.read_alarms(store.path) == [(b"k", 1234)]
    run = state.WriteSet(store, b"k")
    run.fired = 1000                                 # not this alarm: the delete does nothing
    store.stage(run, 200, b"", b"")
    store.commit()
    assert store.alarm_changes == [(b"k", 1234)]
    run = state.WriteSet(store, b"k")
    run.fired = 1234
    store.stage(run, 200, b"", b"")
    store.commit()
    assert store.alarm_changes == [(b"k", None)] and state.read_alarms(store.path) == []
    store.close()


def test_a_version_1_database_gains_the_alarms_table(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3_connect_v1(path)
    old.close()
    assert state.read_alarms(path) == []
    store = state.Store(path, "os", state.Limits(), 30.0)
    writes = state.WriteSet(store, b"")
    writes.alarm_set(5)
    store.stage(writes, 200, b"", b"")
    store.commit()
    store.close()
    assert state.read_alarms(path) == [(b"", 5)]


def sqlite3_connect_v1(path: Path):
    import sqlite3
    connection = sqlite3.connect(path, isolation_level=None)
    schema = state._SCHEMA.split("CREATE TABLE IF NOT EXISTS alarms")[0]
    connection.executescript("BEGIN;" + schema + "PRAGMA user_version = 1; COMMIT;")
    return connection
