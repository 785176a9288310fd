"""RLPF physics check against MuJoCo's C engine: the engine's own trajectories score 0, corruptions are named."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import rewards
import simulators
from simulators.tasks import Task

BALL_XML = """
<mujoco model="ball">
  <option timestep="0.01"/>
  <worldbody>
    <geom name="floor" type="plane" size="2 2 0.1"/>
    <body name="ball" pos="0 0 0">
      <joint name="z" type="slide" axis="0 0 1"/>
      <geom name="ball" type="sphere" size="0.1" mass="1"/>
    </body>
  </worldbody>
  <actuator>
    <motor name="push" joint="z" gear="5" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>
"""


@dataclass(frozen=True)
class Ball(Task):
    """A ball dropped on a floor (contacts, bounces): z is its height, 0.1 = resting on the floor."""

    name: str = "ball"
    xml: str = BALL_XML
    n_substeps: int = 2
    episode_length: int = 100
    observation_size: int = 2

    def initial_states(self, rng, n):
        return np.stack([rng.uniform(0.3, 1.0, n), rng.uniform(-1.0, 1.0, n)], axis=1)

    def observe(self, states):
        return states

    def reward(self, states, actions):
        return np.zeros(len(states), np.float32)

    def is_good(self, states):
        return np.zeros(len(states), bool)


def engine_windows(engine, n_envs=64, horizon=5, steps=100, seed=0, bang=False):
    """Windows ``(start, actions, next states)`` of the engine's own trajectories from random actions."""
    spec = engine.spec
    rng = np.random.default_rng(seed)
    s = engine.to_vector(engine.reset(seed, n_envs))
    states, acts = [s], []
    for _ in range(steps):
        a = rng.uniform(spec.action_low, spec.action_high, size=(n_envs, spec.action_size))
        a = np.sign(a) if bang else a
        s = engine.step_vectors(s, a)
        states.append(s)
        acts.append(a)
    X, A = np.stack(states, 1), np.stack(acts, 1)
    t0 = np.arange(0, steps - horizon + 1, horizon)  # tumbling windows over the whole episode
    start = X[:, t0].reshape(-1, spec.state_size)
    actions = np.stack([A[:, t0 + k] for k in range(horizon)], 2).reshape(-1, horizon, spec.action_size)
    imagined = np.stack([X[:, t0 + k + 1] for k in range(horizon)], 2).reshape(-1, horizon, spec.state_size)
    return start, actions, imagined


@pytest.fixture(scope="module")
def engines():
    out = {name: simulators.make_engine("mujoco", name) for name in ("pendulum", "cartpole")}
    out["ball"] = simulators.make_engine("mujoco", Ball())
    return out


@pytest.mark.parametrize("name,bang", [("pendulum", False), ("pendulum", True), ("cartpole", False),
                                       ("cartpole", True), ("ball", False), ("ball", True)])
def test_engine_trajectories_score_zero(engines, name, bang):
    engine = engines[name]
    start, actions, imagined = engine_windows(engine, bang=bang)
    rep = rewards.physics_violation(engine, start, actions, imagined)
    assert not rep.violates.any(), [rep.reasons(i) for i in np.flatnonzero(rep.violates)[:5]]
    assert rep.per_transition.max() < 1e-9                # every component is measured against the engine's step
    assert np.abs(rep.raw["residual"]).max() < 1e-9       # the same engine from the same state
    assert rep.reward.min() > -0.5
    assert set(rep.components) == set(rewards.COMPONENTS)
    assert rep.components["kinematic"].shape == imagined.shape[:2]


def test_contacts_happen_in_ball_trajectories(engines):
    """The ball calibration exercises contacts: it reaches the floor and bounces."""
    engine = engines["ball"]
    _, _, imagined = engine_windows(engine, bang=True)
    z, vz = imagined[..., 0], imagined[..., 1]
    assert z.min() < 0.1 and (vz > 0.5).any()


def clean(engines, name, n=8):
    engine = engines[name]
    start, actions, imagined = engine_windows(engine, n_envs=n, steps=10)
    return engine, start, actions, imagined.copy()


def test_teleport_is_kinematic(engines):
    engine, start, actions, imagined = clean(engines, "pendulum")
    imagined[0, 2, 0] = imagined[0, 1, 0] + 0.5     # position jump ...
    imagined[0, 2, 1] = 0.0                         # ... with zero velocity
    imagined[0, 1, 1] = 0.0
    rep = rewards.physics_violation(engine, start, actions, imagined)
    assert rep.violates.tolist() == [True] + [False] * (len(start) - 1)
    assert "kinematic" in rep.reasons(0)
    assert rep.components["kinematic"][0, 2] > 10
    assert rep.reasons(1) == []
    assert rep.reward[0] < -0.9


