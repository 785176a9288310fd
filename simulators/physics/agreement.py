"""How closely an engine reproduces a plain ``mujoco.mj_step`` loop of a task's MJCF, and what it refuses.

Every engine states its agreement as an ``Agreement`` (the largest state error, in state units, it
promises against ``mj_step`` from the same state under the same actions) and raises
``UnsupportedTask`` at construction for a task it cannot reproduce, naming why and the engines
that can. ``tests/test_physics_contract.py`` measures every registered engine x task against it.

A task "has contacts" when MuJoCo's collision filter (contype/conaffinity, exclusions,
parent-child and same-body filtering, explicit pairs) lets some pair of geoms collide at all;
``contact_pairs`` lists them. Decorative geoms that are never meant to touch anything should have
``contype="0" conaffinity="0"`` so that a task without contacts is seen as one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import mujoco
import numpy as np

TARGET_ONE_STEP = 1e-5    # max |state - mj_step state| after one control step
TARGET_TEN_STEPS = 1e-4   # ... after ten control steps


class UnsupportedTask(ValueError):
    """An engine cannot reproduce ``mj_step`` on a task; the message names why and the engines that can."""


@dataclass(frozen=True)
class Agreement:
    """Largest state error an engine promises against ``mj_step`` on a task (qpos and qvel units)."""

    one_step: float = TARGET_ONE_STEP      # after one control step from a task's initial state
    ten_steps: float = TARGET_TEN_STEPS    # after ten control steps (random or bang-bang actions)
    at_limits: float = TARGET_ONE_STEP     # after one control step that drives a joint into its limit
    note: str = ""


def contact_pairs(model: mujoco.MjModel) -> list[tuple[str, str]]:
    """Names of the geom pairs MuJoCo's collision filter lets collide (any distance, any pose)."""
    m = copy.copy(model)
    m.geom_margin[:] = 1e6          # every admissible pair is "in contact" wherever the bodies are
    m.geom_gap[:] = 0.0
    m.opt.disableflags &= ~int(mujoco.mjtDisableBit.mjDSBL_CONTACT)
    data = mujoco.MjData(m)
    mujoco.mj_kinematics(m, data)
    mujoco.mj_collision(m, data)
    pairs = {tuple(sorted((int(c.geom1), int(c.geom2)))) for c in data.contact[: data.ncon]}
    name = lambda g: mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_GEOM, g) or f"geom{g}"  # noqa: E731
    return sorted((name(a), name(b)) for a, b in pairs)


def limited_joints(model: mujoco.MjModel) -> np.ndarray:
    """Indices of the hinge and slide joints that have limits."""
    scalar = (model.jnt_type == mujoco.mjtJoint.mjJNT_HINGE) | (model.jnt_type == mujoco.mjtJoint.mjJNT_SLIDE)
    return np.flatnonzero(scalar & model.jnt_limited.astype(bool))


def describe_pairs(pairs: list[tuple[str, str]], limit: int = 4) -> str:
    shown = ", ".join(f"{a}-{b}" for a, b in pairs[:limit])
    return shown + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")
