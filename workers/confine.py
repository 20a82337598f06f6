"""The second wall (docs/confinement.md): what a worker does to itself so that a guest
that escaped Wasm holds nothing of anyone else's and reaches nothing it does not need.

    confine(plan, mode) -> Confinement

is called once, in the worker's main thread, before any other thread starts
(the epoch ticker, ZeroMQ's I/O thread) and before any guest is compiled or
instantiated: a seccomp filter applies to the thread that loads it and to the
threads it starts later, never to threads already running. Nothing here is
ever undone: no call can lift a Landlock domain or a seccomp filter.

Three layers, in this order:
  1. no new privileges (prctl): no setuid binary, no file capability, ever again;
  2. Landlock (kernel ABI >= 1): the files it may read and write; with ABI >= 4
     the TCP ports it may connect to (none for a local worker) and no bind;
     with ABI >= 6 no signal to, and no abstract socket of, anyone outside;
  3. seccomp: the ALLOWLIST below, for the native architecture; any other
     system call, or an allowed one with arguments outside its rule, ends the
     process (SECCOMP_RET_KILL_PROCESS, logged by the kernel's audit).

libseccomp builds and loads the filter (through `pyseccomp`, a ctypes binding
of libseccomp.so.2: no compiler needed, API of libseccomp's own bindings);
Landlock has no C library, so its three system calls are made through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("require", "best-effort", "off")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# --- what the kernel offers --------------------------------------------------

# Landlock's system calls have the same numbers on every architecture (the generic table).
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_SECCOMP = 21


@dataclass(frozen=True)
class Offer:
    """What this kernel (and this installation) offers a worker."""
    seccomp: bool
    landlock: int            # Landlock ABI version; 0: none
    problems: tuple[str, ...] = ()   # why a mechanism is missing, one line each

    def missing(self) -> list[str]:
        """The mechanisms `require` needs and this kernel lacks, with the reason."""
        return list(self.problems)

    def describe(self) -> str:
        landlock = f"Landlock ABI {self.landlock}" if self.landlock else "no Landlock"
        seccomp = "seccomp filters" if self.seccomp else "no seccomp filters"
        return f"{seccomp}, {landlock}"


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or it is disabled at boot)."""
    version = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def offered() -> Offer:
    problems = []
    abi = landlock_abi()
    if not abi:
        problems.append(f"Landlock: the kernel has none ({os.strerror(ctypes.get_errno() or errno.ENOSYS)})")
    seccomp = _libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0) >= 0
    if not seccomp:
        problems.append(f"seccomp: the kernel has no filters ({os.strerror(ctypes.get_errno())})")
    else:
        try:
            import pyseccomp  # noqa: F401  (finds libseccomp.so.2 as it loads)
        except (ImportError, RuntimeError) as exc:
            seccomp = False
            problems.append(f"seccomp: libseccomp cannot be loaded ({exc})")
    return Offer(seccomp, abi, tuple(problems))


def default_mode(offer: Offer | None = None) -> str:
    """`require` where the kernel offers seccomp and Landlock, else `best-effort` (docs/confinement.md)."""
    offer = offer or offered()
    return "require" if offer.seccomp and offer.landlock >= 1 else "best-effort"


class Refused(Exception):
    """`require` and a mechanism this process cannot have: the worker must not start."""


# --- the plan: what one worker needs ----------------------------------------

@dataclass(frozen=True)
class Plan:
    """What this process must still reach once confined."""
    reads: tuple[str, ...] = ()          # files and folders, read only
    writes: tuple[str, ...] = ()         # folders it makes, writes and removes files in
    tcp_ports: tuple[int, ...] = ()      # TCP ports it may connect to (a remote broker, a state store)
    families: tuple[int, ...] = (socket.AF_UNIX,)   # socket families it may open
    become: tuple[int, int] | None = None   # (uid, gid) it may still drop to, once (as root)


