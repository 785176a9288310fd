"""Reality: batched reset/step in the engine, full-episode collection and rollouts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulators import Reality, make_engine
from simulators.dataset import SOURCE_REALITY


@pytest.fixture(scope="module")
def reality():
    return Reality("pendulum", engine="mujoco")


def test_reset_is_seeded_and_step_is_the_engine(reality):
    s = reality.reset(seed=3, n=8)
    assert s.shape == (8, 2)
    np.testing.assert_array_equal(s, reality.reset(seed=3, n=8))
    assert not np.array_equal(s, reality.reset(seed=4, n=8))
    a = np.linspace(-1, 1, 8)[:, None]
    np.testing.assert_array_equal(reality.step(s, a), make_engine("mujoco", "pendulum").step_vectors(s, a))


def test_pendulum_falls_from_rest_like_a_pendulum(reality):
    """A pendulum at rest near upright with zero torque speeds up away from the top (gravity)."""
    s = np.array([[0.1, 0.0], [-0.1, 0.0]])
    for _ in range(5):
        s = reality.step(s, np.zeros((2, 1)))
    assert s[0, 0] > 0.1 and s[0, 1] > 0 and s[1, 0] < -0.1 and s[1, 1] < 0
    np.testing.assert_allclose(s[0], -s[1], atol=1e-9)      # mirror symmetry


def test_params_change_the_physics():
    true = Reality("pendulum", engine="mujoco")
    heavy = Reality("pendulum", engine="mujoco", params={"mass_scale": 2.0})
    s, a = np.array([[1.0, 0.0]]), np.array([[1.0]])
    assert not np.allclose(true.step(s, a), heavy.step(s, a))
    with pytest.raises(ValueError, match="unknown physics parameter"):
        Reality("pendulum", engine="mujoco", params={"mass": 2.0})


def test_collect_records_full_episodes(reality):
    T = reality.task.episode_length
    data = reality.collect(None, n_steps=250, n_envs=2, seed=0, lap=2)
    n_eps = math.ceil(250 / T)
    assert len(data) == n_eps * T
    assert (data.source == SOURCE_REALITY).all() and (data.lap == 2).all()
    ids = np.unique(data.episode_ids)
    assert len(ids) == n_eps and ids.min() == 2_000_000
    for e in ids:
        rows = data.episode_ids == e
        np.testing.assert_array_equal(data.steps[rows], np.arange(T))
        np.testing.assert_array_equal(data.dones[rows], np.arange(T) == T - 1)
        np.testing.assert_array_equal(data.states[rows][1:], data.next_states[rows][:-1])
        assert not data.success[rows][:-1].any()
    assert (np.abs(data.actions) <= 1).all() and data.actions.std() > 0.3
    np.testing.assert_allclose(data.rewards["task"], reality.task.reward(data.next_states, data.actions), atol=1e-6)
    assert data.meta["task"] == "pendulum"
    with pytest.raises(ValueError, match="n_steps"):
        reality.collect(None, n_steps=0)


def test_rollout_with_a_policy(reality):
    seen = []

    def policy(obs):
        seen.append(obs.shape)
        return -np.clip(obs[:, 2:3], -1, 1)  # damp the swing

    ep = reality.rollout(policy, n_envs=4, seed=1)
    T = reality.task.episode_length
    assert ep.states.shape == (4, T + 1, 2) and ep.actions.shape == (4, T, 1) and ep.rewards.shape == (4, T)
    assert seen == [(4, 3)] * T
    np.testing.assert_array_equal(ep.success, reality.task.episode_success(ep.good))
    np.testing.assert_allclose(ep.returns, ep.rewards.sum(1))
    # the damping policy removes energy: the bob ends slower than it would swing freely
    free = reality.rollout(lambda o: np.zeros((len(o), 1)), n_envs=4, seed=1)
    assert np.abs(ep.states[:, -1, 1]).mean() < np.abs(free.states[:, -1, 1]).mean()


def test_a_balancing_policy_succeeds_in_reality(reality):
    """PD control from near upright keeps the pole up: success is computed from real states."""
    def pd(obs):
        theta = np.arctan2(obs[:, 1], obs[:, 0])
        return np.clip(-(3.0 * theta + 0.5 * obs[:, 2]), -1, 1)[:, None]

    ep = reality.rollout(pd, n_envs=64, seed=2)
    started_up = np.abs(ep.states[:, 0, 0]) < 0.3
    assert started_up.any() and ep.success[started_up].all()


def test_import_simulators_loads_neither_torch_nor_jax():
    import subprocess
    import sys

    code = ("import sys, simulators; simulators.Reality; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
