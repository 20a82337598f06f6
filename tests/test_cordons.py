"""Cordons (docs/confinement.md), looked at from outside: the real daemon, started as root,
with two cordons whose users this module makes (and removes at the end).

Apps of different cordons never share a worker process or a state directory; each
cordon's workers run as its user; one cordon's user cannot read another's state file;
a request goes only to its app's cordon; scale and reload work per cordon; an escaped
guest's open of another cordon's state file fails (Landlock), and the daemon serves on.
"""

from __future__ import annotations

import errno
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import GUESTS, Daemon
from test_confinement import inject, injector  # noqa: F401  (the fixture: gcc builds tests/injector.c)
from test_state import KV_OPS, put

USERS = ("corral-t-a", "corral-t-b")
ADD = b'{"call": "add", "args": [1, 2]}'   # calc, a plain module
SYS_OPENAT, AT_FDCWD = 257, -100

as_root = pytest.mark.skipif(os.getuid() != 0, reason="cordons' users need a daemon started as root")


@pytest.fixture(scope="module")
def users():
    if os.getuid() != 0:
        pytest.fail("cordons' users need root (useradd, and a daemon started as root)")
    """Two system users, one per cordon, removed afterwards: name -> (uid, gid)."""
    made = []
    try:
        for name in USERS:
            subprocess.run(["userdel", name], capture_output=True)   # a leftover of an interrupted run
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", name], check=True, capture_output=True)
            made.append(name)
        yield {name: (pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid) for name in USERS}
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=True, capture_output=True)


@pytest.fixture
def start(cache_dir):
    started: list[Daemon] = []

    def start(apps: dict, cordons: dict, **supervisor) -> Daemon:
        daemon = Daemon(apps, cache_dir, supervisor={"workers": 1, **supervisor}, extra={"cordons": cordons})
        os.chmod(daemon.root, 0o711)   # mkdtemp's 0700 would keep the cordons' users from the sockets
        started.append(daemon)
        return daemon.start(timeout=60)

    yield start
    leftovers = {str(d.root): killed for d in started if (killed := d.cleanup())}
    assert not leftovers, f"processes left behind after the daemon stopped: {leftovers}"


def two_cordons(users=True) -> tuple[dict, dict]:
    apps = {"echo": {"module": GUESTS / "echo.wat", "cordon": "a"},
            "kv": {"module": KV_OPS, "cordon": "a"},
            "calc": {"module": GUESTS / "calc.wat", "cordon": "b"},
            "kv2": {"module": KV_OPS, "cordon": "b"},
            "counter": {"module": GUESTS / "counter.wat", "instances": "keyed"}}   # the default cordon
    cordons = {"a": {"workers": 2}, "b": {"workers": 1}}
    if users:
        cordons["a"]["user"], cordons["b"]["user"] = USERS
    return apps, cordons


def by_cordon(status: dict) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for worker in status["workers"]:
        if worker["state"] == "ready":
            found.setdefault(worker["cordon"], []).append(worker)
    return found


def proc_ids(pid: int) -> tuple[set[int], set[int]]:
    """(uids, gids) of a live process: real, effective, saved and filesystem."""
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    return set(map(int, fields["Uid"].split())), set(map(int, fields["Gid"].split()))


