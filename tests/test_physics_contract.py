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
from simulators.physics import ENGINES, UnsupportedTask, auto_backend, compliance
from simulators.physics.agreement import TARGET_ONE_STEP, TARGET_TEN_STEPS, contact_pairs, limited_joints
from simulators.physics.compliance import BATCH, actions_for, rollout

BACKENDS = tuple(e for e in ENGINES if e != "auto")


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
    for other in compliance.check_refusal(eng, name, task):
        assert not isinstance(built(other, task), UnsupportedTask), f"{other} is named as capable of {task!r} but refuses"
    return None


def test_every_task_runs_on_some_engine_and_the_suite_covers_the_registries():
    assert len(BACKENDS) >= 3 and "mujoco" in BACKENDS
    for task in simulators.TASKS:
        assert not isinstance(built("mujoco", task), UnsupportedTask), task
    assert "lift" in simulators.TASKS and contact_pairs(built("mujoco", "lift").model)


@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_rollout_has_spec_shapes_no_nan_and_is_deterministic(backend, task):
    eng = engine_or_refusal(backend, task)
    if eng is not None:
        compliance.check_spec_and_rollout(eng)


@pytest.mark.parametrize("bang", [False, True], ids=["random", "bang-bang"])
@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_plain_mj_step_loop(backend, task, bang):
    eng = engine_or_refusal(backend, task)
    if eng is None:
        return
    agreement = eng.agreement
    assert agreement.one_step <= TARGET_ONE_STEP and agreement.ten_steps <= TARGET_TEN_STEPS
    err = compliance.agreement_error(eng, bang=bang)
    assert err[0] < agreement.one_step, f"{backend} on {task}: {err[0]:.2e} after one control step"
    assert err.max() < agreement.ten_steps, f"{backend} on {task}: {err.max():.2e} within ten control steps"


@pytest.mark.parametrize("task", simulators.TASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_mj_step_at_joint_limits(backend, task):
    eng = engine_or_refusal(backend, task)
    if eng is None:
        return
    err = compliance.limit_agreement_error(eng)
    if err is None:
        assert not len(limited_joints(eng.model))
    else:
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
        traj = rollout(e, 0, actions_for(e.spec, 200, seed=2, bang=True))
        cs = e.constraints(traj.reshape(-1, e.spec.state_size))
        assert cs.penetration.max() < 0.01 and cs.joint_limit_excess.max() < 0.05 and not cs.nonfinite.any(), task


def test_collision_is_skipped_only_where_the_filter_admits_no_pair():
    """``can_touch`` False means MuJoCo's collision never makes a contact: checked against ``mj_collision`` itself."""
    from simulators.physics.base import can_touch, constraint_violations

    rng = np.random.default_rng(5)
    for task in simulators.TASKS:
        e = built("mujoco", task)
        assert e.can_touch == bool(contact_pairs(e.model)) == can_touch(e.model), task
        states = np.concatenate([rollout(e, 0, actions_for(e.spec, 50, seed=3)).reshape(-1, e.spec.state_size),
                                 rng.uniform(-4, 4, (200, e.spec.state_size))])
        fast = e.vector_constraints(states)
        full = constraint_violations(e.model, states, e.spec.joint_limits, touching=True)
        np.testing.assert_array_equal(fast.penetration, full.penetration, err_msg=task)
        np.testing.assert_array_equal(fast.joint_limit_excess, full.joint_limit_excess, err_msg=task)
    assert built("mujoco", "lift").can_touch and not built("mujoco", "pendulum").can_touch

    def model(a: str, b: str) -> mujoco.MjModel:
        return mujoco.MjModel.from_xml_string(f"""<mujoco><worldbody><geom type="plane" size="1 1 .1" {a}/>
            <body><joint type="slide" axis="0 0 1"/><geom size=".1" {b}/></body></worldbody></mujoco>""")

    off = 'contype="0" conaffinity="0"'
    assert can_touch(model("", ""))                                                   # MuJoCo's defaults collide
    assert can_touch(model('contype="1" conaffinity="0"', 'contype="0" conaffinity="1"'))  # one direction is enough
    assert not can_touch(model('contype="2" conaffinity="2"', 'contype="1" conaffinity="1"'))
    assert not can_touch(model(off, off))
    with_pair = mujoco.MjModel.from_xml_string(f"""<mujoco><worldbody><geom name="floor" type="plane" size="1 1 .1" {off}/>
        <body><joint type="slide" axis="0 0 1"/><geom name="ball" size=".1" {off}/></body></worldbody>
        <contact><pair geom1="floor" geom2="ball"/></contact></mujoco>""")
    assert can_touch(with_pair)
    sunk = np.array([[-0.05, 0.0]])                                                   # the ball 15 cm into the floor
    assert constraint_violations(with_pair, sunk, np.full((1, 2), [-np.inf, np.inf])).penetration[0] > 0.1
    assert constraint_violations(model(off, off), sunk, np.full((1, 2), [-np.inf, np.inf])).penetration[0] == 0.0


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
