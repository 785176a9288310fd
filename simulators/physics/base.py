"""The PhysicsEngine protocol and what every backend shares.

Canonical loop (batched, functional; ``state`` is the backend's own pytree or array)::

    engine = simulators.make_engine("mjx", "pendulum")
    state = engine.reset(key, n)                 # n envs from the task's initial distribution
    for t in range(T):
        state = engine.step(state, actions)      # actions [n, A], clipped to the bounds
    s = engine.to_vector(state)                  # [n, S] = concat(qpos, qvel), float64 numpy
    c = engine.constraints(state)                # penetration, joint-limit excess, non-finite
    c = engine.vector_constraints(s)             # the same from vectors (the RLPF check grades these)

A non-finite action raises ``ValueError`` naming the offending envs: the state never turns NaN
silently. ``step_vectors(s, a)`` is the vector-in, vector-out step the world-model correction
and the RLPF check use.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mujoco
import numpy as np

from simulators.tasks import Task
from simulators.tasks.base import check_params


class InputError(ValueError):
    """A bad argument of a call (actions, states, a hold mask): the caller's mistake, not the engine's."""


@dataclass(frozen=True)
class EngineSpec:
    """Sizes and bounds of an engine for one task."""

    nq: int
    nv: int
    action_size: int
    action_low: np.ndarray
    action_high: np.ndarray
    control_dt: float
    joint_limits: np.ndarray        # [nq, 2] (low, high); +-inf where unlimited
    observation_size: int
    state_names: tuple[str, ...] = ()  # [S]: joint names for qpos, then "<joint> vel" for qvel

    @property
    def state_size(self) -> int:
        return self.nq + self.nv


@dataclass(frozen=True)
class Constraints:
    """Per-env constraint violations of a batch of states."""

    penetration: np.ndarray         # [n] deepest interpenetration (m), >= 0
    joint_limit_excess: np.ndarray  # [n] largest distance past a joint limit (joint units), >= 0
    nonfinite: np.ndarray           # [n] bool: any NaN/inf in the state

    def rows(self, index) -> Constraints:
        """The violations of the states at ``index`` (a slice or index array)."""
        return Constraints(self.penetration[index], self.joint_limit_excess[index], self.nonfinite[index])


@runtime_checkable
class PhysicsEngine(Protocol):
    name: str
    task: Task
    spec: EngineSpec

    def reset(self, key: Any, n: int) -> Any: ...
    def step(self, state: Any, action: np.ndarray) -> Any: ...
    def to_vector(self, state: Any) -> np.ndarray: ...
    def from_vector(self, vec: np.ndarray) -> Any: ...
    def constraints(self, state: Any) -> Constraints: ...
    def vector_constraints(self, states: np.ndarray) -> Constraints: ...
    def step_vectors(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray: ...


def build_model(task: Task, params: dict | None = None) -> mujoco.MjModel:
    """Compile the task's MJCF and apply scaled parameters (mass, damping, actuator gain, friction)."""
    scale = check_params(params)
    model = mujoco.MjModel.from_xml_string(task.xml)
    model.body_mass[:] *= scale["mass_scale"]
    model.body_inertia[:] *= scale["mass_scale"]
    model.dof_damping[:] *= scale["damping_scale"]
    model.actuator_gear[:, 0] *= scale["gain_scale"]
    model.geom_friction[:] *= scale["friction_scale"]
    model.dof_frictionloss[:] *= scale["friction_scale"]
    return model


def state_names(model: mujoco.MjModel) -> tuple[str, ...]:
    """Names of the state vector's entries: each joint's qpos coordinates, then its velocities."""
    q, v = [""] * model.nq, [""] * model.nv
    widths = {0: (7, 6), 1: (4, 3), 2: (1, 1), 3: (1, 1)}  # free, ball, slide, hinge
    for j in range(model.njnt):
        name = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j) or f"joint{j}"
        nq, nv = widths[int(model.jnt_type[j])]
        for k in range(nq):
            q[model.jnt_qposadr[j] + k] = name if nq == 1 else f"{name}[{k}]"
        for k in range(nv):
            v[model.jnt_dofadr[j] + k] = f"{name} vel" if nv == 1 else f"{name} vel[{k}]"
    return tuple(q + v)


def seed_of(key: Any) -> int:
    """An integer seed from an int, a numpy Generator or a JAX PRNG key."""
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, np.random.Generator):
        return int(key.integers(2**31))
    data = np.asarray(key)
    if data.dtype.kind not in "iu":  # typed JAX key
        import jax

        data = np.asarray(jax.random.key_data(key))
    return int(np.uint64(np.bitwise_xor.reduce(data.astype(np.uint64).ravel())) % np.uint64(2**63))


