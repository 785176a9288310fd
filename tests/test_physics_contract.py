"""Contract suite every registered engine x task inherits: it runs or refuses clearly, shapes, determinism,
and agreement with a plain ``mujoco.mj_step`` loop of the task's own MJCF. Engines and tasks come
from the registries, so one added later is checked the same way."""

from __future__ import annotations

import dataclasses
import functools
import re

import mujoco
import numpy as np
import pytest

import simulators
from simulators.physics import ENGINES, UnsupportedTask, auto_backend
from simulators.physics.agreement import TARGET_ONE_STEP, TARGET_TEN_STEPS, contact_pairs, limited_joints

BACKENDS = tuple(e for e in ENGINES if e != "auto")
BATCH = 8  # one batch shape everywhere: a JAX engine compiles once per task


@functools.cache
def built(name: str, task: str):
    """The engine, or the ``UnsupportedTask`` it raised for this task."""
    try:
        return simulators.make_engine(name, task)
    except UnsupportedTask as exc:
        return exc


def engine_or_refusal(name: str, task: str):
    """The engine; or, where it refuses the task, check that the refusal is clear and return None."""
    eng = built(name, task)
    if not isinstance(eng, UnsupportedTask):
        return eng
    msg = str(eng)
    assert name in msg and repr(task) in msg, msg
    capable = re.search(r"engines that can: ([\w, ]+)", msg)
    assert capable, f"the refusal names no engine that can run {task!r}: {msg}"
    for other in capable.group(1).split(", "):
        assert not isinstance(built(other, task), UnsupportedTask), f"{other} is named as capable of {task!r} but refuses"
    return None