def corral(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral", *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def as_user(ids: tuple[int, int], *command) -> subprocess.CompletedProcess:
    uid, gid = ids
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *map(str, command)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(120)
@as_root
def test_each_cordon_has_its_own_workers_running_as_its_own_user(start, users):
    apps, cordons = two_cordons()
    daemon = start(apps, cordons)
    workers = by_cordon(daemon.status())
    assert {name: len(found) for name, found in workers.items()} == {"default": 1, "a": 2, "b": 1}
    pids = {name: {w["pid"] for w in found} for name, found in workers.items()}
    assert not (pids["a"] & pids["b"]) and not (pids["a"] & pids["default"]) and not (pids["b"] & pids["default"])
    for name, user in (("a", USERS[0]), ("b", USERS[1]), ("default", None)):
        uid, gid = users[user] if user else (0, 0)
        for worker in workers[name]:
            assert proc_ids(worker["pid"]) == ({uid}, {gid}), (name, worker)
            assert worker["uid"] == uid and worker["seccomp"] is True and worker["landlock"] >= 1
    table = corral("status", "-c", daemon.config_path)
    assert table.returncode == 0 and "cordon" in table.stdout, table.stderr
    assert all(f" {name} " in table.stdout for name in ("a", "b", "default")), table.stdout


@pytest.mark.timeout(120)
@as_root
def test_a_request_goes_only_to_its_cordons_workers(start, users):
    apps, cordons = two_cordons()
    daemon = start(apps, cordons)
    for _ in range(20):
        assert daemon.call("echo", b"to a").body == b"to a"
    served = {name: sum(w["requests"] for w in found) for name, found in by_cordon(daemon.status()).items()}
    assert served == {"a": 20, "b": 0, "default": 0}, served
    for _ in range(10):
        assert daemon.call("calc", ADD).status == 200
    served = {name: sum(w["requests"] for w in found) for name, found in by_cordon(daemon.status()).items()}
    assert served == {"a": 20, "b": 10, "default": 0}, served


@pytest.mark.timeout(120)
@as_root
def test_each_cordons_state_is_its_users_alone(start, users):
    apps, cordons = two_cordons()
    daemon = start(apps, cordons)
    assert daemon.call("kv", put(b"secret", b"of a")).status == 200
    assert daemon.call("kv2", put(b"secret", b"of b")).status == 200
    root = daemon.root / "state"
    assert root.stat().st_mode & 0o777 == 0o711 and root.stat().st_uid == 0
    for cordon, service, user in (("a", "kv", USERS[0]), ("b", "kv2", USERS[1])):
        folder, file = root / cordon, root / cordon / f"{service}.sqlite3"
        assert (folder.stat().st_mode & 0o777, folder.stat().st_uid) == (0o700, users[user][0])
        assert (file.stat().st_mode & 0o777, file.stat().st_uid) == (0o600, users[user][0])
    a_file, b_file = root / "a" / "kv.sqlite3", root / "b" / "kv2.sqlite3"
    assert as_user(users[USERS[0]], "head", "-c", "16", a_file).returncode == 0   # its own: readable
    for ids, other in ((users[USERS[1]], a_file), (users[USERS[0]], b_file)):
        refused = as_user(ids, "head", "-c", "16", other)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused


@pytest.mark.timeout(120)
@as_root
def test_scale_one_cordon_and_the_default_one(start, users):
    apps, cordons = two_cordons()
    daemon = start(apps, cordons)
    done = corral("scale", "b", 3, "-c", daemon.config_path)
    assert done.returncode == 0 and "scaling to 3 workers in cordon b" in done.stdout, done
    count = lambda: {name: len(found) for name, found in by_cordon(daemon.status()).items()}   # noqa: E731
    daemon.wait_for(lambda: count() == {"default": 1, "a": 2, "b": 3}, timeout=30, what="three workers in b")
    for worker in by_cordon(daemon.status())["b"]:
        assert proc_ids(worker["pid"])[0] == {users[USERS[1]][0]}
    assert corral("scale", 2, "-c", daemon.config_path).returncode == 0
    assert corral("scale", "a", 1, "-c", daemon.config_path).returncode == 0
    daemon.wait_for(lambda: count() == {"default": 2, "a": 1, "b": 3} and
                    len(daemon.status()["workers"]) == 6, timeout=30, what="2, 1 and 3 workers")
    wrong = corral("scale", "c", 1, "-c", daemon.config_path)
    assert wrong.returncode == 1 and "no cordon 'c'" in wrong.stderr, wrong
    for _ in range(6):
        assert daemon.call("calc", ADD).status == 200
        assert daemon.call("echo", b"x").status == 200


@pytest.mark.timeout(150)
@as_root
def test_a_reload_moves_an_app_to_another_cordon(start, users):
    apps, cordons = two_cordons()
    del apps["kv"]
    daemon = start(apps, cordons)
    old_a = {w["pid"] for w in by_cordon(daemon.status())["a"]}
    daemon.doc["apps"]["echo"]["cordon"] = "b"   # cordon a is named by no app now: it spawns no workers
    daemon.write_config()
    done = corral("reload", "-c", daemon.config_path)
    assert done.returncode == 0, done
    daemon.wait_for(lambda: "a" not in by_cordon(daemon.status()) and
                    not old_a & {w["pid"] for w in daemon.status()["workers"]}, timeout=30,
                    what="cordon a's workers gone")
    before = {w["pid"]: w["requests"] for w in by_cordon(daemon.status())["b"]}
    for _ in range(10):
        assert daemon.call("echo", b"moved").body == b"moved"
    after = by_cordon(daemon.status())
    assert sum(w["requests"] for w in after["b"]) - sum(before.values()) == 10
    assert sum(w["requests"] for w in after["default"]) == 0
    for worker in after["b"]:
        assert proc_ids(worker["pid"])[0] == {users[USERS[1]][0]}


def test_cordons_take_their_settings_from_supervisor_where_unset(tmp_path):
    from corral.config import ConfigError, cordons, parse
    doc = {"supervisor": {"workers": 3, "user": "nobody"},
           "cordons": {"a": {"workers": 1, "user": "root"}, "b": {}, "unused": {"workers": 2}},
           "apps": {"x": {"module": str(GUESTS / "echo.wat"), "cordon": "a"},
                    "y": {"module": str(GUESTS / "echo.wat"), "cordon": "b"}}}
    found = cordons(parse(doc, tmp_path / "c.toml"))
    assert [(c.name, c.workers, c.user, c.group) for c in found.values()] == [("a", 1, "root", ""),
                                                                             ("b", 3, "nobody", "")]
    for bad, problem in (({"default": {"workers": 1}}, "[cordons.default]: the default cordon is set in [supervisor]"),
                         ({"Bad Name": {}}, "[cordons.Bad Name]: cordon names are"),
                         ({"a": {"workers": 0}}, "[cordons.a] workers: must be between 1 and 256"),
                         ({"a": {"user": "no-such-user-here"}}, "[cordons.a] user: no such user")):
        with pytest.raises(ConfigError) as raised:
            parse({**doc, "cordons": {**bad, "a": bad.get("a", {}), "b": {}}}, tmp_path / "c.toml")
        assert any(problem in p for p in raised.value.problems), raised.value.problems


def test_each_cordon_keeps_its_block_of_slots_across_reloads():
    from corral.config import CordonSettings
    from corral.cordons import SlotPlan
    plan = SlotPlan()
    placed = plan.place({"default": CordonSettings("default", 2), "b": CordonSettings("b", 3)})
    assert [(c.name, list(c.slots)) for c in placed] == [("default", [0, 1]), ("b", [2000, 2001, 2002])]
    placed = plan.place({"a": CordonSettings("a", 1), "b": CordonSettings("b", 1)})   # a reload: a is new
    assert [(c.name, list(c.slots)) for c in placed] == [("a", [3000]), ("b", [2000])]
    assert [plan.cordon_of(s) for s in (0, 1000, 1015, 2000, 2999, 3000)] == \
        ["default", "default", "default", "b", "b", "a"]


@pytest.mark.timeout(120)
def test_a_config_naming_an_unknown_cordon_or_key_is_refused(tmp_path):
    config = tmp_path / "corral.toml"
    config.write_text(f'[cordons.a]\nworkers = 1\nthreads = 2\n[apps.echo]\nmodule = "{GUESTS / "echo.wat"}"\n'
                      f'cordon = "nowhere"\n')
    done = corral("check", "-c", config)
    assert done.returncode == 78
    assert f"{config}: [cordons.a] threads: unknown key" in done.stderr, done.stderr
    assert f"{config}: [apps.echo] cordon: no cordon 'nowhere'" in done.stderr, done.stderr


# --- a simulated escape into another cordon's files ----------------------------------------

@pytest.mark.parametrize("users_of_their_own", [False, True])
@pytest.mark.timeout(120)
@as_root
def test_an_escaped_guest_cannot_open_another_cordons_state_file(start, users, injector,  # noqa: F811
                                                                  users_of_their_own):
    """Without users of their own, the cordons' workers all run as root: Landlock alone keeps
    one from the other's files (the control below shows root could open it otherwise)."""
    apps, cordons = two_cordons(users=users_of_their_own)
    daemon = start(apps, cordons)
    assert daemon.call("kv", put(b"secret", b"of a")).status == 200
    a_file = daemon.root / "state" / "a" / "kv.sqlite3"
    [b_pid] = [w["pid"] for w in by_cordon(daemon.status())["b"]]
    for flags in (os.O_RDONLY, os.O_RDWR):
        assert inject(injector, b_pid, SYS_OPENAT, AT_FDCWD, f"s:{a_file}", flags) == ("result", -errno.EACCES)
    assert b_pid in daemon.worker_pids()   # refused, not killed: it serves on
    assert daemon.call("calc", ADD).status == 200 and daemon.call("kv2", put(b"k", b"v")).status == 200
    assert daemon.call("echo", b"a serves on").body == b"a serves on"


@pytest.mark.timeout(120)
@as_root
def test_the_same_open_goes_through_when_confinement_is_off(start, users, injector):  # noqa: F811
    """The control for the test above: a worker of cordon b, as root and unconfined, opens a's file."""
    apps, cordons = two_cordons(users=False)
    daemon = start(apps, cordons, confinement="off")
    assert daemon.call("kv", put(b"secret", b"of a")).status == 200
    a_file = daemon.root / "state" / "a" / "kv.sqlite3"
    [b_pid] = [w["pid"] for w in by_cordon(daemon.status())["b"]]
    word, fd = inject(injector, b_pid, SYS_OPENAT, AT_FDCWD, f"s:{a_file}", os.O_RDONLY)
    assert word == "result" and fd >= 0
    assert inject(injector, b_pid, 3, fd) == ("result", 0)   # close
