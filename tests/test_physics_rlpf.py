"""RLPF is precise on every registered engine x task: true windows are never flagged, every hand-made
violation of 2 tolerances is, by the component meant to catch it (``benchmarks/rlpf.py`` at scale)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import rewards
import simulators
from rewards.corruptions import CAUGHT_BY, KINDS, corrupt, true_windows
from simulators.physics import ENGINES, UnsupportedTask, contact_pairs
from simulators.physics.scale import data_scale

BACKENDS = tuple(e for e in ENGINES if e != "auto")
BATCH, HORIZON, SAMPLE = 8, 5, 64   # a JAX engine sees batches of 8 only (its compiled shape)


@functools.cache
def built(name: str, task: str):
    try:
        return simulators.make_engine(name, task)
    except UnsupportedTask as exc:
        return exc


def check(engine, prev: np.ndarray, actions: np.ndarray, nxt: np.ndarray, scale: np.ndarray) -> rewards.ViolationReport:
    """RLPF of single transitions ``[N]`` as windows of one step, in calls of ``BATCH`` transitions."""
    reps = [rewards.physics_violation(engine, prev[i:i + BATCH], actions[i:i + BATCH, None], nxt[i:i + BATCH, None],
                                      scale=scale) for i in range(0, len(prev), BATCH)]
    return rewards.ViolationReport(*(np.concatenate([getattr(r, f) for r in reps]) if f not in ("components", "raw")
                                     else {k: np.concatenate([getattr(r, f)[k] for r in reps]) for k in rewards.COMPONENTS}
                                     for f in ("per_transition", "per_window", "components", "raw", "violates", "reward")))


def transitions(engine, bang: bool):
    start, actions, nxt = true_windows(engine, BATCH, HORIZON, seed=11, bang=bang)
    prev = np.concatenate([start[:, None], nxt[:, :-1]], axis=1)
    S, A = engine.spec.state_size, engine.spec.action_size
    return prev.reshape(-1, S), actions.reshape(-1, A), nxt.reshape(-1, S), (start, actions, nxt)


@pytest.mark.parametrize("bang", [False, True], ids=["random", "bang-bang"])
@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_true_windows_are_never_flagged_and_every_violation_is(backend, task, bang):
    engine = built(backend, task)
    if isinstance(engine, UnsupportedTask):   # the contract suite checks that the refusal is clear
        assert backend in str(engine) and "engines that can" in str(engine)
        return
    reference = built("mujoco", task)
    scale = data_scale(task)
    prev, actions, nxt, windows = transitions(engine, bang)

    own = check(engine, prev, actions, nxt, scale)                     # the engine that made them
    assert not own.violates.any(), [own.reasons(i) for i in np.flatnonzero(own.violates)[:3]]
    assert own.per_transition.max() < 1e-3
    ref = rewards.physics_violation(reference, *windows, scale=scale)  # MuJoCo's C engine, whole windows at once
    assert not ref.violates.any(), [ref.reasons(i) for i in np.flatnonzero(ref.violates)[:3]]

    rng = np.random.default_rng(5)
    pick = rng.choice(len(prev), size=SAMPLE, replace=False)
    limited = np.isfinite(engine.spec.joint_limits).all(axis=1).any()
    for kind in KINDS:
        bad, applicable = corrupt(kind, engine, prev[pick], nxt[pick], 2.0, scale=scale, rng=rng)
        expected = {"joint_limit": limited, "penetration": bool(contact_pairs(engine.model))}.get(kind, True)
        assert applicable.all() if expected else not applicable.any(), (kind, applicable.mean())
        if not expected:
            continue
        rep = check(engine, prev[pick], actions[pick], bad, scale)
        assert rep.violates.all(), (kind, np.flatnonzero(~rep.violates)[:5])
        assert rep.fired()[CAUGHT_BY[kind]].all(), (kind, [rep.reasons(i) for i in np.flatnonzero(~rep.violates)[:3]])
        if kind not in ("nan", "penetration"):   # sized to exactly 2 tolerances of its component
            np.testing.assert_allclose(rep.components[CAUGHT_BY[kind]][:, 0], 2.0, rtol=1e-3, atol=1e-3)
