"""Test-only hooks, loaded by every process of a daemon started with this folder on
PYTHONPATH (Python imports `sitecustomize` at start). Production code knows nothing of them.

CORRAL_TEST_KILL_AFTER_COMMIT=FILE: a worker SIGKILLs itself right after the first commit
that finds FILE (removing it), before its replies leave: the one moment a test cannot reach
from outside (tests/test_state.py, tests/test_alarms.py). Its confinement lets it remove FILE.

CORRAL_TEST_ALARM_BACKOFF_MS=N: the alarms' first retry after N ms instead of a second, so
that seven runs take seconds rather than two minutes (tests/test_alarms.py, test_chaos.py).
"""

import os
import signal

FLAG = os.environ.get("CORRAL_TEST_KILL_AFTER_COMMIT", "")
BACKOFF_MS = os.environ.get("CORRAL_TEST_ALARM_BACKOFF_MS", "")

if FLAG:
    import dataclasses

    from corral.workers import confine, state

    _commit = state.StagedStore.commit   # every backend's

    def commit_then_die(self, *args, **kwargs):
        committed = _commit(self, *args, **kwargs)
        if os.path.exists(FLAG):
            os.unlink(FLAG)   # once per file
            os.kill(os.getpid(), signal.SIGKILL)
        return committed

    state.StagedStore.commit = commit_then_die

    _confine = confine.confine

    def confine_leaving_the_flag(plan, mode):
        return _confine(dataclasses.replace(plan, writes=plan.writes + (os.path.dirname(FLAG),)), mode)

    confine.confine = confine_leaving_the_flag

if BACKOFF_MS:
    from corral import alarms

    alarms.BACKOFF_MS = int(BACKOFF_MS)
