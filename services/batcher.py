"""``StepBatcher``: Step calls of many sessions computed together, one world-model call and one engine call.

    batcher = StepBatcher(max_wait_s=0.002)
    result = batcher.step(sim, actions, hold)       # in place of sim.step(actions, hold), from any thread

Each caller checks its actions and prepares its rows (``CorrectedSimulator.begin``) in its own thread.
The first caller to find no batch forming leads: it waits until every simulator that stepped within
the last ``ACTIVE_S`` (at least ten waits), is not being computed and is not late has a step queued, or
until ``max_wait_s`` passed, then computes the queue. A simulator a batch waited for in vain is late: no
batch waits for it (so one client stepping two sessions in turn pays the wait about once per session, not on
every step) until it joins a batch another caller leads, its step arrives while another batch is computed
(its client is not waiting on that batch), or ``LATE_WAITS`` waits have passed. The queue's rows go: the world-model
rows of all simulators sharing a world model in one ``step``, the engine rows of all simulators whose engine is the same model
(``ROW_INDEPENDENT_ENGINES``) in one ``step_vectors``. Callers finish their own steps (``combine`` +
``finish``), so grading and recording stay per session. Every merged row's result depends on that row
alone (MuJoCo steps each env on its own; a world model's rows are merged only where
``WorldModel.rows_independent`` holds, else each simulator's are computed in a call of their own), so a
coalesced step gives each simulator the bits it would get stepping alone.

A JAX engine compiles per batch shape, so its rows are never merged with another simulator's; a
simulator that blends on a GPU (``device_blend``) steps alone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

ROW_INDEPENDENT_ENGINES = frozenset({"mujoco"})   # engines whose rows of one model may share a call
ACTIVE_S = 1.0                                     # a simulator counts as active this long after its last step
LATE_WAITS = 50                                    # a late simulator is waited for again after this many waits
log = logging.getLogger(__name__)


@dataclass
class _Ticket:
    sim: object
    pending: object
    done: threading.Event = field(default_factory=threading.Event)
    wm_out: np.ndarray | None = None
    engine_out: np.ndarray | None = None
    error: BaseException | None = None


@dataclass
class BatcherStats:
    """Counts since the batcher started: steps queued, batches computed, world-model and engine calls, waits
    that ran out."""

    steps: int = 0
    batches: int = 0
    wm_calls: int = 0
    engine_calls: int = 0
    timeouts: int = 0         # batches taken at ``max_wait_s`` without every simulator waited for


class StepBatcher:
    """Coalesces ``CorrectedSimulator`` steps arriving from many threads within ``max_wait_s``."""

    def __init__(self, max_wait_s: float):
        if not 0.0 <= float(max_wait_s) <= 1.0:
            raise ValueError(f"max_wait_s must be in [0, 1] seconds, got {max_wait_s!r}")
        self.max_wait_s = float(max_wait_s)
        self.stats = BatcherStats()
        self._warned: set[str] = set()
        self._cond = threading.Condition()
        self._queue: list[_Ticket] = []
        self._leading = False
        self._seen: dict[int, float] = {}     # simulator -> when it last queued a step
        self._busy: set[int] = set()          # simulators whose step is being computed
        self._late: dict[int, float] = {}     # simulators a batch waited for in vain -> when: not waited for again
        self._active_s = max(ACTIVE_S, 10 * self.max_wait_s)
        self._late_s = LATE_WAITS * self.max_wait_s

    def step(self, sim, actions: np.ndarray, hold: np.ndarray | None = None):
        """``sim.step(actions, hold)``, its world-model and engine rows computed with other callers'."""
        if not _coalescable(sim):
            return sim.step(actions, hold)
        ticket = _Ticket(sim, sim.begin(actions, hold))
        with self._cond:
            self._queue.append(ticket)
            self._seen[id(sim)] = time.monotonic()
            self.stats.steps += 1
            lead = not self._leading
            if not lead or self._busy:        # joined a batch another caller leads, or came while one computes:
                self._late.pop(id(sim), None)  # in time again
            self._leading = True
            self._cond.notify_all()
        if lead:
            self._run(self._collect())
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return sim.finish(ticket.pending, *sim.combine(ticket.pending, ticket.wm_out, ticket.engine_out))

    def _collect(self) -> list[_Ticket]:
        """Wait for every active simulator's step (or ``max_wait_s``), then take the queue."""
        deadline = time.monotonic() + self.max_wait_s
        with self._cond:
            while True:
                now = time.monotonic()
                self._seen = {k: t for k, t in self._seen.items() if now - t < self._active_s}
                self._late = {k: t for k, t in self._late.items() if k in self._seen and now - t < self._late_s}
                expected = self._seen.keys() - self._busy - self._late.keys()
                queued = {id(t.sim) for t in self._queue}
                if expected <= queued:
                    break
                if now >= deadline:
                    self._late.update(dict.fromkeys(expected - queued, now))
                    self.stats.timeouts += 1
                    break
                self._cond.wait(deadline - now)
            batch, self._queue, self._leading = self._queue, [], False
            self._busy.update(id(t.sim) for t in batch)
            self.stats.batches += 1
        return batch

    def _run(self, batch: list[_Ticket]) -> None:
        """Compute every ticket's rows, grouped into shared calls; each ticket's error is its own group's."""
        try:
            wm_groups: dict[int, list[_Ticket]] = {}
            engine_groups: dict[object, list[_Ticket]] = {}
            for t in batch:
                if t.pending.wm_states is not None:
                    wm = t.sim.world_model
                    wm_groups.setdefault(id(wm) if self._mergeable(wm) else (id(wm), id(t)), []).append(t)
                if t.pending.engine:
                    engine_groups.setdefault(_engine_key(t.sim.engine), []).append(t)
            for group in wm_groups.values():
                self._call(group, "wm_out", lambda g: g[0].sim.world_model.step(
                    np.concatenate([t.pending.wm_states for t in g]), np.concatenate([t.pending.wm_actions for t in g])),
                    lambda t: len(t.pending.wm_states))
                self.stats.wm_calls += 1
            for group in engine_groups.values():
                self._call(group, "engine_out", lambda g: g[0].sim.engine.step_vectors(
                    np.concatenate([t.pending.states for t in g]), np.concatenate([t.pending.actions for t in g])),
                    lambda t: len(t.pending.states))
                self.stats.engine_calls += 1
        finally:
            with self._cond:
                self._busy.difference_update(id(t.sim) for t in batch)
                self._cond.notify_all()
            for t in batch:
                t.done.set()

    def _mergeable(self, world_model) -> bool:
        """Whether this world model's rows may share a call; says so once per model when they may not."""
        if world_model.rows_independent():
            return True
        if world_model.version not in self._warned:
            self._warned.add(world_model.version)
            log.warning("world model %s: a row's prediction depends on its batch on this machine (its layer shapes "
                        "pick other kernels by batch size); its rows are computed per session, not merged",
                        world_model.version)
        return False

    @staticmethod
    def _call(group: list[_Ticket], attr: str, fn, rows) -> None:
        try:
            out = fn(group)
        except Exception as exc:  # noqa: BLE001 - the callers of this group get it; other groups go on
            for t in group:
                t.error = exc
            return
        bounds = np.cumsum([0] + [rows(t) for t in group])
        for t, lo, hi in zip(group, bounds[:-1], bounds[1:], strict=True):
            setattr(t, attr, out[lo:hi])


def _coalescable(sim) -> bool:
    """Whether ``sim``'s rows may go through the batcher (not the on-device blend, which steps alone)."""
    return not (getattr(sim, "device_blend", False) and sim.mode == "blend" and 0.0 < sim.fidelity < 1.0)


def _engine_key(engine) -> object:
    """Engines with the same key compute each other's rows: one MuJoCo C model; any other engine: itself."""
    if engine.name in ROW_INDEPENDENT_ENGINES:
        return (engine.name, engine.task.name, tuple(sorted(engine.params.items())))
    return id(engine)
