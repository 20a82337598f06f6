"""The arbiter's reload and compile, through the real daemon (and one unit check of compile).

Each test here was written against a defect of issue 20 and failed before its fix.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from harness import GUESTS
from test_security import curve_daemon, make_keys  # noqa: F401 (curve_daemon: a fixture)

from corral import config as config_module
from corral import daemon as daemon_module
from corral.config import to_toml


@pytest.mark.timeout(90)
def test_a_reload_from_two_to_three_workers_starts_the_new_slot_once(start_daemon):
    """The new slot's worker runs the new config from the start: the roll leaves it alone
    (it was replaced by a second one once it was ready before the roll reached it)."""
    daemon = start_daemon({"echo": {"module": GUESTS / "echo.wat"}}, supervisor={"workers": 2})
    daemon.doc["supervisor"]["workers"] = 3
    daemon.write_config()
    answer = daemon.control_request("reload", timeout=60)
    assert answer["ok"] is True, answer
    spawned = [e["worker"] for e in daemon.events("worker.spawned")]
    assert [w for w in spawned if w.startswith("w2.")] == ["w2.1"], spawned
    assert sorted(spawned) == ["w0.1", "w0.2", "w1.1", "w1.2", "w2.1"], spawned
    assert daemon.call("echo", b"three").body == b"three"


@pytest.mark.timeout(90)
def test_reload_warns_about_what_check_warns_about(curve_daemon):  # noqa: F811
    """An `allow` entry with no key file: `corral check` says so, and so must the reload's answer."""
    (curve_daemon.keys / "clients" / "bob.key").unlink()   # calc allows bob
    config = config_module.with_defaults(config_module.load(curve_daemon.config_path))
    expected = config_module.warnings(config)
    assert [w for w in expected if "allow: no key 'bob'" in w], expected
    answer = curve_daemon.control_request("reload", timeout=60)
    assert answer["ok"] is True and answer.get("warnings") == expected, answer
    assert [e for e in curve_daemon.events("config.warning") if "no key 'bob'" in e["problem"]]


def test_compile_keeps_nothing_on_the_daemon(tmp_path, monkeypatch):
    """compile() runs on the loop's thread at start and on the reload thread: what it needs
    travels as arguments, never through attributes another thread may be setting."""
    module = tmp_path / "kv.wat"
    module.write_text("(module)")
    path = tmp_path / "corral.toml"
    path.write_text(to_toml({"supervisor": {"cache_dir": str(tmp_path / "cache"), "state_dir": str(tmp_path / "state")},
                             "apps": {"kv": {"module": str(module)}}}))
    config = config_module.with_defaults(config_module.load(path))
    monkeypatch.setattr(daemon_module, "run_check",
                        lambda request: [{"name": "kv", "artifact": "x", "uses_state": True}])
    daemon = daemon_module.Daemon(path)
    daemon.cache_dir = tmp_path / "cache"
    before = dict(vars(daemon))
    problems = []
    thread = threading.Thread(target=lambda: problems.append(daemon.compile(config, mode="check")))
    thread.start()
    thread.join(30)
    assert problems and problems[0][0].artifact == "x"
    assert vars(daemon) == before
    assert not Path(tmp_path / "state").exists()   # "check" makes nothing


def test_every_annotation_of_the_daemon_names_something_it_imports():
    import inspect
    import typing
    functions = [f for _, f in inspect.getmembers(daemon_module.Daemon, inspect.isfunction)]
    functions += [f for _, f in inspect.getmembers(daemon_module, inspect.isfunction)
                  if f.__module__ == daemon_module.__name__]
    for function in functions:
        typing.get_type_hints(function)   # NameError for a name the module never imported
