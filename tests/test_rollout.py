"""The rollout policy on its own: no sockets, no processes; workers are plain objects.

What it must hold: a reload replaces slots one at a time and never takes a
slot's serving worker away before its replacement is ready; scale and
restart change only the slots they name; a worker that dies mid-roll
neither stalls the roll nor lets a slot go unserved.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from corral.rollout import Rollout, Step


@dataclass(eq=False)
class Worker:
    slot: int
    generation: int
    ready: bool = False
    alive: bool = True


class Slots:
    """The pool as the policy sees it: each slot's current worker, plus the old ones still serving."""

    def __init__(self, count: int):
        self.current = {slot: Worker(slot, 1, ready=True) for slot in range(count)}
        self.old: dict[int, Worker] = {}     # a slot's old worker while its new one starts

    def spawn(self, slot: int) -> Worker:
        old = self.current.get(slot)
        if old is not None:
            self.old[slot] = old
        new = self.current[slot] = Worker(slot, (old.generation if old else 0) + 1)
        return new

    def serving(self, slot: int) -> bool:
        return any(w is not None and w.alive and w.ready for w in (self.current.get(slot), self.old.get(slot)))


def never_fresh(worker: Worker) -> bool:
    return False


def run_step(rollout: Rollout, slots: Slots) -> int | None:
    slot = rollout.next(slots.current, never_fresh)
    if slot is not None:
        slots.spawn(slot)
    return slot


def finish(rollout: Rollout, slots: Slots, slot: int) -> Step | None:
    slots.current[slot].ready = True
    step = rollout.ready(slot)
    if step is not None and step.old is not None:
        step.old.alive = False    # the daemon lets it go
        slots.old.pop(slot, None)
    return step


def test_a_reload_rolls_the_slots_one_by_one():
    slots, rollout = Slots(3), Rollout()
    originals = dict(slots.current)
    rollout.reload([0, 1, 2])
    order = []
    while True:
        slot = run_step(rollout, slots)
        if slot is None:
            break
        order.append(slot)
        # one step at a time: nothing more starts until this slot's new worker is ready
        assert rollout.next(slots.current, never_fresh) is None
        assert rollout.reload_over() is False
        starting = [s for s, w in slots.current.items() if not w.ready]
        assert starting == [slot]
        assert all(slots.serving(s) for s in range(3)), "a slot was left without a serving worker"
        step = finish(rollout, slots, slot)
        assert step == Step(slot, originals[slot])
    assert order == [0, 1, 2]
    assert rollout.reload_over() is True
    assert rollout.reload_over() is False     # said once
    assert all(w.generation == 2 for w in slots.current.values())


def test_never_more_than_one_slot_down_whatever_the_order_of_events():
    rng = random.Random(14)
    for _ in range(200):
        count = rng.randint(1, 6)
        slots, rollout = Slots(count), Rollout()
        rollout.reload(list(range(count)))
        run_step(rollout, slots)
        for _ in range(50):
            # a restart asked for while the reload goes on, or a step completing
            if rng.random() < 0.3:
                rollout.restart(rng.sample(range(count), rng.randint(1, count)))
                if rollout.step is None:
                    run_step(rollout, slots)
            elif rollout.step is not None:
                finish(rollout, slots, rollout.step.slot)
                run_step(rollout, slots)
            assert sum(1 for w in slots.current.values() if not w.ready) <= 1
            assert all(slots.serving(s) for s in range(count))
        while not rollout.idle:
            finish(rollout, slots, rollout.step.slot)
            run_step(rollout, slots)
        assert rollout.reload_over() is True


def test_restart_replaces_only_the_chosen_slots_each_once():
    slots, rollout = Slots(4), Rollout()
    rollout.restart([2, 0])
    rollout.restart([0])    # asked twice, replaced once
    done = []
    while (slot := run_step(rollout, slots)) is not None:
        finish(rollout, slots, slot)
        done.append(slot)
    assert done == [2, 0]
    assert [w.generation for _, w in sorted(slots.current.items())] == [2, 1, 2, 1]
    assert rollout.reload_over() is False     # a restart is no reload


def test_a_slot_already_starting_on_the_current_config_is_skipped():
    slots, rollout = Slots(2), Rollout()
    slots.current[0] = Worker(0, 5)   # spawned on the new config, not ready yet
    rollout.reload([0, 1])
    assert rollout.next(slots.current, lambda w: w.generation == 5) == 1


def test_scale_down_mid_roll_lets_the_steps_old_worker_go_and_forgets_its_queued_slots():
    slots, rollout = Slots(4), Rollout()
    rollout.reload([0, 1, 2, 3, 1000])
    run_step(rollout, slots)
    finish(rollout, slots, 0)
    assert run_step(rollout, slots) == 1
    old = slots.old[1]
    scaling = rollout.scale(4, 1)
    assert scaling.removed == range(1, 4)
    assert scaling.release is old       # slot 1's old worker leaves with its slot
    assert list(rollout.queue) == [1000]   # a standby slot is not a serving slot: still to roll
    assert run_step(rollout, slots) == 1000


def test_scale_up_mid_roll_removes_nothing_and_keeps_the_step():
    slots, rollout = Slots(2), Rollout()
    rollout.reload([0, 1])
    run_step(rollout, slots)
    scaling = rollout.scale(2, 5)
    assert list(scaling.removed) == [] and scaling.release is None
    assert rollout.step.slot == 0 and list(rollout.queue) == [1]


def test_a_new_worker_that_dies_mid_roll_is_waited_for_not_replaced_by_a_standby():
    slots, rollout = Slots(2), Rollout()
    rollout.reload([0, 1])
    run_step(rollout, slots)
    dead = slots.current[0]
    dead.alive = False
    rollout.gone(dead)
    # the old worker still serves slot 0; a ready standby promoted here would never send
    # the READY that ends the step, and the reload would never be over
    assert not rollout.may_promote(0)
    assert rollout.may_promote(1)
    assert rollout.next(slots.current, never_fresh) is None
    slots.current[0] = Worker(0, 3)   # the pool's respawn
    step = finish(rollout, slots, 0)
    assert step is not None and step.old is not None and step.old.generation == 1
    assert run_step(rollout, slots) == 1


def test_an_old_worker_that_dies_mid_roll_is_not_let_go_twice():
    slots, rollout = Slots(1), Rollout()
    rollout.reload([0])
    run_step(rollout, slots)
    old = slots.old[0]
    rollout.gone(old)
    assert finish(rollout, slots, 0) == Step(0, None)
    assert rollout.reload_over()


def test_stopping_replaces_nothing_more():
    slots, rollout = Slots(3), Rollout()
    rollout.restart([0, 1, 2])
    run_step(rollout, slots)
    rollout.stop()
    finish(rollout, slots, 0)
    rollout.restart([1])
    assert rollout.next(slots.current, never_fresh) is None


@pytest.mark.parametrize("slot", [0, 1000])
def test_a_dropped_slot_leaves_the_roll(slot):
    slots, rollout = Slots(1), Rollout()
    slots.current[1000] = Worker(1000, 1, ready=True)
    rollout.restart([slot])
    run_step(rollout, slots)
    assert rollout.drop(slot) is slots.old[slot]
    assert rollout.idle