def test_body_through_floor_is_penetration(engines):
    engine, start, actions, imagined = clean(engines, "ball")
    imagined[3, 4, 0] = -0.2                        # the ball's centre 0.2 m under the floor
    rep = rewards.physics_violation(engine, start, actions, imagined)
    assert rep.violates[3] and rep.violates.sum() == 1
    assert "penetration" in rep.reasons(3)
    assert rep.raw["penetration"][3, 4] == pytest.approx(0.3, abs=0.01)   # radius 0.1 + 0.2, less the engine's own
    assert rep.components["penetration"][3, :4].max() < 1.0


def test_joint_past_limit_is_joint_limit(engines):
    engine, start, actions, imagined = clean(engines, "cartpole")
    imagined[2, 3, 0] = 2.0                         # slider limit is 1.8 m
    rep = rewards.physics_violation(engine, start, actions, imagined)
    assert rep.violates[2] and rep.violates.sum() == 1
    assert "joint_limit" in rep.reasons(2)
    assert rep.raw["joint_limit"][2, 3] == pytest.approx(0.2, abs=1e-9)


def test_velocity_disagreeing_with_motion_is_kinematic(engines):
    engine, start, actions, imagined = clean(engines, "pendulum")
    imagined[:, :, 1] += 5.0                        # every velocity 5 rad/s off the change of angle
    rep = rewards.physics_violation(engine, start, actions, imagined)
    assert rep.fired()["kinematic"].all()
    assert all("kinematic" in rep.reasons(i) for i in range(len(start)))


def test_nan_is_flagged_without_crashing(engines):
    engine, start, actions, imagined = clean(engines, "cartpole")
    base = rewards.physics_violation(engine, start, actions, imagined)
    imagined[1, 2, 3] = np.nan
    imagined[4, 0, :] = np.inf
    rep = rewards.physics_violation(engine, start, actions, imagined)
    assert rep.violates.tolist() == [i in (1, 4) for i in range(len(start))]
    assert rep.reasons(1) == ["nonfinite"] and rep.reasons(4) == ["nonfinite"]
    assert rep.raw["nonfinite"][1].tolist() == [0, 0, 1, 1, 0]          # s' then s of the next transition
    assert np.isfinite(rep.per_window).all() and np.isfinite(rep.reward).all()
    others = [i for i in range(len(start)) if i not in (1, 4)]
    np.testing.assert_allclose(rep.per_window[others], base.per_window[others])



@pytest.mark.parametrize("value", [1.1e10, 1e20, -1e30])
def test_a_state_past_mujocos_range_is_flagged_not_reset_to_rest(engines, value):
    """MuJoCo resets a state past mjMAXVAL (1e10) to its rest pose: stepping it would 'confirm' a jump to rest."""
    engine = engines["pendulum"]
    start = np.array([[value, 0.0], [0.0, value], [1e9, 0.0]])       # 1e9: absurd but steppable, judged as usual
    rest = np.zeros((3, 1, 2))                                        # the imagined next state: the rest pose
    rep = rewards.physics_violation(engine, start, np.zeros((3, 1, 1)), rest)
    assert rep.violates.tolist() == [True, True, True]
    assert rep.raw["nonfinite"][:, 0].tolist() == [1.0, 1.0, 0.0]
    assert rep.reasons(0) == ["nonfinite"] and rep.reasons(1) == ["nonfinite"] and "nonfinite" not in rep.reasons(2)
    assert np.isfinite(rep.per_window).all()

def test_whole_turn_of_a_free_hinge_is_not_a_violation(engines):
    engine, start, actions, imagined = clean(engines, "pendulum")
    imagined[:, 2:, 0] += 2 * np.pi
    rep = rewards.physics_violation(engine, start, actions, imagined)
    assert not rep.violates.any()
    assert rep.per_transition.max() < 0.5


def test_residual_is_normalised_by_scale(engines):
    engine, start, actions, imagined = clean(engines, "pendulum")
    imagined[:, :, 1] += 0.05 * 2                   # velocity off by 0.1 rad/s everywhere
    r1 = rewards.physics_violation(engine, start, actions, imagined, scale=np.array([1.0, 1.0]))
    r10 = rewards.physics_violation(engine, start, actions, imagined, scale=np.array([1.0, 10.0]))
    np.testing.assert_allclose(r1.raw["residual"][:, 0], 0.1 / np.sqrt(2), rtol=1e-9)
    np.testing.assert_allclose(r10.raw["residual"][:, 0], 0.01 / np.sqrt(2), rtol=1e-9)