def python_reads() -> list[str]:
    """The Python installation, site-packages and corral's own package: what lazy imports,
    dlopen of extension modules and wasmtime's shared library read after confinement."""
    import sys
    reads = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))]
    reads += [p for p in sys.path if p]
    # The folders of every module loaded so far, links resolved: corral's own (in a checkout
    # supervisor/ and workers/ are apart, or a package of symlinks: bench --compare), and
    # whatever else was imported from outside sys.path; their siblings load lazily.
    reads += sorted({os.path.dirname(os.path.realpath(module.__file__)) for module in list(sys.modules.values())
                     if isinstance(getattr(module, "__file__", None), str)})
    # Shared libraries loaded late (libgcc_s when a thread exits, libseccomp, libsqlite3)
    # and the loader's cache; the time zone for log lines; the CPU list that
    # os.cpu_count and wasmtime read; its own /proc entry (stack bounds, memory maps).
    reads += ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
              "/etc/localtime", "/usr/share/zoneinfo", "/sys/devices/system/cpu", f"/proc/{os.getpid()}",
              "/dev/urandom"]
    return reads


def endpoint_ports(endpoint: str) -> list[int]:
    """The TCP port of a tcp:// endpoint (ZeroMQ's form), else none."""
    if not endpoint.startswith("tcp://"):
        return []
    port = endpoint.rsplit(":", 1)[-1]
    return [int(port)] if port.isdigit() else []


# --- Landlock ----------------------------------------------------------------

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_REG = 1 << 8
_FS_REFER = 1 << 13       # ABI 2
_FS_TRUNCATE = 1 << 14    # ABI 3
_FS_IOCTL_DEV = 1 << 15   # ABI 5
_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP = 1 << 0
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2

_READ = _FS_READ_FILE | _FS_READ_DIR
_WRITE = _READ | _FS_WRITE_FILE | _FS_REMOVE_FILE | _FS_MAKE_REG | _FS_REFER | _FS_TRUNCATE


def _landlock_fs_handled(abi: int) -> int:
    handled = _FS_ABI1
    if abi >= 2:
        handled |= _FS_REFER
    if abi >= 3:
        handled |= _FS_TRUNCATE
    if abi >= 5:
        handled |= _FS_IOCTL_DEV
    return handled


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def landlock(plan: Plan, abi: int) -> None:
    """Restrict this process (and what it starts) to the plan's files and ports."""
    fs = _landlock_fs_handled(abi)
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", fs, net, scoped) if abi >= 6 else \
        struct.pack("=QQ", fs, net) if abi >= 4 else struct.pack("=Q", fs)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(_libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), 0),
                     "landlock_create_ruleset")
    try:
        for paths, access in ((plan.reads, _READ), (plan.writes, _WRITE)):
            for path in dict.fromkeys(paths):
                _allow_path(ruleset, path, access & fs)
        for port in plan.tcp_ports:
            if net:
                rule = ctypes.create_string_buffer(struct.pack("=QQ", _NET_CONNECT_TCP, port), 16)
                _check(_libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _RULE_NET_PORT, rule, 0),
                       f"landlock_add_rule(port {port})")
        _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _allow_path(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return   # absent here (no /lib64 on this system, say): nothing to allow
    try:
        if not os.path.isdir(path):
            access &= _FS_FILE_ONLY   # folder rights on a file are refused (EINVAL)
        rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)   # packed struct
        _check(_libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule, 0),
               f"landlock_add_rule({path})")
    finally:
        os.close(fd)


# --- seccomp: the allowlist --------------------------------------------------

# Constants for argument rules (x86-64 and aarch64 agree on all of them).
CLONE_THREAD = 0x00010000
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME = 1, 2, 3, 15, 16
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
SCHED_OTHER = 0
PR_SET_VMA = 0x53564D41
TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIOCLEX = 0x5401, 0x5413, 0x541B, 0x5421, 0x5451

