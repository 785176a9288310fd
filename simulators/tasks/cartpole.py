"""Cartpole swing-up: a cart on a rail with an unactuated pole that starts hanging down.

The floor and walls are scenery (they collide with nothing): the slider's limit stops the cart first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulators.tasks.base import Task, tolerance, wrap_angle, xp_of

XML = """
<mujoco model="cartpole">
  <compiler angle="radian"/>
  <option timestep="0.01"/>
  <worldbody>
    <geom name="floor" type="plane" pos="0 0 0" size="3 1 0.1" contype="0" conaffinity="0"/>
    <geom name="wall_left" type="plane" pos="-2.2 0 1" zaxis="1 0 0" size="1 1 0.1" contype="0" conaffinity="0"/>
    <geom name="wall_right" type="plane" pos="2.2 0 1" zaxis="-1 0 0" size="1 1 0.1" contype="0" conaffinity="0"/>
    <body name="cart" pos="0 0 1">
      <joint name="slider" type="slide" axis="1 0 0" limited="true" range="-1.8 1.8" damping="0.05"/>
      <geom name="cart" type="capsule" fromto="-0.2 0 0 0.2 0 0" size="0.1" mass="1"/>
      <body name="pole" pos="0 0 0">
        <joint name="hinge" type="hinge" axis="0 1 0" damping="0.002"/>
        <geom name="pole" type="capsule" fromto="0 0 0 0 0 0.6" size="0.03" mass="0.1" contype="0" conaffinity="0"/>
      </body>
    </body>
  </worldbody>
  <actuator>
    <motor name="slide" joint="slider" gear="10" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>
"""

UPRIGHT_TOLERANCE = 0.2  # rad: success
CENTRED = 0.1            # rad: the centring half of the upright term is full within this (half the tolerance) ...
CENTERING_MARGIN = 0.6   # rad: ... and falls to 0.1 this far beyond it (0.94 at the tolerance)
CART_BOUND = 1.5  # m


@dataclass(frozen=True)
class Cartpole(Task):
    name: str = "cartpole"
    xml: str = XML
    n_substeps: int = 2                 # control dt 0.02 s
    episode_length: int = 200           # 4 s
    success_steps: int = 40             # last 20% upright with the cart in bounds
    observation_size: int = 5
    description: str = "swing the hanging pole up and balance it with the cart inside +-1.5 m"

    def initial_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.uniform(-0.1, 0.1, size=n)
        theta = math.pi + rng.uniform(-0.1, 0.1, size=n)
        v = rng.uniform(-0.05, 0.05, size=(n, 2))
        return np.stack([x, theta, v[:, 0], v[:, 1]], axis=1)

    def observe(self, states):
        xp = xp_of(states)
        x, theta, v, omega = (states[:, i] for i in range(4))
        return xp.stack([x, xp.cos(theta), xp.sin(theta), v, omega], axis=1)

    def reward(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Upright (half height, half within half the tolerance) x cart centred x pole slow, in [0, 1].

        Height alone, (cos + 1) / 2, is 0.99 at 0.2 rad: it barely tells a balance inside the tolerance from
        a wobble past it.
        """
        angle = np.abs(wrap_angle(states[:, 1]))
        upright = 0.5 * (np.cos(angle) + 1.0) / 2.0 + 0.5 * tolerance(angle, (0.0, CENTRED), margin=CENTERING_MARGIN)
        centered = (1.0 + tolerance(states[:, 0], (-0.25, 0.25), margin=2.0)) / 2.0
        small_velocity = (1.0 + tolerance(states[:, 3], (-1.0, 1.0), margin=5.0)) / 2.0
        return (upright * centered * small_velocity).astype(np.float32)

    def is_good(self, states: np.ndarray) -> np.ndarray:
        upright = np.abs(wrap_angle(states[:, 1])) < UPRIGHT_TOLERANCE
        return upright & (np.abs(states[:, 0]) < CART_BOUND)
