"""OS limits a worker puts on itself before it loads any guest (docs/operating.md).

Done in the worker, not in a preexec_fn of the daemon: the daemon runs
threads, and code between fork and exec must not take locks.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

from corral.workers.spec import resolve

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the daemon dies, whatever way it dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def limit_resources(max_open_files: int, max_address_space_mib: int = 0) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if max_address_space_mib:
        limit = max_address_space_mib * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max_open_files if hard == resource.RLIM_INFINITY else min(max_open_files, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    # A worker leaves on the broker's word; SIGINT from a terminal goes to the daemon.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def drop_privileges(user: str, group: str) -> None:
    """Become `user`/`group` when started as root (names or numeric ids), then
    forbid gaining privileges again (no setuid binaries, no file capabilities)."""
    become(target_ids(user, group))


def target_ids(user: str, group: str) -> tuple[int, int] | None:
    """The (uid, gid) to drop to, or None: looked up before confinement, which closes /etc."""
    return resolve(user, group) if os.getuid() == 0 and (user or group) else None


def become(ids: tuple[int, int] | None) -> None:
    """Drop to already resolved ids (no lookup: a confined worker cannot read /etc/passwd)."""
    if ids is not None:
        uid, gid = ids
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
