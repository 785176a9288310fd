"""Contract suite every engine x task inherits: jitted reset/step, shapes, finiteness, determinism, agreement."""

from __future__ import annotations

import functools

import mujoco
import numpy as np
import pytest

import simulators
from simulators.physics import auto_backend

BACKENDS = ("mujoco", "mjx", "brax")
BATCH = 8


@functools.cache
def engine(name: str, task: str):
    return simulators.make_engine(name, task)


def random_actions(spec, steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(spec.action_low, spec.action_high, size=(steps, BATCH, spec.action_size))


def rollout(eng, key: int, actions: np.ndarray) -> np.ndarray:
    state = eng.reset(key, BATCH)
    out = [eng.to_vector(state)]
    for a in actions:
        state = eng.step(state, a)
        out.append(eng.to_vector(state))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_rollout_has_spec_shapes_no_nan_and_is_deterministic(backend, task):
    eng = engine(backend, task)
    spec = eng.spec
    assert spec.state_size == spec.nq + spec.nv
    assert spec.joint_limits.shape == (spec.nq, 2)
    assert len(spec.state_names) == spec.state_size and all(spec.state_names)
    assert spec.control_dt > 0
    actions = random_actions(spec, 200)
    traj = rollout(eng, 7, actions)
    assert traj.shape == (BATCH, 201, spec.state_size)
    assert np.isfinite(traj).all()
    assert eng.task.observe(traj[:, -1]).shape == (BATCH, eng.task.observation_size)
    np.testing.assert_array_equal(rollout(eng, 7, actions), traj)
    assert not np.allclose(rollout(eng, 8, actions[:3])[:, 0], traj[:, 0])


def mj_step_reference(task, start: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """A plain single-threaded ``mujoco.mj_step`` loop: the ground truth for the agreement test."""
    model = mujoco.MjModel.from_xml_string(task.xml)
    data = mujoco.MjData(model)
    out = []
    for i, s in enumerate(start):
        mujoco.mj_resetData(model, data)
        data.qpos[:], data.qvel[:] = s[: model.nq], s[model.nq:]
        for a in actions[:, i]:
            data.ctrl[:] = a
            for _ in range(task.n_substeps):
                mujoco.mj_step(model, data)
        out.append(np.concatenate([data.qpos, data.qvel]))
    return np.array(out)


@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", ("mujoco", "mjx"))
def test_agrees_with_plain_mj_step_loop(backend, task):
    eng = engine(backend, task)
    actions = random_actions(eng.spec, 100, seed=1)
    traj = rollout(eng, 3, actions)
    ref = mj_step_reference(eng.task, traj[:, 0], actions)
    tol = 0.0 if backend == "mujoco" else 1e-3  # mjx runs in float32
    np.testing.assert_allclose(traj[:, -1], ref, atol=tol, rtol=0)


def pendulum_energy(model: mujoco.MjModel, states: np.ndarray) -> np.ndarray:
    model.opt.enableflags |= mujoco.mjtEnableBit.mjENBL_ENERGY
    data = mujoco.MjData(model)
    out = []
    for s in states:
        data.qpos[:], data.qvel[:] = s[:1], s[1:]
        mujoco.mj_forward(model, data)
        out.append(data.energy.sum())
    return np.array(out)


def test_undamped_unactuated_pendulum_conserves_energy_mjx():
    eng = simulators.make_engine("mjx", "pendulum", params={"damping_scale": 0.0})
    start = np.array([[np.pi / 2, 0.0], [2.5, 1.0], [0.3, -2.0], [-1.0, 0.5]] * 2)
    state = eng.from_vector(start)
    zero = np.zeros((BATCH, 1))
    states = [eng.to_vector(state)]
    for _ in range(1000):
        state = eng.step(state, zero)
        states.append(eng.to_vector(state))
    states = np.stack(states, axis=1)
    assert np.abs(np.diff(states[:, :, 0], axis=1)).max() > 0.01  # it really swings
    energy = np.stack([pendulum_energy(eng.model, s) for s in states])
    swing = 1.0 * 9.81 * 0.5 * 2  # the bob's potential-energy range, a natural scale
    # Semi-implicit Euler is symplectic: energy oscillates within a band and does not drift.
    band = np.abs(energy - energy[:, :1]).max()
    drift = np.abs(energy[:, -100:].mean(axis=1) - energy[:, :100].mean(axis=1)).max()
    assert band < 0.03 * swing, f"energy left a {band:.4f} J band over 1000 steps"
    assert drift < 0.005 * swing, f"energy drifted by {drift:.4f} J over 1000 steps"


def period(eng, amplitude: float, steps: int = 400) -> float:
    """Oscillation period (s) of the undamped pendulum released from rest at ``amplitude``."""
    state = eng.from_vector(np.tile([amplitude, 0.0], (BATCH, 1)))
    zero = np.zeros((BATCH, 1))
    theta = []
    for _ in range(steps):
        state = eng.step(state, zero)
        theta.append(eng.to_vector(state)[0, 0])
    theta = np.array(theta) - np.pi  # oscillates about the hanging position
    t = (np.arange(steps) + 1) * eng.spec.control_dt
    crossings = np.flatnonzero(np.sign(theta[:-1]) != np.sign(theta[1:]))
    tc = t[crossings] + eng.spec.control_dt * theta[crossings] / (theta[crossings] - theta[crossings + 1])
    return float(2 * np.mean(np.diff(tc)))


def test_brax_pendulum_period_agrees_with_mjx():
    params = {"damping_scale": 0.0}
    amplitude = np.pi - 0.5  # 0.5 rad from hanging
    p_mjx = period(simulators.make_engine("mjx", "pendulum", params), amplitude)
    p_brax = period(simulators.make_engine("brax", "pendulum", params), amplitude)
    small_angle = 2 * np.pi * np.sqrt(0.5 / 9.81)  # point mass on a 0.5 m rod
    assert abs(p_mjx - small_angle) / small_angle < 0.1
    assert abs(p_brax - p_mjx) / p_mjx < 0.03, (p_brax, p_mjx)


def test_constraints_flag_joint_limit_and_penetration_and_not_engine_states():
    eng = engine("mujoco", "cartpole")
    ok = np.zeros((3, 4))
    past_limit = np.array([[1.85, 0.0, 0.0, 0.0]])    # 0.05 m past the rail's 1.8 m limit, clear of the wall
    into_wall = np.array([[2.15, 0.0, 0.0, 0.0]])     # cart capsule (reach 0.3 m) 0.25 m into the wall at 2.2 m
    c = eng.constraints(eng.from_vector(np.concatenate([ok, past_limit, into_wall])))
    np.testing.assert_allclose(c.joint_limit_excess, [0, 0, 0, 0.05, 0.35], atol=1e-9)
    np.testing.assert_allclose(c.penetration, [0, 0, 0, 0, 0.25], atol=1e-6)
    assert not c.nonfinite.any()
    nan = eng.constraints(np.array([[np.nan, 0.0, 0.0, 0.0]]))
    assert nan.nonfinite.tolist() == [True]
    for task in simulators.TASKS:  # states the engine produced itself: ~0
        e = engine("mujoco", task)
        traj = rollout(e, 0, random_actions(e.spec, 200, seed=2) * 1.0)
        cs = e.constraints(traj.reshape(-1, e.spec.state_size))
        assert cs.penetration.max() < 1e-3 and cs.joint_limit_excess.max() < 0.05 and not cs.nonfinite.any()


def test_bad_names_shapes_and_actions_raise_clear_errors():
    with pytest.raises(ValueError, match="valid engines: mjx, brax, mujoco, auto"):
        simulators.make_engine("physx", "pendulum")
    with pytest.raises(ValueError, match="valid tasks: cartpole, pendulum, reacher"):
        simulators.make_engine("mujoco", "hopper")
    with pytest.raises(ValueError, match="allowed: mass_scale"):
        simulators.make_engine("mujoco", "pendulum", params={"gravity_scale": 2.0})
    eng = engine("mujoco", "reacher")
    state = eng.reset(0, BATCH)
    with pytest.raises(ValueError, match=r"shape \(8, 3\), expected \(8, 2\)"):
        eng.step(state, np.zeros((BATCH, 3)))
    bad = np.zeros((BATCH, 2))
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite action in env\(s\) \[5\]"):
        eng.step(state, bad)
    with pytest.raises(ValueError, match=r"expected \(batch, 8\)"):
        eng.from_vector(np.zeros((BATCH, 5)))
    clipped = eng.step(state, np.full((BATCH, 2), 50.0))
    np.testing.assert_allclose(clipped, eng.step(state, np.ones((BATCH, 2))))


def test_scaled_parameters_change_the_dynamics():
    base = engine("mujoco", "pendulum")
    heavy = simulators.make_engine("mujoco", "pendulum", params={"gain_scale": 0.5})
    s = np.array([[np.pi, 0.0]])
    a = np.ones((1, 1))
    assert base.step(s, a)[0, 1] > heavy.step(s, a)[0, 1] > 0


def test_state_names_follow_qpos_then_qvel():
    assert engine("mujoco", "cartpole").spec.state_names == ("slider", "hinge", "slider vel", "hinge vel")


def test_auto_picks_mujoco_on_a_cpu():
    assert auto_backend() == "mujoco"
    assert simulators.make_engine("auto", "pendulum").name == "mujoco"
