"""Pendulum swing-up and balance: a torque-limited pole, upright at angle 0.

The floor is scenery (it collides with nothing; the bob never reaches it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulators.tasks.base import Task, tolerance, wrap_angle, xp_of

XML = """
<mujoco model="pendulum">
  <compiler angle="radian"/>
  <option timestep="0.01"/>
  <worldbody>
    <geom name="floor" type="plane" pos="0 0 -0.6" size="2 2 0.1" contype="0" conaffinity="0"/>
    <body name="pole" pos="0 0 0">
      <joint name="hinge" type="hinge" axis="0 1 0" damping="0.05"/>
      <geom name="pole" type="capsule" fromto="0 0 0 0 0 0.5" size="0.02" mass="0.1" contype="0" conaffinity="0"/>
      <geom name="bob" type="sphere" pos="0 0 0.5" size="0.05" mass="1"/>
    </body>
  </worldbody>
  <actuator>
    <motor name="torque" joint="hinge" gear="6" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>
"""

UPRIGHT_TOLERANCE = 0.2  # rad: success
CENTRED = 0.1            # rad: the centring half of the reward is full within this (half the tolerance) ...
CENTERING_MARGIN = 0.6   # rad: ... and falls to 0.1 this far beyond it (0.94 at the tolerance, 0.87 at 0.25 rad)


@dataclass(frozen=True)
class Pendulum(Task):
    name: str = "pendulum"
    xml: str = XML
    n_substeps: int = 5                 # control dt 0.05 s
    episode_length: int = 100           # 5 s
    success_steps: int = 20             # last 20% upright
    observation_size: int = 3
    description: str = "swing the pole up from any angle and balance it within 0.2 rad"

    def initial_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        theta = rng.uniform(-math.pi, math.pi, size=n)
        omega = rng.uniform(-1.0, 1.0, size=n)
        return np.stack([theta, omega], axis=1)

    def observe(self, states):
        xp = xp_of(states)
        theta, omega = states[:, 0], states[:, 1]
        return xp.stack([xp.cos(theta), xp.sin(theta), omega], axis=1)

    def reward(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Half for being within the tolerance (a fall-off over pi outside it), half for being within half of it.

        Without the centring half every angle inside 0.2 rad pays the same, and policies settled at its edge
        (0.20-0.25 rad, issue 12), where success flips from lap to lap.
        """
        angle = np.abs(wrap_angle(states[:, 0]))
        upright = tolerance(angle, (0.0, UPRIGHT_TOLERANCE), margin=math.pi)
        centred = tolerance(angle, (0.0, CENTRED), margin=CENTERING_MARGIN)
        return (0.5 * upright + 0.5 * centred).astype(np.float32)

    def is_good(self, states: np.ndarray) -> np.ndarray:
        return np.abs(wrap_angle(states[:, 0])) < UPRIGHT_TOLERANCE
