"""Cordons (docs/confinement.md): apps that share worker processes, a user, a module
cache and a state directory with each other, and with no other cordon.

Plain objects and path rules, no process and no socket: the daemon asks them which
slots a cordon's workers fill, which cordon a slot belongs to, and where a cordon's
cache, state and backend socket are.

Slots: the default cordon keeps slots 0.. (and the standby slots, pool.STANDBY_BASE..);
every other cordon gets a block of CORDON_STRIDE slots of its own, from 2 * CORDON_STRIDE
on, given the first time the cordon is seen and kept for the daemon's life, so a worker's
routing id (w<slot>.<generation>) never names another cordon's slot after a reload.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from corral.config import DEFAULT_CORDON, CordonSettings

CORDON_STRIDE = 1000   # more than [cordons.NAME] workers may ask for (256); standbys are 1000..1015


@dataclass(frozen=True)
class Cordon:
    name: str
    workers: int
    user: str
    group: str
    base: int            # its first slot

    @property
    def slots(self) -> range:
        return range(self.base, self.base + self.workers)


class SlotPlan:
    """Which slots each cordon's workers fill; stable for the daemon's life."""

    def __init__(self) -> None:
        self.bases: dict[str, int] = {DEFAULT_CORDON: 0}

    def place(self, settings: dict[str, CordonSettings]) -> list[Cordon]:
        """The cordons in use (config.cordons()), each with its slots."""
        placed = []
        for name, cordon in settings.items():
            if name not in self.bases:
                self.bases[name] = CORDON_STRIDE * (len(self.bases) + 1)
            placed.append(Cordon(name, cordon.workers, cordon.user, cordon.group, self.bases[name]))
        return placed

    def cordon_of(self, slot: int) -> str:
        """The cordon a slot belongs to (standby slots are the default cordon's)."""
        block = slot // CORDON_STRIDE * CORDON_STRIDE
        for name, base in self.bases.items():
            if base == block and name != DEFAULT_CORDON:
                return name
        return DEFAULT_CORDON


def cache_dir(cache: Path, cordon: str) -> Path:
    """A cordon's compiled modules: never another cordon's (a worker may write its own cache)."""
    return cache / "cordons" / cordon


def state_dir(state: Path, cordon: str) -> Path:
    """A cordon's sqlite files: state_dir/CORDON, 0700, its user's (docs/state.md)."""
    return state / cordon


def backend_socket(run_dir: Path, cordon: str, separate: bool) -> Path:
    """The ipc file a cordon's workers connect to. With users of their own (`separate`), each
    cordon has its own file, owned by its user, 0600: no cordon's user can connect to, or
    replace, another's (the broker binds its one backend socket to every such file)."""
    if not separate or cordon == DEFAULT_CORDON:
        return run_dir / "workers.sock"
    return run_dir / f"workers.{cordon}.sock"


def adopt_state_file(state: Path, cordon: str, service: str, known: list[str]) -> str | None:
    """Move a service's sqlite files into its cordon's directory when they are elsewhere: in
    state_dir itself (before cordons) or in another cordon's directory (its app moved; only
    at start-up, when no worker holds them). Returns where they came from, or None."""
    target = state_dir(state, cordon)
    name = f"{service}.sqlite3"
    if (target / name).exists():
        return None
    for folder in [state] + [state_dir(state, other) for other in known if other != cordon]:
        if (folder / name).is_file():
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):
                if (folder / (name + suffix)).exists():
                    os.rename(folder / (name + suffix), target / (name + suffix))
            return str(folder)
    return None


def own(folder: Path, service: str, ids: tuple[int, int] | None) -> None:
    """A cordon's state directory and a service's files in it: 0700/0600, and its user's
    when started as root (`ids`)."""
    items = [folder] + sorted(folder.glob(f"{service}.sqlite3*"))
    for item in items:
        if ids is not None:
            os.chown(item, *ids)
        os.chmod(item, 0o700 if item == folder else 0o600)
