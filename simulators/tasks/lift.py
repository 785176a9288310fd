"""Lift: a planar two-finger gripper picks a ball up from a table and holds it 5 cm above it.

The contact-rich task ("pick up a glass"): the ball rests on the table (contact and friction), the
fingertips squeeze it (friction is all that holds it up) and the fingers can press into the table.
Everything moves in the x-z plane: the ball slides in x and z and rolls about y; the palm slides in
x and z; each finger slides towards the other. The four actuators are force-limited position servos,
so an action is a target: palm x (+-0.2 m), palm height (+-0.1 m about its zero) and each finger's
closing (-1 = wide open, +1 = 3 cm past touching a centred ball, a squeeze of up to 5 N). The force
limits and damping keep the palm under ~0.7 m/s, so even bang-bang control interpenetrates by
less than a centimetre (soft contacts with a 0.01 s time constant).

Geometry: every collision is sphere-sphere or sphere-plane (fingertips, ball, table), whose
contacts MuJoCo's C engine and MJX compute identically; the finger links and the palm do not collide.
Stiff contacts (``solimp`` 0.99) keep a squeezed ball from creeping out of the grasp.

State ``[14]``: qpos ``ball_x, ball_z, ball_roll, palm_x, palm_z, left, right`` then their velocities.
``ball_z`` is the ball's height above resting on the table; the fingertips are at the ball's
centre height when ``palm_z == ball_z``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulators.tasks.base import Task, tolerance, xp_of

XML = """
<mujoco model="lift">
  <compiler angle="radian"/>
  <option timestep="0.005"/>
  <default>
    <geom friction="1 0.005 0.0001" solimp="0.99 0.999 0.001" solref="0.01 1"/>
  </default>
  <worldbody>
    <geom name="table" type="plane" size="0.5 0.5 0.05"/>
    <body name="ball" pos="0 0 0.03">
      <joint name="ball_x" type="slide" axis="1 0 0"/>
      <joint name="ball_z" type="slide" axis="0 0 1"/>
      <joint name="ball_roll" type="hinge" axis="0 1 0"/>
      <geom name="ball" type="sphere" size="0.03" mass="0.1"/>
    </body>
    <body name="palm" pos="0 0 0.15">
      <joint name="palm_x" type="slide" axis="1 0 0" limited="true" range="-0.25 0.25" damping="15"/>
      <joint name="palm_z" type="slide" axis="0 0 1" limited="true" range="-0.12 0.12" damping="15"/>
      <geom name="palm" type="box" size="0.07 0.02 0.01" mass="0.2" contype="0" conaffinity="0"/>
      <body name="left" pos="-0.042 0 -0.12">
        <joint name="left" type="slide" axis="1 0 0" limited="true" range="-0.035 0.02" damping="10"/>
        <geom name="left_link" type="capsule" fromto="0 0 0.012 0 0 0.11" size="0.006" mass="0.03"
              contype="0" conaffinity="0"/>
        <geom name="left_tip" type="sphere" size="0.012" mass="0.02"/>
      </body>
      <body name="right" pos="0.042 0 -0.12">
        <joint name="right" type="slide" axis="-1 0 0" limited="true" range="-0.035 0.02" damping="10"/>
        <geom name="right_link" type="capsule" fromto="0 0 0.012 0 0 0.11" size="0.006" mass="0.03"
              contype="0" conaffinity="0"/>
        <geom name="right_tip" type="sphere" size="0.012" mass="0.02"/>
      </body>
    </body>
  </worldbody>
  <contact>
    <exclude body1="left" body2="right"/>
  </contact>
  <actuator>
    <position name="palm_x" joint="palm_x" gear="5" kp="12" ctrlrange="-1 1" forcerange="-2 2"/>
    <position name="palm_z" joint="palm_z" gear="10" kp="3" ctrlrange="-1 1" forcerange="-1 1"/>
    <position name="left" joint="left" gear="33.3333" kp="0.27" ctrlrange="-1 1" forcerange="-0.15 0.15"/>
    <position name="right" joint="right" gear="33.3333" kp="0.27" ctrlrange="-1 1" forcerange="-0.15 0.15"/>
  </actuator>
</mujoco>
"""

BALL_RADIUS, TIP_RADIUS = 0.03, 0.012
TIP_OFFSET = BALL_RADIUS + TIP_RADIUS   # fingertip centre to palm centre (x) when a finger's joint is 0
LIFT_HEIGHT = 0.05                      # m above resting on the table
HOLD_GAP = 0.004                        # a fingertip within this of the ball's surface touches it (m)
BALL_X, BALL_Z, PALM_X, PALM_Z, LEFT, RIGHT = 0, 1, 3, 4, 5, 6


def grasp_error(states):
    """Ball centre minus the fingertips' midpoint, ``(dx, dz)`` in metres."""
    s = states
    dx = s[:, BALL_X] - s[:, PALM_X] - (s[:, LEFT] - s[:, RIGHT]) / 2
    dz = s[:, BALL_Z] - s[:, PALM_Z]
    return dx, dz


def finger_gaps(states):
    """Distance of each fingertip's surface from the ball's (m; < 0 pressing into it), ``(left, right)``."""
    s = states
    left = s[:, BALL_X] - s[:, PALM_X] - s[:, LEFT]
    right = s[:, PALM_X] - s[:, RIGHT] - s[:, BALL_X]
    return left, right


@dataclass(frozen=True)
class Lift(Task):
    name: str = "lift"
    xml: str = XML
    n_substeps: int = 4                 # control dt 0.02 s
    episode_length: int = 150           # 3 s
    success_steps: int = 25             # held above the height for the last 0.5 s
    observation_size: int = 15
    description: str = "a two-finger gripper picks a ball up from a table and holds it 5 cm above the table"

    def initial_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        s = np.zeros((n, 14))
        s[:, BALL_X] = rng.uniform(-0.05, 0.05, n)
        s[:, PALM_X] = rng.uniform(-0.1, 0.1, n)
        s[:, PALM_Z] = rng.uniform(0.05, 0.1, n)     # fingertips clear of the ball's top
        s[:, [LEFT, RIGHT]] = -0.03                   # open
        return s

    def observe(self, states):
        xp = xp_of(states)
        dx, dz = grasp_error(states)
        q = states[:, [BALL_X, BALL_Z, PALM_X, PALM_Z, LEFT, RIGHT]]
        return xp.concatenate([q, xp.stack([dx, dz], 1), states[:, 7:]], 1)

    def _held(self, states: np.ndarray) -> np.ndarray:
        dx, dz = grasp_error(states)
        left, right = finger_gaps(states)
        return (np.maximum(left, right) < HOLD_GAP) & (np.abs(dz) < 0.015)

    def reward(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        dx, dz = grasp_error(states)
        reach = tolerance(np.hypot(dx, dz), (0.0, 0.01), margin=0.1)
        left, right = finger_gaps(states)
        grip = tolerance(np.maximum(left, right), (-np.inf, HOLD_GAP), margin=0.03) * tolerance(dz, (-0.01, 0.01), 0.05)
        lifted = tolerance(states[:, BALL_Z], (LIFT_HEIGHT, np.inf), margin=LIFT_HEIGHT)
        return ((reach + grip + 2.0 * grip * lifted) / 4.0).astype(np.float32)

    def is_good(self, states: np.ndarray) -> np.ndarray:
        return (states[:, BALL_Z] > LIFT_HEIGHT) & self._held(states)
