"""The control verbs on their own: no sockets, no processes; the daemon is a recorder.

Each verb checks its arguments and tells the daemon what to do; control
finds it by name; its docstring is its documentation (message and command)
and the CLI's help.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from corral import verbs
from corral.control import Control


class Recorder:
    def __init__(self, slots=(0, 1, 1000)):
        self.every = list(slots)
        self.calls: list[tuple] = []

    def status(self):
        self.calls.append(("status",))
        return {"pid": 1}

    def scale(self, workers, cordon):
        self.calls.append(("scale", workers) if cordon == "default" else ("scale", workers, cordon))
        return {"ok": True, "workers": workers}

    def slots(self):
        return self.every

    def restart(self, slots):
        self.calls.append(("restart", slots))
        return {"ok": True, "restarting": slots}

    def reload(self):
        self.calls.append(("reload",))
        return None


def handle(daemon, *frames: bytes):
    return Control.handle(SimpleNamespace(arbiter=daemon), list(frames))


@pytest.mark.parametrize("name", sorted(verbs.VERBS))
def test_each_verb_documents_its_message_and_command(name):
    usage = verbs.usage(name)
    assert f"message:  {name} " in usage
    assert f"command:  corral {name}" in usage
    assert verbs.summary(name) and "\n" not in verbs.summary(name)


def test_control_finds_the_verb_by_name():
    daemon = Recorder()
    assert handle(daemon, b"status") == {"ok": True, "pid": 1}
    assert handle(daemon, b"scale", json.dumps({"workers": 3}).encode()) == {"ok": True, "workers": 3}
    assert handle(daemon, b"reload", b"{}") is None      # answered when the reload is over
    assert daemon.calls == [("status",), ("scale", 3), ("reload",)]


def test_an_unknown_verb_or_arguments_that_are_no_object_are_refused_with_what_is_known():
    daemon = Recorder()
    unknown = handle(daemon, b"explode")
    assert unknown["ok"] is False and "status, scale, restart, reload" in unknown["error"]
    assert handle(daemon, b"scale", b"[3]") == {"ok": False, "error": "arguments must be a JSON object"}
    assert handle(daemon, b"scale", b"{nope") == {"ok": False, "error": "arguments must be a JSON object"}
    assert daemon.calls == []


@pytest.mark.parametrize("workers", [0, 257, "3", 2.0, True, None])
def test_scale_refuses_what_is_not_a_worker_count(workers):
    daemon = Recorder()
    reply = verbs.scale(daemon, {"workers": workers})
    assert reply == {"ok": False, "error": "scale needs workers: an integer from 1 to 256"}
    assert daemon.calls == []


def test_scale_takes_a_cordon_by_name_and_the_default_cordon_without_one():
    daemon = Recorder()
    assert verbs.scale(daemon, {"workers": 2, "cordon": "billing"}) == {"ok": True, "workers": 2}
    assert verbs.scale(daemon, {"workers": 3}) == {"ok": True, "workers": 3}
    for wrong in ("", 3, None, ["billing"]):
        assert verbs.scale(daemon, {"workers": 2, "cordon": wrong}) == {
            "ok": False, "error": f"scale's cordon is a cordon's name (a string), not {wrong!r}"}
    assert daemon.calls == [("scale", 2, "billing"), ("scale", 3)]


def test_restart_takes_every_slot_by_default_and_only_slots_that_exist():
    daemon = Recorder()
    assert verbs.restart(daemon, {}) == {"ok": True, "restarting": [0, 1, 1000]}
    assert verbs.restart(daemon, {"slots": [1]}) == {"ok": True, "restarting": [1]}
    for wrong, error in (([7], "no worker in slot 7; the workers are in slots 0, 1, 1000"),
                         ("1", "restart takes a list of slots, not '1'"),
                         ([0, "1"], "no worker in slot '1'; the workers are in slots 0, 1, 1000")):
        assert verbs.restart(daemon, {"slots": wrong}) == {"ok": False, "error": error}
    assert daemon.calls == [("restart", [0, 1, 1000]), ("restart", [1])]


def test_the_cli_help_of_each_admin_verb_comes_from_its_docstring():
    top = subprocess.run([sys.executable, "-m", "corral", "--help"], capture_output=True, text=True, timeout=30)
    assert " ".join(top.stdout.split()).count(verbs.summary("reload")) == 1
    for name in verbs.VERBS:
        done = subprocess.run([sys.executable, "-m", "corral", name, "--help"], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0
        assert verbs.usage(name).splitlines()[0] in done.stdout
