"""The control verbs, one function each (circus's commands): what the control endpoint does.

Each verb takes the Arbiter (the few things the daemon lets a verb ask for,
not the daemon itself) and the request's JSON arguments and returns its
reply (a dict with "ok"), or None when the reply comes later (a reload is
answered when it is over). Its docstring's first line is the CLI's help;
the rest gives the message on the control socket (a REQ client sends
[verb, json arguments]) and the command line that sends it.

Arguments are checked here, with a sentence that says what was expected,
before the arbiter is asked for anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MAX_WORKERS = 256


@dataclass(frozen=True)
class Arbiter:
    """What a verb may ask of the daemon, and nothing else (the daemon makes one of its methods)."""
    status: Callable[[], dict]                 # the status JSON (corral.snapshot)
    slots: Callable[[], list[int]]             # the slots that exist, standbys included
    scale: Callable[[int, str], dict]          # workers, cordon
    restart: Callable[[list[int]], dict]
    reload: Callable[[], "dict | None"]        # None: answered when the reload is over


Verb = Callable[[Arbiter, dict], "dict | None"]


def status(arbiter: Arbiter, args: dict) -> dict:
    """workers, services and counters

    message:  status {}
    command:  corral status [--json]
    reply:    {"ok": true, "pid": ..., "workers": [...], "services": [...], ...} (corral.snapshot)
    """
    return {"ok": True, **arbiter.status()}


def scale(arbiter: Arbiter, args: dict) -> dict:
    """set the number of workers (of the default cordon, or of one cordon)

    message:  scale {"workers": N}  or  scale {"workers": N, "cordon": "NAME"}
    command:  corral scale N  or  corral scale CORDON N
    reply:    {"ok": true, "workers": N, "cordon": "NAME"}
    """
    workers = args.get("workers")
    if type(workers) is not int or not 1 <= workers <= MAX_WORKERS:
        return {"ok": False, "error": f"scale needs workers: an integer from 1 to {MAX_WORKERS}"}
    cordon = args.get("cordon", "default")
    if not isinstance(cordon, str) or not cordon:
        return {"ok": False, "error": f"scale's cordon is a cordon's name (a string), not {cordon!r}"}
    return arbiter.scale(workers, cordon)


def restart(arbiter: Arbiter, args: dict) -> dict:
    """replace workers gracefully, one at a time

    message:  restart {"slots": [S, ...]}     (no slots: every slot)
    command:  corral restart [S ...]
    reply:    {"ok": true, "restarting": [S, ...]}
    """
    every = sorted(arbiter.slots())
    slots = args.get("slots")
    if slots is None:
        slots = every
    if not isinstance(slots, list):
        return {"ok": False, "error": f"restart takes a list of slots, not {slots!r}"}
    wrong = [s for s in slots if s not in every]
    if wrong:
        there = f"the worker is in slot {every[0]}" if len(every) == 1 else \
            f"the workers are in slots {', '.join(map(str, every))}"
        return {"ok": False, "error": f"no worker in slot {', '.join(map(repr, wrong))}; {there}"}
    return arbiter.restart(slots)


def reload(arbiter: Arbiter, args: dict) -> dict | None:
    """reload the config (as SIGHUP does) and wait until every worker serves it

    message:  reload {}
    command:  corral reload [--timeout S]
    reply:    when every worker serves the new config: {"ok": true, "config_generation": G,
              "warnings": [...]}; or {"ok": false, "problems": [...]}, nothing changed
    """
    return arbiter.reload()


VERBS: dict[str, Verb] = {verb.__name__: verb for verb in (status, scale, restart, reload)}


def summary(name: str) -> str:
    """The verb's one line of help."""
    return (VERBS[name].__doc__ or "").strip().splitlines()[0]


def usage(name: str) -> str:
    """The verb's message and command, as its docstring gives them."""
    lines = (VERBS[name].__doc__ or "").strip().splitlines()[1:]
    return "\n".join(line.strip() for line in lines if line.strip())