def random_actions(spec, steps: int, seed: int = 0, bang: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(spec.action_low, spec.action_high, size=(steps, BATCH, spec.action_size))
    return np.where(a > (spec.action_low + spec.action_high) / 2, spec.action_high, spec.action_low) if bang else a


def rollout(eng, start, actions: np.ndarray) -> np.ndarray:
    """States ``[B, T+1, S]`` from ``start`` (a seed for ``reset`` or state vectors) under ``actions [T, B, A]``."""
    state = eng.reset(start, BATCH) if isinstance(start, int) else eng.from_vector(start)
    out = [eng.to_vector(state)]
    for a in actions:
        state = eng.step(state, a)
        out.append(eng.to_vector(state))
    return np.stack(out, axis=1)


def mj_step_reference(task, start: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """A plain single-threaded ``mujoco.mj_step`` loop of the task's own MJCF: ``[B, T, S]``."""
    model = mujoco.MjModel.from_xml_string(task.xml)
    data = mujoco.MjData(model)
    out = []
    for i, s in enumerate(start):
        mujoco.mj_resetData(model, data)
        data.qpos[:], data.qvel[:] = s[: model.nq], s[model.nq:]
        traj = []
        for a in actions[:, i]:
            data.ctrl[:] = a
            for _ in range(task.n_substeps):
                mujoco.mj_step(model, data)
            traj.append(np.concatenate([data.qpos, data.qvel]))
        out.append(traj)
    return np.array(out)


def test_every_task_runs_on_some_engine_and_the_suite_covers_the_registries():
    assert len(BACKENDS) >= 3 and "mujoco" in BACKENDS
    for task in simulators.TASKS:
        assert not isinstance(built("mujoco", task), UnsupportedTask), task
    assert "lift" in simulators.TASKS and contact_pairs(built("mujoco", "lift").model)


@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_rollout_has_spec_shapes_no_nan_and_is_deterministic(backend, task):
    eng = engine_or_refusal(backend, task)
    if eng is None:
        return
    spec = eng.spec
    assert spec.state_size == spec.nq + spec.nv
    assert spec.joint_limits.shape == (spec.nq, 2)
    assert len(spec.state_names) == spec.state_size and all(spec.state_names)
    assert spec.control_dt > 0
    assert spec.observation_size == eng.task.observation_size > 0
    actions = random_actions(spec, 100)
    traj = rollout(eng, 7, actions)
    assert traj.shape == (BATCH, 101, spec.state_size)
    assert np.isfinite(traj).all()
    assert eng.task.observe(traj[:, -1]).shape == (BATCH, eng.task.observation_size)
    np.testing.assert_array_equal(rollout(eng, 7, actions), traj)
    assert not np.allclose(rollout(eng, 8, actions[:3])[:, 0], traj[:, 0])


@pytest.mark.parametrize("bang", [False, True], ids=["random", "bang-bang"])
@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_plain_mj_step_loop(backend, task, bang):
    eng = engine_or_refusal(backend, task)
    if eng is None:
        return
    agreement = eng.agreement
    assert agreement.one_step <= TARGET_ONE_STEP and agreement.ten_steps <= TARGET_TEN_STEPS
    actions = random_actions(eng.spec, 10, seed=1, bang=bang)
    traj = rollout(eng, 3, actions)
    err = np.abs(traj[:, 1:] - mj_step_reference(eng.task, traj[:, 0], actions)).max(axis=(0, 2))
    assert err[0] < agreement.one_step, f"{backend} on {task}: {err[0]:.2e} after one control step"
    assert err.max() < agreement.ten_steps, f"{backend} on {task}: {err.max():.2e} within ten control steps"


def limit_starts(eng) -> np.ndarray | None:
    """``BATCH`` initial states with a limited joint just past a limit, moving on (none if nothing is limited)."""
    m = eng.model
    joints = limited_joints(m)
    if not len(joints):
        return None
    base = eng.task.initial_states(np.random.default_rng(0), BATCH)
    out = base.copy()
    for r in range(BATCH):
        j, side = joints[r % len(joints)], (r // len(joints)) % 2
        speed = (0.5, 2.0)[(r // (2 * len(joints))) % 2]
        out[r, m.jnt_qposadr[j]] = m.jnt_range[j, side] + (1e-3 if side else -1e-3)   # 1 mm/mrad past it
        out[r, m.nq + m.jnt_dofadr[j]] = speed if side else -speed
    deeper = eng.constraints(eng.from_vector(out)).penetration > eng.constraints(eng.from_vector(base)).penetration + 1e-9
    out[deeper] = base[deeper]  # a limit pose that drives a body into another is not what is tested here
    return out


def active_limits(task, states: np.ndarray) -> np.ndarray:
    """Per state, the number of joint-limit constraints MuJoCo's solver has active."""
    model = mujoco.MjModel.from_xml_string(task.xml)
    data = mujoco.MjData(model)
    out = []
    for s in states:
        data.qpos[:], data.qvel[:] = s[: model.nq], s[model.nq:]
        mujoco.mj_forward(model, data)
        out.append(int((data.efc_type == mujoco.mjtConstraint.mjCNSTR_LIMIT_JOINT).sum()))
    return np.array(out)


@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_mj_step_at_joint_limits(backend, task):
    eng = engine_or_refusal(backend, task)
    if eng is None:
        return
    start = limit_starts(eng)
    if start is None:
        assert not len(limited_joints(eng.model))
        return
    actions = random_actions(eng.spec, 1, seed=4)
    traj = rollout(eng, start, actions)
    assert active_limits(eng.task, start).sum() >= BATCH // 2      # the limits really are in play
    err = np.abs(traj[:, 1] - mj_step_reference(eng.task, start, actions)[:, 0]).max()
    assert err < eng.agreement.at_limits, f"{backend} on {task}: {err:.2e} at a joint limit"


def undamped_pendulum():
    task = simulators.make_task("pendulum")
    return dataclasses.replace(task, xml=task.xml.replace('damping="0.05"', 'damping="0"'))


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
    eng = simulators.make_engine("mjx", undamped_pendulum())
    start = np.array([[np.pi / 2, 0.0], [2.5, 1.0], [0.3, -2.0], [-1.0, 0.5]] * 2)
    states = rollout(eng, start, np.zeros((1000, BATCH, 1)))
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
    theta = rollout(eng, np.tile([amplitude, 0.0], (BATCH, 1)), np.zeros((steps, BATCH, 1)))[0, 1:, 0] - np.pi
    t = (np.arange(steps) + 1) * eng.spec.control_dt
    crossings = np.flatnonzero(np.sign(theta[:-1]) != np.sign(theta[1:]))
    tc = t[crossings] + eng.spec.control_dt * theta[crossings] / (theta[crossings] - theta[crossings + 1])
    return float(2 * np.mean(np.diff(tc)))


def test_brax_pendulum_period_agrees_with_mjx():
    amplitude = np.pi - 0.5  # 0.5 rad from hanging
    p_mjx = period(simulators.make_engine("mjx", undamped_pendulum()), amplitude)
    p_brax = period(simulators.make_engine("brax", undamped_pendulum()), amplitude)
    small_angle = 2 * np.pi * np.sqrt(0.5 / 9.81)  # point mass on a 0.5 m rod
    assert abs(p_mjx - small_angle) / small_angle < 0.1
    assert abs(p_brax - p_mjx) / p_mjx < 1e-4, (p_brax, p_mjx)


def test_constraints_flag_joint_limit_and_penetration_and_not_engine_states():
    eng = built("mujoco", "cartpole")
    ok = np.zeros((3, 4))
    past_limit = np.array([[1.85, 0.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]])  # 5 and 20 cm past the rail's +-1.8 m
    c = eng.constraints(eng.from_vector(np.concatenate([ok, past_limit])))
    np.testing.assert_allclose(c.joint_limit_excess, [0, 0, 0, 0.05, 0.2], atol=1e-9)
    assert not c.penetration.any() and not c.nonfinite.any()
    nan = eng.constraints(np.array([[np.nan, 0.0, 0.0, 0.0]]))
    assert nan.nonfinite.tolist() == [True]
    lift = built("mujoco", "lift")
    s = np.zeros((3, 14))                 # ball resting at x = 0, palm centred at the ball's height
    s[:, 5:7] = -0.03                     # fingers open: nothing touches
    s[1, 5] = 0.01                        # left fingertip 1 cm inside the ball
    s[2, 1] = -0.02                       # ball 2 cm into the table
    np.testing.assert_allclose(lift.constraints(s).penetration, [0, 0.01, 0.02], atol=1e-6)
    for task in simulators.TASKS:  # states the engine produced itself: soft contacts and limits give a little
        e = built("mujoco", task)
        traj = rollout(e, 0, random_actions(e.spec, 200, seed=2, bang=True))
        cs = e.constraints(traj.reshape(-1, e.spec.state_size))
        assert cs.penetration.max() < 0.01 and cs.joint_limit_excess.max() < 0.05 and not cs.nonfinite.any(), task


def test_brax_refuses_a_task_with_contacts_and_names_the_engines_that_can():
    with pytest.raises(UnsupportedTask, match=r"brax cannot reproduce mj_step on task 'lift': it has contacts "
                                              r"\(.*ball.*\).*engines that can: mjx, mujoco"):
        simulators.make_engine("brax", "lift")
    assert isinstance(built("brax", "lift"), ValueError)   # a ValueError like every other bad choice


def test_mjx_computes_in_float64_only_where_contacts_need_it():
    assert built("mjx", "lift").dtype == "float64" and built("mjx", "pendulum").dtype == "float32"
    assert built("mjx", "lift").to_vector(built("mjx", "lift").reset(0, BATCH)).dtype == np.float64


def test_bad_names_shapes_and_actions_raise_clear_errors():
    with pytest.raises(ValueError, match=f"valid engines: {', '.join(ENGINES)}"):
        simulators.make_engine("physx", "pendulum")
    with pytest.raises(ValueError, match=re.escape(f"valid tasks: {', '.join(sorted(simulators.TASKS))}")):
        simulators.make_engine("mujoco", "hopper")
    with pytest.raises(ValueError, match="allowed: mass_scale"):
        simulators.make_engine("mujoco", "pendulum", params={"gravity_scale": 2.0})
    eng = built("mujoco", "reacher")
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
    base = built("mujoco", "pendulum")
    heavy = simulators.make_engine("mujoco", "pendulum", params={"gain_scale": 0.5})
    s = np.array([[np.pi, 0.0]])
    a = np.ones((1, 1))
    assert base.step(s, a)[0, 1] > heavy.step(s, a)[0, 1] > 0


def test_state_names_follow_qpos_then_qvel():
    assert built("mujoco", "cartpole").spec.state_names == ("slider", "hinge", "slider vel", "hinge vel")


def test_auto_picks_mujoco_on_a_cpu():
    assert auto_backend() == "mujoco"
    assert simulators.make_engine("auto", "pendulum").name == "mujoco"
