"""Test-only: a worker SIGKILLs itself right after its next commit, before its replies leave:
the one moment a test cannot reach from outside (tests/test_state.py).

Put this folder on PYTHONPATH and name a flag file in CORRAL_TEST_KILL_AFTER_COMMIT: every
process of the daemon loads this at start, and the first commit that finds the file
removes it and kills its process. Production code knows nothing of it.
"""

import os
import signal

FLAG = os.environ.get("CORRAL_TEST_KILL_AFTER_COMMIT", "")

if FLAG:
    from corral.workers import state

    _commit = state.Store.commit

    def commit_then_die(self, *args, **kwargs):
        committed = _commit(self, *args, **kwargs)
        if os.path.exists(FLAG):
            os.unlink(FLAG)   # once per file
            os.kill(os.getpid(), signal.SIGKILL)
        return committed

    state.Store.commit = commit_then_die