# Every system call a worker may make, by group, with why it needs them. A call on no
# list ends the process; so do execve, execveat, fork, vfork, ptrace, process_vm_readv and
# _writev, mount, umount2, pivot_root, chroot, unshare, setns, bpf, perf_event_open,
# keyctl, add_key, init_module, finit_module, kexec_load, io_uring_*, userfaultfd, ...
ALLOWLIST: dict[str, tuple[str, ...]] = {
    # Python, wasmtime and SQLite all allocate; wasmtime maps compiled code executable
    # (mprotect) and resets linear memories (madvise), and keeps copy-on-write images
    # of initial memory in memfds.
    "memory": ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync",
               "memfd_create", "membarrier",
               # CURVE (a remote host's workers, docs/cluster.md): libsodium locks its keys in memory.
               "mlock", "munlock"),
    # Threads: the epoch ticker, ZeroMQ's I/O thread, glibc's thread machinery. clone
    # itself is allowed below only with CLONE_THREAD (a thread, never a process).
    "threads": ("futex", "futex_waitv", "set_robust_list", "get_robust_list", "rseq", "set_tid_address",
                "gettid", "sched_yield", "sched_getaffinity", "sched_getparam", "sched_getscheduler", "exit", "exit_group", "restart_syscall"),
    # Signals: wasmtime turns traps in compiled code into SIGSEGV/SIGILL/SIGFPE handled
    # on an alternate stack; Python's signal module; glibc's abort() (tgkill of itself).
    "signals": ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "sigaltstack"),
    # Time: the epoch ticker sleeps, heartbeats and deadlines read clocks (mostly the vDSO).
    "time": ("clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time"),
    # Files: imports, the module cache, SQLite's database, WAL and shared-memory files
    # (locks through fcntl, fsync for durability, fchown/fchmod to keep the
    # database's owner and mode on a new WAL file). Landlock decides which files.
    "files": ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
              "pwritev2", "open", "openat", "openat2", "close", "close_range", "lseek", "fstat", "stat", "lstat",
              "newfstatat", "statx", "statfs", "fstatfs", "fcntl", "flock", "fsync", "fdatasync", "ftruncate",
              "fallocate", "unlink", "unlinkat", "rename", "renameat", "renameat2", "getdents64", "readlink",
              "readlinkat", "access", "faccessat", "faccessat2", "getcwd", "fchmod", "fchown", "umask", "dup",
              "dup2", "dup3", "pipe2"),
    # The link to the broker: ZeroMQ's sockets, wake-up eventfd and epoll. socket and
    # socketpair are allowed below for the plan's families only (AF_UNIX locally).
    "sockets": ("connect", "getsockopt", "setsockopt", "getsockname", "getpeername", "sendto", "recvfrom",
                "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown", "eventfd2", "epoll_create1",
                "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select",
                "pselect6"),
    # Who and where it is: ids for SQLite and logs, random numbers for hashing and
    # ZeroMQ, limits and usage for the RSS report, the kernel's name for platform.
    "identity": ("getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
                 "getgroups", "getrandom", "uname", "getrlimit", "getrusage", "sysinfo", "times",
                 "getpriority"),
}


