"""Rollout: the order in which a reload, a restart or a scale replaces workers.

A plain object that holds no process and no socket: the daemon tells it
what happened (a slot's new worker is ready, a worker is gone, the worker
count changed, the daemon is stopping) and asks it what to do next (which
slot to spawn a replacement for, which old worker may now leave, whether a
standby may be promoted, whether the reload is over). The daemon carries
it out.

One slot at a time: a slot's new worker is started while its old one still
serves, and the old one is let go only once the new one is ready. So a
roll never takes more than one slot's worth of capacity away (the starting
worker's CPU), and never leaves a slot without a worker that serves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, Mapping, TypeVar

W = TypeVar("W")   # a worker, opaque here: the pool's WorkerProcess in the daemon


@dataclass(frozen=True)
class Step(Generic[W]):
    """One slot being replaced: its new worker starts, `old` serves until it is ready."""
    slot: int
    old: W | None


@dataclass(frozen=True)
class Scaling(Generic[W]):
    removed: range           # slots that no longer serve: their workers leave
    release: W | None        # the old worker of a step whose slot was removed


class Rollout(Generic[W]):
    def __init__(self) -> None:
        self.queue: deque[int] = deque()   # slots still to replace, in order
        self.step: Step[W] | None = None
        self.reloading = False
        self.stopped = False

    # --- what is asked for --------------------------------------------------

    def restart(self, slots: list[int]) -> None:
        """Replace these slots' workers, one after the other, after those already asked for."""
        self.queue.extend(s for s in slots if s not in self.queue)

    def reload(self, slots: list[int]) -> None:
        """Replace every slot's worker for a new config; reload_over() says when it is."""
        self.reloading = True
        self.restart(slots)

    def scale(self, before: int, after: int, base: int = 0) -> Scaling[W]:
        """From `before` serving slots to `after` (a cordon's, from slot `base`: docs/confinement.md):
        the slots that go, and what of the step goes with them."""
        removed = range(base + after, base + before)
        self.queue = deque(s for s in self.queue if s not in removed)
        release = None
        if self.step is not None and self.step.slot in removed:
            release, self.step = self.step.old, None
        return Scaling(removed, release)

    def drop(self, slot: int) -> W | None:
        """A slot that is no longer wanted (a standby slot a reload removed): the old worker of its step."""
        return self.scale(slot + 1, slot).release

    def stop(self) -> None:
        """The daemon is stopping: replace nothing more."""
        self.stopped = True
        self.queue.clear()

    # --- what happened ------------------------------------------------------

    def ready(self, slot: int) -> Step[W] | None:
        """The slot's new worker is ready: the step is over (its old worker, if any, may leave)."""
        if self.step is None or self.step.slot != slot:
            return None
        step, self.step = self.step, None
        return step

    def gone(self, worker: W) -> None:
        """A worker exited or was killed: a step's old worker that is gone is no longer to let go."""
        if self.step is not None and self.step.old is worker:
            self.step = Step(self.step.slot, None)

    # --- what to do next ----------------------------------------------------

    def next(self, workers: Mapping[int, W | None], fresh: Callable[[W], bool]) -> int | None:
        """The slot to spawn a new worker for now, or None (a step is under way, or nothing is left).

        `workers` are the slots' current workers; a slot whose worker is `fresh` (already
        starting on the current config) is skipped."""
        while self.queue and self.step is None and not self.stopped:
            slot = self.queue.popleft()
            old = workers.get(slot)
            if old is not None and fresh(old):
                continue
            self.step = Step(slot, old)
            return slot
        return None

    def may_promote(self, slot: int) -> bool:
        """Whether a standby may take a vacated slot. Not mid-step: the slot's old worker still
        serves, and the step ends only when a worker started for it is ready."""
        return self.step is None or self.step.slot != slot

    @property
    def idle(self) -> bool:
        return self.step is None and not self.queue

    def reload_over(self) -> bool:
        """True once, when a reload has replaced every slot it was asked to."""
        if self.reloading and self.idle:
            self.reloading = False
            return True
        return False
