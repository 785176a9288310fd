"""The engine x task contract as checks any test can run on any engine (dm_env_rpc's ``compliance`` idea).

``check_engine(engine)`` runs every check for one engine built for one task and raises
``AssertionError`` naming the first failure; ``tests/test_physics_contract.py`` runs the same
checks over every registered engine x task, one test each, and a task added at run time is checked
by calling it. The reference is a plain single-threaded ``mujoco.mj_step`` loop of the task's own
MJCF (unscaled parameters), from the same states under the same actions.
"""

from __future__ import annotations

import re
from typing import Any

import mujoco
import numpy as np

from simulators.physics.agreement import TARGET_ONE_STEP, TARGET_TEN_STEPS, limited_joints

BATCH = 8  # one batch shape throughout: a JAX engine compiles once per task


def actions_for(spec: Any, steps: int, seed: int = 0, bang: bool = False, batch: int = BATCH) -> np.ndarray:
    """Uniformly random actions in the bounds ``[steps, batch, A]``; ``bang``: each at the nearer bound."""
    a = np.random.default_rng(seed).uniform(spec.action_low, spec.action_high, size=(steps, batch, spec.action_size))
    return np.where(a > (spec.action_low + spec.action_high) / 2, spec.action_high, spec.action_low) if bang else a


def rollout(engine: Any, start: int | np.ndarray, actions: np.ndarray) -> np.ndarray:
    """States ``[B, T+1, S]`` from ``start`` (a seed for ``reset``, or state vectors) under ``actions [T, B, A]``."""
    state = engine.reset(start, actions.shape[1]) if isinstance(start, int) else engine.from_vector(start)
    out = [engine.to_vector(state)]
    for a in actions:
        state = engine.step(state, a)
        out.append(engine.to_vector(state))
    return np.stack(out, axis=1)


def mj_step_reference(task: Any, start: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """A plain ``mujoco.mj_step`` loop of the task's own MJCF: states ``[B, T, S]`` after each control step."""
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


def agreement_error(engine: Any, steps: int = 10, bang: bool = False, seed: int = 1) -> np.ndarray:
    """Largest state error ``[steps]`` against ``mj_step`` after each control step, from the task's initial states."""
    actions = actions_for(engine.spec, steps, seed=seed, bang=bang)
    traj = rollout(engine, 3, actions)
    return np.abs(traj[:, 1:] - mj_step_reference(engine.task, traj[:, 0], actions)).max(axis=(0, 2))


def active_limits(task: Any, states: np.ndarray) -> np.ndarray:
    """Per state, the number of joint-limit constraints MuJoCo's solver has active."""
    model = mujoco.MjModel.from_xml_string(task.xml)
    data = mujoco.MjData(model)
    out = []
    for s in states:
        data.qpos[:], data.qvel[:] = s[: model.nq], s[model.nq:]
        mujoco.mj_forward(model, data)
        out.append(int((data.efc_type == mujoco.mjtConstraint.mjCNSTR_LIMIT_JOINT).sum()))
    return np.array(out)


def limit_starts(engine: Any) -> np.ndarray | None:
    """``BATCH`` initial states, each with a limited joint 1 mm (or mrad) past a limit and moving on (None: no limits).

    A row whose limit pose would drive a body into another keeps the plain initial state.
    """
    m = engine.model
    joints = limited_joints(m)
    if not len(joints):
        return None
    base = engine.task.initial_states(np.random.default_rng(0), BATCH)
    out = base.copy()
    for r in range(BATCH):
        j, side = joints[r % len(joints)], (r // len(joints)) % 2
        speed = (0.5, 2.0)[(r // (2 * len(joints))) % 2]
        out[r, m.jnt_qposadr[j]] = m.jnt_range[j, side] + (1e-3 if side else -1e-3)
        out[r, m.nq + m.jnt_dofadr[j]] = speed if side else -speed
    depth = [engine.vector_constraints(x).penetration for x in (out, base)]
    deeper = depth[0] > depth[1] + 1e-9
    out[deeper] = base[deeper]
    return out


def limit_agreement_error(engine: Any, seed: int = 4) -> float | None:
    """Largest state error against ``mj_step`` after one control step from ``limit_starts`` (None: no limits)."""
    start = limit_starts(engine)
    if start is None:
        return None
    assert active_limits(engine.task, start).sum() >= BATCH // 2, f"{engine.task.name}: the limit starts put no limit in play"
    actions = actions_for(engine.spec, 1, seed=seed)
    traj = rollout(engine, start, actions)
    return float(np.abs(traj[:, 1] - mj_step_reference(engine.task, start, actions)[:, 0]).max())


def check_spec_and_rollout(engine: Any, steps: int = 100) -> None:
    """Spec sizes, finite deterministic rollouts from seeded resets, observations of the declared size."""
    spec, task = engine.spec, engine.task
    assert spec.state_size == spec.nq + spec.nv and spec.joint_limits.shape == (spec.nq, 2)
    assert len(spec.state_names) == spec.state_size and all(spec.state_names)
    assert spec.control_dt > 0 and spec.observation_size == task.observation_size > 0
    actions = actions_for(spec, steps)
    traj = rollout(engine, 7, actions)
    assert traj.shape == (BATCH, steps + 1, spec.state_size) and np.isfinite(traj).all()
    assert task.observe(traj[:, -1]).shape == (BATCH, task.observation_size)
    assert task.reward(traj[:, -1], actions[-1]).shape == (BATCH,) and task.is_good(traj[:, -1]).shape == (BATCH,)
    np.testing.assert_array_equal(rollout(engine, 7, actions), traj)
    assert not np.allclose(rollout(engine, 8, actions[:3])[:, 0], traj[:, 0]), "reset ignores its seed"


def check_agreement(engine: Any) -> None:
    """Within ``engine.agreement`` of ``mj_step`` (itself within the targets) under random and bang-bang actions."""
    agreement, who = engine.agreement, f"{engine.name} on {engine.task.name}"
    assert agreement.one_step <= TARGET_ONE_STEP and agreement.ten_steps <= TARGET_TEN_STEPS, agreement
    for bang in (False, True):
        err = agreement_error(engine, bang=bang)
        assert err[0] < agreement.one_step, f"{who}: {err[0]:.2e} after one control step (bang={bang})"
        assert err.max() < agreement.ten_steps, f"{who}: {err.max():.2e} within ten control steps (bang={bang})"
    at_limits = limit_agreement_error(engine)
    assert at_limits is None or at_limits < agreement.at_limits, f"{who}: {at_limits:.2e} at a joint limit"


def check_refusal(error: Exception, name: str, task: str) -> list[str]:
    """An engine's refusal of a task names the engine, the task and the engines that can; returns those."""
    msg = str(error)
    assert name in msg and repr(task) in msg, f"the refusal does not name {name} and {task!r}: {msg}"
    capable = re.search(r"engines that can: ([\w, ]+)", msg)
    assert capable, f"the refusal names no engine that can run {task!r}: {msg}"
    return capable.group(1).split(", ")


def engine_or_refusal(name: str, task: Any) -> Any:
    """``make_engine(name, task)``; where the engine refuses, check the refusal (and that a named engine runs it): None."""
    from simulators.physics import UnsupportedTask, make_engine

    try:
        return make_engine(name, task)
    except UnsupportedTask as exc:
        task_name = task if isinstance(task, str) else task.name
        capable = check_refusal(exc, name, task_name)
        make_engine(capable[0], task)
        return None


def check_engine(engine: Any) -> None:
    """Every contract check for one engine built for one task."""
    check_spec_and_rollout(engine)
    check_agreement(engine)
