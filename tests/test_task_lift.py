"""The contact task: a scripted grasp lifts the ball on every engine that runs it, RLPF passes that true
trajectory and flags hand-made contact violations (a fingertip inside the ball, a ball in the table,
a ball floating unsupported)."""

from __future__ import annotations

import functools

import mujoco
import numpy as np
import pytest

import rewards
import simulators
from simulators.physics import ENGINES, UnsupportedTask
from simulators.physics.scale import data_scale
from simulators.tasks.lift import BALL_X, BALL_Z, LEFT, LIFT_HEIGHT, PALM_Z, RIGHT

BATCH = 8


@functools.cache
def built(name: str):
    try:
        return simulators.make_engine(name, "lift")
    except UnsupportedTask as exc:
        return exc


def engine(name: str):
    eng = built(name)
    assert not isinstance(eng, UnsupportedTask), eng
    return eng


CAPABLE = tuple(e for e in ENGINES if e != "auto" and not isinstance(built(e), UnsupportedTask))


def scripted(eng, seed: int = 0):
    """Grasp and lift: centre over the ball, descend, close, rise. Returns states ``[B, T+1, S]``, actions ``[B, T, A]``."""
    s = eng.reset(seed, BATCH)
    states, actions = [eng.to_vector(s)], []
    for t in range(eng.task.episode_length):
        x = states[-1]
        a = np.zeros((BATCH, 4))
        a[:, 0] = np.clip(x[:, BALL_X] / 0.2, -1, 1)                 # palm x target over the ball
        a[:, 1] = 0.6 if t < 30 else (0.1 if t < 70 else min(0.1 + 0.02 * (t - 70), 0.8))
        a[:, 2:] = -1.0 if t < 50 else 1.0                            # open, then squeeze
        s = eng.step(s, a)
        states.append(eng.to_vector(s))
        actions.append(a)
    return np.stack(states, 1), np.stack(actions, 1)


def windows(states: np.ndarray, actions: np.ndarray, horizon: int = 5):
    t0 = np.arange(0, actions.shape[1] - horizon + 1, horizon)
    S, A = states.shape[2], actions.shape[2]
    start = states[:, t0].reshape(-1, S)
    acts = np.stack([actions[:, t0 + k] for k in range(horizon)], 2).reshape(-1, horizon, A)
    nxt = np.stack([states[:, t0 + k + 1] for k in range(horizon)], 2).reshape(-1, horizon, S)
    return start, acts, nxt


def test_lift_runs_on_mujoco_and_mjx_and_brax_says_why_not():
    assert {"mujoco", "mjx"} <= set(CAPABLE)
    with pytest.raises(UnsupportedTask, match="contacts"):
        simulators.make_engine("brax", "lift")


@pytest.mark.parametrize("name", CAPABLE)
def test_scripted_grasp_lifts_the_ball_and_rlpf_passes_it(name):
    eng = engine(name)
    task = eng.task
    states, actions = scripted(eng)
    good = np.stack([task.is_good(states[:, t]) for t in range(1, states.shape[1])], 1)
    assert task.episode_success(good).all() and (states[:, -1, BALL_Z] > LIFT_HEIGHT).all()
    r = np.stack([task.reward(states[:, t + 1], actions[:, t]) for t in range(actions.shape[1])], 1)
    assert 0 <= r.min() and r.max() <= 1 and r[:, -1].min() > 0.9 and r[:, 0].max() < 0.5
    model, data = eng.model, mujoco.MjData(eng.model)
    data.qpos[:] = states[0, -1, :model.nq]
    mujoco.mj_forward(model, data)
    touching = {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_GEOM, g) for c in data.contact[:data.ncon]
                for g in (c.geom1, c.geom2)}
    assert {"ball", "left_tip", "right_tip"} <= touching               # held by friction between the fingertips
    start, acts, nxt = windows(states, actions)
    for checker in (eng, engine("mujoco")):
        rep = rewards.physics_violation(checker, start, acts, nxt, scale=data_scale("lift"))
        assert not rep.violates.any(), [rep.reasons(i) for i in np.flatnonzero(rep.violates)[:3]]


@pytest.fixture(scope="module")
def grasp():
    states, actions = scripted(engine("mujoco"))
    return windows(states, actions)


def flagged(start, acts, nxt) -> rewards.ViolationReport:
    return rewards.physics_violation(engine("mujoco"), start, acts, nxt, scale=data_scale("lift"))


def test_fingertip_inside_the_ball_is_penetration(grasp):
    start, acts, nxt = grasp
    bad = nxt.copy()
    w = 9                                          # a window while the gripper hovers, fingers open
    bad[w, 2, LEFT] = bad[w, 2, BALL_X] - bad[w, 2, 3] + 0.012   # left fingertip 1.2 cm inside the ball
    rep = flagged(start, acts, bad)
    assert rep.violates.tolist() == [i == w for i in range(len(start))]
    assert "penetration" in rep.reasons(w) and rep.raw["penetration"][w, 2] == pytest.approx(0.012, abs=1e-3)


def test_ball_sunk_into_the_table_is_penetration(grasp):
    start, acts, nxt = grasp
    bad = nxt.copy()
    bad[3, 1, BALL_Z] -= 0.015
    rep = flagged(start, acts, bad)
    assert rep.violates.tolist() == [i == 3 for i in range(len(start))] and "penetration" in rep.reasons(3)


def test_floating_ball_is_flagged(grasp):
    start, acts, nxt = grasp
    bad = nxt.copy()
    w = 2                                          # before the grasp: the ball rests on the table
    assert np.abs(bad[w, :, BALL_Z]).max() < 1e-3
    bad[w, :, BALL_Z] = 0.04                       # hovering 4 cm up, at rest, nothing under it
    bad[w, :, 7 + BALL_Z] = 0.0
    rep = flagged(start, acts, bad)
    assert rep.violates.tolist() == [i == w for i in range(len(start))]
    assert "kinematic" in rep.reasons(w)                               # it got up there without moving
    assert (rep.components["residual"][w, 1:] > 1).all()               # and stays up without support


def test_ball_carried_without_a_grip_is_flagged(grasp):
    start, acts, nxt = grasp
    bad = nxt.copy()
    w = 20                                         # rising with the ball held
    assert (bad[w, :, BALL_Z] > 0.01).all()
    bad[w, :, [LEFT, RIGHT]] = -0.03               # fingers wide open, ball still rising with the palm
    bad[w, :, 7 + LEFT] = bad[w, :, 7 + RIGHT] = 0.0
    rep = flagged(start, acts, bad)
    assert rep.violates[w] and not np.delete(rep.violates, w).any()
    assert (rep.components["residual"][w, 1:] > 1).all()


def test_random_control_rarely_succeeds_and_observations_are_finite():
    eng = engine("mujoco")
    rng = np.random.default_rng(0)
    s = eng.reset(1, 64)
    good = []
    for _ in range(eng.task.episode_length):
        s = eng.step(s, rng.uniform(-1, 1, (64, 4)))
        good.append(eng.task.is_good(s))
        assert np.isfinite(eng.task.observe(s)).all()
    assert eng.task.episode_success(np.stack(good, 1)).mean() < 0.1
    assert eng.task.observe(s).shape == (64, eng.task.observation_size)
    assert (s[:, PALM_Z] >= -0.121).all()