class EngineBase:
    """Shared parts: spec, action checks, initial states, constraints via MuJoCo's C collision."""

    name = "base"

    def __init__(self, task: Task, params: dict | None = None):
        self.task = task
        self.params = {k: float(v) for k, v in (params or {}).items()}
        self.model = build_model(task, params)
        m = self.model
        limits = np.full((m.nq, 2), [-np.inf, np.inf])
        for j in range(m.njnt):
            if m.jnt_limited[j]:
                limits[m.jnt_qposadr[j]] = m.jnt_range[j]
        self.spec = EngineSpec(
            nq=m.nq, nv=m.nv, action_size=m.nu,
            action_low=m.actuator_ctrlrange[:, 0].copy(), action_high=m.actuator_ctrlrange[:, 1].copy(),
            control_dt=float(m.opt.timestep * task.n_substeps), joint_limits=limits,
            observation_size=task.observation_size, state_names=state_names(m),
        )
        self._pool: ThreadPoolExecutor | None = None
        self.can_touch = can_touch(self.model)

    # -- actions -------------------------------------------------------------------------------
    def check_actions(self, actions: np.ndarray, n: int) -> np.ndarray:
        """Validate shape and finiteness, clip to the bounds; returns float64 ``[n, A]``."""
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim == 1 and self.spec.action_size == 1 and a.shape[0] == n:
            a = a[:, None]
        expected = (n, self.spec.action_size)
        if a.shape != expected:
            raise InputError(f"{self.task.name}: actions have shape {a.shape}, expected {expected} (batch, action_size)")
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            idx = np.flatnonzero(bad)[:10].tolist()
            raise InputError(f"{self.task.name}: non-finite action in env(s) {idx}; actions must be finite")
        return np.clip(a, self.spec.action_low, self.spec.action_high)

    def check_vectors(self, vec: np.ndarray) -> np.ndarray:
        v = np.asarray(vec, dtype=np.float64)
        if v.ndim != 2 or v.shape[1] != self.spec.state_size:
            raise InputError(f"{self.task.name}: state vectors have shape {v.shape}, expected (batch, {self.spec.state_size})")
        return v

    def initial_vectors(self, key: Any, n: int) -> np.ndarray:
        if n < 1:
            raise ValueError(f"number of envs must be >= 1, got {n}")
        return self.task.initial_states(np.random.default_rng(seed_of(key)), n)

    def step_vectors(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """One control step from state vectors: ``[B, S], [B, A] -> [B, S]``."""
        return self.to_vector(self.step(self.from_vector(states), actions))

    # -- constraints ---------------------------------------------------------------------------
    def constraints(self, state: Any) -> Constraints:
        return self.vector_constraints(self.to_vector(state))

    def vector_constraints(self, states: np.ndarray) -> Constraints:
        """``constraints`` of state vectors ``[B, S]``, without making a backend state of them."""
        return constraint_violations(self.model, self.check_vectors(states), self.spec.joint_limits, self._threads(),
                                     touching=self.can_touch)

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=_num_threads(), thread_name_prefix=f"{self.name}-constraints")
        return self._pool

    def close(self) -> None:
        """Stop the constraint threads (a later ``constraints`` call starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_SCRATCH = threading.local()
POOL_MIN_STATES = 256   # fewer states are checked in the calling thread: handing them to the pool costs more


def _scratch_data(model: mujoco.MjModel) -> mujoco.MjData:
    """This thread's ``MjData`` for ``model``, kept for the next call: an ``MjData`` costs ~1.7 ms to allocate.

    One per thread, for the last model it served (an engine's pool threads only ever see its model).
    """
    if getattr(_SCRATCH, "model", None) is not model:
        _SCRATCH.model, _SCRATCH.data = model, mujoco.MjData(model)
    return _SCRATCH.data


def _num_threads() -> int:
    import os

    return max(1, min(8, os.cpu_count() or 1))


def can_touch(model: mujoco.MjModel) -> bool:
    """Whether MuJoCo's collision filter admits any geom pair of ``model``, in any pose.

    No explicit ``<pair>`` and no two geoms of different bodies whose ``contype``/``conaffinity``
    bits meet: then ``mj_collision`` never makes a contact and every penetration is 0. Only the
    filter's first tests are applied (not the parent, weld or exclude rules, which can only remove
    pairs), so ``True`` may be a pair that never touches, ``False`` never hides one.
    """
    if model.npair:
        return True
    ct, ca, body = model.geom_contype, model.geom_conaffinity, model.geom_bodyid
    meet = ((ct[:, None] & ca[None, :]) | (ca[:, None] & ct[None, :])) != 0
    return bool((meet & (body[:, None] != body[None, :])).any())


def constraint_violations(model: mujoco.MjModel, states: np.ndarray, joint_limits: np.ndarray,
                          pool: ThreadPoolExecutor | None = None, touching: bool | None = None) -> Constraints:
    """Penetration depth (MuJoCo collision), joint-limit excess and non-finite flags of state vectors.

    ``touching``: ``can_touch(model)`` if the caller keeps it; where it is ``False`` no state is
    collided (every penetration is 0 there, as MuJoCo's collision would find).
    """
    s = np.asarray(states, dtype=np.float64)
    nonfinite = ~np.isfinite(s).all(axis=1)
    q = np.where(np.isfinite(s[:, : model.nq]), s[:, : model.nq], 0.0)
    excess = np.maximum(joint_limits[:, 0] - q, q - joint_limits[:, 1])
    excess = np.clip(np.where(np.isfinite(excess), excess, 0.0), 0.0, None).max(axis=1, initial=0.0)
    penetration = np.zeros(len(s))
    if touching is None:
        touching = can_touch(model)
    if touching and len(s):
        chunks = np.array_split(np.arange(len(s)), max(1, min(len(s), _num_threads())))

        def run(idx: np.ndarray) -> None:
            data = _scratch_data(model)
            for i in idx:
                data.qpos[:] = q[i]
                mujoco.mj_kinematics(model, data)
                mujoco.mj_collision(model, data)
                if data.ncon:
                    penetration[i] = max(0.0, -float(data.contact.dist[: data.ncon].min()))

        if pool is None or len(s) < POOL_MIN_STATES:
            for c in chunks:
                run(c)
        else:
            list(pool.map(run, chunks))
    return Constraints(penetration=penetration, joint_limit_excess=excess, nonfinite=nonfinite)
