"""Reacher: a two-link planar arm brings its fingertip to a random target.

The target is part of the state (two stacked slide joints that no force moves), so a state vector
fully describes an episode and the world model sees the goal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulators.tasks.base import Task, tolerance, xp_of

XML = """
<mujoco model="reacher">
  <compiler angle="radian"/>
  <option timestep="0.02" gravity="0 0 0"/>
  <worldbody>
    <geom name="ground" type="plane" pos="0 0 0" size="0.4 0.4 0.1" contype="0" conaffinity="0"/>
    <body name="arm" pos="0 0 0.02">
      <joint name="shoulder" type="hinge" axis="0 0 1" damping="0.01"/>
      <geom name="upper" type="capsule" fromto="0 0 0 0.12 0 0" size="0.01" mass="0.1" contype="0" conaffinity="0"/>
      <body name="hand" pos="0.12 0 0">
        <joint name="wrist" type="hinge" axis="0 0 1" damping="0.01"/>
        <geom name="lower" type="capsule" fromto="0 0 0 0.1 0 0" size="0.01" mass="0.1" contype="0" conaffinity="0"/>
        <geom name="fingertip" type="sphere" pos="0.11 0 0" size="0.01" mass="0.01" contype="0" conaffinity="0"/>
      </body>
    </body>
    <body name="target_rail" pos="0 0 0.02">
      <joint name="target_x" type="slide" axis="1 0 0" damping="0"/>
      <geom name="target_rail" type="sphere" size="0.005" mass="0.01" contype="0" conaffinity="0"/>
      <body name="target" pos="0 0 0">
        <joint name="target_y" type="slide" axis="0 1 0" damping="0"/>
        <geom name="target" type="sphere" size="0.05" mass="0.01" contype="0" conaffinity="0"/>
      </body>
    </body>
  </worldbody>
  <actuator>
    <motor name="shoulder" joint="shoulder" gear="0.05" ctrlrange="-1 1" ctrllimited="true"/>
    <motor name="wrist" joint="wrist" gear="0.05" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>
"""

UPPER, LOWER = 0.12, 0.11  # shoulder->wrist, wrist->fingertip (m)
TARGET_RADIUS = 0.05
CENTRED = 0.025          # m: the centring half of the reward is full within this (half the target's radius) ...
CENTERING_MARGIN = 0.075  # m: ... and falls to 0.1 this far beyond it (0.77 at the target's radius)


def fingertip(states):
    """Fingertip (x, y) of state vectors ``[B, 8]`` by forward kinematics."""
    xp = xp_of(states)
    q1, q2 = states[:, 0], states[:, 1]
    x = UPPER * xp.cos(q1) + LOWER * xp.cos(q1 + q2)
    y = UPPER * xp.sin(q1) + LOWER * xp.sin(q1 + q2)
    return x, y


@dataclass(frozen=True)
class Reacher(Task):
    name: str = "reacher"
    xml: str = XML
    n_substeps: int = 1                 # control dt 0.02 s
    episode_length: int = 100           # 2 s
    success_steps: int = 1              # fingertip in the target at the end
    observation_size: int = 10
    description: str = "bring the fingertip of a 2-link arm within 5 cm of a random target"

    def initial_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        q = np.stack([rng.uniform(-math.pi, math.pi, n), rng.uniform(-2.5, 2.5, n)], axis=1)
        radius = rng.uniform(0.05, 0.2, n)
        angle = rng.uniform(-math.pi, math.pi, n)
        target = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        return np.concatenate([q, target, np.zeros((n, 4))], axis=1)

    def observe(self, states):
        xp = xp_of(states)
        q1, q2, tx, ty, w1, w2 = (states[:, i] for i in (0, 1, 2, 3, 4, 5))
        fx, fy = fingertip(states)
        return xp.stack([xp.cos(q1), xp.sin(q1), xp.cos(q2), xp.sin(q2), tx, ty, tx - fx, ty - fy, w1, w2], axis=1)

    def _distance(self, states: np.ndarray) -> np.ndarray:
        fx, fy = fingertip(states)
        return np.hypot(states[:, 2] - fx, states[:, 3] - fy)

    def reward(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Half for touching the target (a fall-off over 0.3 m outside it), half for being within half its radius.

        Without the centring half every point inside the target pays the same, so nothing keeps the fingertip
        off the rim, where success at the final step is a coin flip.
        """
        d = self._distance(states)
        touching = tolerance(d, (0.0, TARGET_RADIUS), margin=0.3)
        centred = tolerance(d, (0.0, CENTRED), margin=CENTERING_MARGIN)
        return (0.5 * touching + 0.5 * centred).astype(np.float32)

    def is_good(self, states: np.ndarray) -> np.ndarray:
        return self._distance(states) < TARGET_RADIUS