def test_tolerances_come_from_config(engines):
    engine, start, actions, imagined = clean(engines, "cartpole")
    imagined[0, 0, 0] = 1.83                        # 3 cm past the slider limit
    loose = rewards.physics_violation(engine, start, actions, imagined,
                                      rewards.RewardConfig(tolerances=rewards.Tolerances(joint_limit=0.1, kinematic=10.0)))
    strict = rewards.physics_violation(engine, start, actions, imagined)
    assert loose.components["joint_limit"][0, 0] == pytest.approx(0.3)
    assert strict.components["joint_limit"][0, 0] == pytest.approx(3.0)
    assert "joint_limit" not in loose.reasons(0) and "joint_limit" in strict.reasons(0)


@pytest.mark.parametrize("name", ["pendulum", "cartpole"])
def test_kinematic_check_has_no_slack_and_spares_smooth_dynamics_errors(engines, name):
    """A jump just over the tolerance is flagged and one just under is not; a wrong force held over the
    control step (what a world model gets wrong) moves position and velocity consistently: residual only."""
    engine, start, actions, imagined = clean(engines, name)
    tol = rewards.Tolerances().kinematic
    for factor, flagged in ((1.01, True), (0.99, False)):
        jumped = imagined.copy()
        jumped[:, 0, 0] += factor * tol
        rep = rewards.physics_violation(engine, start, actions, jumped)
        assert rep.components["kinematic"][:, 0] == pytest.approx(factor, rel=1e-6)
        assert rep.fired()["kinematic"].all() == flagged
    n, h = engine.task.n_substeps, engine.spec.control_dt / engine.task.n_substeps
    forced = imagined.copy()
    dv = 3.0                                        # velocity off by 3 units after the step ...
    forced[:, 0, engine.spec.nq] += dv
    forced[:, 0, 0] += h * (n + 1) / 2 * dv         # ... and the position by what that force would give
    rep = rewards.physics_violation(engine, start, actions, forced)
    assert rep.components["kinematic"][:, 0].max() < 1e-6 and rep.fired()["residual"].all()


class CountingEngine:
    """Wraps an engine and records the batch sizes of its calls."""

    def __init__(self, engine, name="mujoco"):
        self.engine, self.calls, self.name = engine, [], name
        self.spec, self.task, self.model = engine.spec, engine.task, engine.model

    def step_vectors(self, states, actions):
        self.calls.append(("step_vectors", len(states)))
        return self.engine.step_vectors(states, actions)

    def from_vector(self, vec):
        return self.engine.from_vector(vec)

    def vector_constraints(self, states):
        self.calls.append(("constraints", len(states)))
        return self.engine.vector_constraints(states)


def test_one_engine_call_for_the_whole_batch(engines):
    engine = CountingEngine(engines["cartpole"])
    start, actions, imagined = engine_windows(engines["cartpole"], n_envs=16, steps=20)
    imagined[0, 0, 0] = np.nan
    rewards.physics_violation(engine, start, actions, imagined)
    n = imagined.shape[0] * imagined.shape[1]
    assert engine.calls == [("step_vectors", n), ("constraints", 2 * n)]   # imagined and stepped together


def test_jit_engines_get_power_of_two_batches(engines):
    """A JAX engine compiles per batch shape: the check pads B*H to a power of two (results unchanged)."""
    start, actions, imagined = engine_windows(engines["cartpole"], n_envs=13, steps=10)
    plain = rewards.physics_violation(engines["cartpole"], start, actions, imagined)
    engine = CountingEngine(engines["cartpole"], name="mjx")
    imagined[0, 1, 0] = 2.5
    padded = rewards.physics_violation(engine, start, actions, imagined)
    assert engine.calls == [("step_vectors", 256), ("constraints", 512)]  # 26 x 5 = 130 -> 256, imagined and stepped
    assert padded.per_transition.shape == (26, 5)
    assert "joint_limit" in padded.reasons(0)
    np.testing.assert_allclose(padded.per_window[1:], plain.per_window[1:])


def test_bad_shapes_are_errors(engines):
    engine, start, actions, imagined = clean(engines, "cartpole")
    with pytest.raises(ValueError, match=r"imagined has shape .* expected \(batch, horizon >= 1, 4\)"):
        rewards.physics_violation(engine, start, actions, imagined[..., :3])
    with pytest.raises(ValueError, match="start has shape"):
        rewards.physics_violation(engine, start[:-1], actions, imagined)
    with pytest.raises(ValueError, match="actions have shape"):
        rewards.physics_violation(engine, start, actions[:, :-1], imagined)
    with pytest.raises(ValueError, match="scale"):
        rewards.physics_violation(engine, start, actions, imagined, scale=np.array([1.0, np.nan, 1.0, 1.0]))
