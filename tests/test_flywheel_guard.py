"""The model-exploitation guard on real MuJoCo physics: silent on honest data, firing on a world model that
hands out free energy, and its replay is what the engine really does."""

import numpy as np
import pytest

from flywheel.guard import complete_episodes, exploitation_gap
from simulators.dataset import TransitionDataset
from simulators.physics import make_engine
from simulators.reality import RandomPolicy, Reality
from simulators.tasks import make_task, wrap_angle


@pytest.fixture(scope="module")
def pendulum():
    reality = Reality("pendulum", engine="mujoco")
    data = reality.collect(RandomPolicy(reality.spec, 1.0, seed=3), n_steps=1600, n_envs=8, seed=3)
    return make_task("pendulum"), make_engine("mujoco", "pendulum"), data


def free_energy(task, engine, data: TransitionDataset) -> TransitionDataset:
    """The same episodes served by a world model that lifts the pole halfway to upright every step."""
    rows, T = complete_episodes(data, 10_000)
    out = data.select(np.arange(len(data)))
    s = data.states[rows[:, 0]].astype(np.float64)
    for t in range(T):
        out.states[rows[:, t]] = s
        s = engine.step_vectors(s, data.actions[rows[:, t]].astype(np.float64))
        s[:, 0] = 0.5 * wrap_angle(s[:, 0])                         # free energy: the pole rises by itself
        out.next_states[rows[:, t]] = s
    return out


def test_honest_episodes_show_no_gap(pendulum):
    task, engine, data = pendulum
    report = exploitation_gap(data, task, engine, max_episodes=16)
    assert report["episodes"] == 16 and abs(report["return_gap"]) < 1e-3
    replay = report["replay"]
    np.testing.assert_allclose(replay.next_states, data.select(complete_episodes(data, 16)[0].reshape(-1)).next_states,
                               atol=1e-3)


def test_a_world_model_with_free_energy_is_caught(pendulum):
    task, engine, data = pendulum
    exploited = free_energy(task, engine, data)
    report = exploitation_gap(exploited, task, engine, max_episodes=16)
    assert report["return_gap"] > 0.2                                # the default guard.threshold
    replay = report["replay"]
    first = complete_episodes(exploited, 16)[0][:, 0]
    expected = engine.step_vectors(exploited.states[first].astype(np.float64), exploited.actions[first].astype(np.float64))
    np.testing.assert_allclose(replay.next_states[:: 100], expected, atol=1e-5)   # the replay is the engine's


def test_incomplete_or_empty_data_gives_no_verdict(pendulum):
    task, engine, data = pendulum
    partial = data.select(data.steps > 0)                           # no episode starts at step 0
    assert exploitation_gap(partial, task, engine)["episodes"] == 0
    assert np.isnan(exploitation_gap(None, task, engine)["return_gap"])