def _rules(plan: Plan):
    """(syscall, argument comparisons) for the calls allowed with some arguments only."""
    from pyseccomp import EQ, MASKED_EQ, Arg
    pid = os.getpid()
    rules = [("clone", (Arg(0, MASKED_EQ, CLONE_THREAD, CLONE_THREAD),))]   # threads, never processes
    rules += [("socket", (Arg(0, EQ, family),)) for family in plan.families]
    rules += [("socketpair", (Arg(0, EQ, family),)) for family in plan.families]
    # Signals and limits for itself only (abort, a test's self-SIGKILL, resource limits).
    rules += [("kill", (Arg(0, EQ, pid),)), ("tgkill", (Arg(0, EQ, pid),)),
              ("prlimit64", (Arg(0, EQ, 0),)), ("prlimit64", (Arg(0, EQ, pid),))]
    # Thread names, the parent-death signal (set again after a change of credentials),
    # no new privileges (said again: it cannot be undone), naming anonymous memory (glibc).
    rules += [("prctl", (Arg(0, EQ, option),)) for option in
              (PR_SET_NAME, PR_GET_NAME, PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_VMA,
               PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS)]
    # ZeroMQ sets its I/O thread's policy (to the ordinary one unless told otherwise).
    rules += [("sched_setscheduler", (Arg(1, EQ, SCHED_OTHER),))]
    # ioctl: is it a terminal (Python's open), non-blocking and close-on-exec, bytes waiting.
    # Never TIOCSTI and the like: a confined worker types nothing into anyone's terminal.
    rules += [("ioctl", (Arg(1, EQ, request),)) for request in (TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIOCLEX)]
    if plan.become is not None:
        # Still root when confined (it loads the daemon's cache as root): it may drop to its
        # user once, to that uid and gid only, and never take any other id.
        uid, gid = plan.become
        rules += [("setgroups", (Arg(0, EQ, 0),)), ("setgid", (Arg(0, EQ, gid),)), ("setuid", (Arg(0, EQ, uid),)),
                  ("setresgid", (Arg(0, EQ, gid), Arg(1, EQ, gid), Arg(2, EQ, gid))),
                  ("setresuid", (Arg(0, EQ, uid), Arg(1, EQ, uid), Arg(2, EQ, uid)))]
    return rules


def seccomp(plan: Plan) -> None:
    """Load the allowlist as a seccomp filter on this thread and every thread it starts."""
    import pyseccomp as sc
    flt = sc.SyscallFilter(sc.KILL_PROCESS)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)   # x32 or i386 calls on x86-64: the same end
    flt.set_attr(sc.Attr.CTL_NNP, 1)   # the kernel logs every kill itself (audit type 1326)
    try:
        # A binary tree of syscall numbers, not a list walked top to bottom: the filter runs on
        # every system call (bench/run.py --confinement measures it).
        flt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    except OSError:
        pass   # libseccomp < 2.5: the list
    for calls in ALLOWLIST.values():
        for call in calls:
            try:
                flt.add_rule(sc.ALLOW, call)
            except (OSError, ValueError):
                pass   # no such call on this architecture (open on aarch64, say)
    for call, args in _rules(plan):
        flt.add_rule(sc.ALLOW, call, *args)
    # clone3 passes its flags in memory, where a filter cannot look: it fails with ENOSYS,
    # and glibc falls back to clone, whose flags the rule above checks.
    flt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    flt.load()


# --- the whole of it ---------------------------------------------------------

@dataclass
class Confinement:
    """What this process got: reported in the worker's READY and by `corral status`."""
    seccomp: bool = False
    landlock: int = 0                       # the ABI applied; 0: none
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"seccomp": self.seccomp, "landlock": self.landlock, "uid": os.getuid()}


def no_new_privileges() -> None:
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(code)}")


def confine(plan: Plan, mode: str) -> Confinement:
    """Confine this process for good. `require`: raise Refused if any layer cannot be had;
    `best-effort`: take what there is (`missing` says what not); `off`: only no new privileges."""
    assert mode in MODES, mode
    no_new_privileges()
    done = Confinement()
    if mode == "off":
        return done
    offer = offered()
    if mode == "require" and offer.missing():
        raise Refused("; ".join(offer.missing()))
    done.missing = offer.missing()
    if offer.landlock:
        try:
            landlock(plan, offer.landlock)
            done.landlock = offer.landlock
        except OSError as exc:
            if mode == "require":
                raise Refused(f"Landlock: {exc}") from None
            done.missing.append(f"Landlock: {exc}")
    if offer.seccomp:
        try:
            seccomp(plan)
            done.seccomp = True
        except OSError as exc:
            if mode == "require":
                raise Refused(f"seccomp: {exc}") from None
            done.missing.append(f"seccomp: {exc}")
    return done
