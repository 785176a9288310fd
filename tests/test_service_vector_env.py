"""``RemoteVectorEnv`` over a real server process and ``LocalVectorEnv``: gymnasium checks and equality."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import DictInfoToList, NormalizeObservation, RecordEpisodeStatistics

from services import LocalVectorEnv, RemoteVectorEnv
from services.vector_env import normalized_space, unsquash
from simulators import make_task

TASK, B = "pendulum", 3
T = make_task(TASK).episode_length


@pytest.fixture(scope="module")
def setup(pendulum_server):
    return pendulum_server


def remote(setup, **kw):
    return RemoteVectorEnv(setup["address"], TASK, B, **{"fidelity": 0.5, "seed": 0, **kw})


def local(setup, **kw):
    return LocalVectorEnv(TASK, B, config=setup["config"], **{"fidelity": 0.5, "seed": 0, **kw})


def actions(t: int) -> np.ndarray:
    return np.random.default_rng(t).uniform(-1, 1, (B, 1)).astype(np.float32)


def test_spaces_and_metadata(setup):
    env = remote(setup)
    spec = setup["spec"]
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert isinstance(env.single_action_space, gym.spaces.Box) and env.single_action_space.dtype == np.float32
    np.testing.assert_array_equal(env.single_action_space.low, spec.action_low)
    np.testing.assert_array_equal(env.single_action_space.high, spec.action_high)
    assert env.action_space.shape == (B, spec.action_size)
    assert env.single_observation_space.shape == (spec.observation_size,)
    assert env.observation_space.shape == (B, spec.observation_size)
    env.close()


@pytest.mark.parametrize("make", [remote, local], ids=["remote", "local"])
def test_checks_a_gymnasium_user_runs(setup, make):
    env = make(setup)
    obs, info = env.reset(seed=123)
    assert isinstance(info, dict) and obs.dtype == np.float32 and env.observation_space.contains(obs)
    obs2, _ = env.reset(seed=123)
    assert data_equivalence(obs, obs2), "reset(seed) must be deterministic"
    env.action_space.seed(0)
    a = env.action_space.sample()
    first = env.step(a)
    env.reset(seed=123)
    again = env.step(a)
    strip = lambda out: (*out[:4], {k: v for k, v in out[4].items() if "episode_id" not in k})
    assert data_equivalence(strip(first), strip(again)), "step after reset(seed) must be deterministic"
    assert not set(first[4]["episode_id"]) & set(again[4]["episode_id"]), "episode ids are never reused"
    obs, reward, terminated, truncated, info = first
    assert env.observation_space.contains(obs)
    assert reward.shape == (B,) and reward.dtype == np.float32
    assert terminated.dtype == bool and truncated.dtype == bool and terminated.shape == truncated.shape == (B,)
    for key in ("reward/task", "reward/imagination", "reward/physics", "reward/total", "success", "episode_id"):
        assert info[key].shape == (B,) and info[f"_{key}"].shape == (B,)
    np.testing.assert_allclose(info["reward/total"], reward)
    with pytest.raises(ValueError, match=r"actions have shape \(3, 2\), expected \(3, 1\)"):
        env.step(np.zeros((B, 2), np.float32))
    with pytest.raises(ValueError, match="non-finite action"):
        env.step(np.full((B, 1), np.nan, np.float32))
    env.close()
    assert env.closed


def test_remote_equals_local_and_autoresets_on_the_next_step(setup):
    envs = [remote(setup), local(setup)]
    outs = [[env.reset(seed=4)[0]] for env in envs]
    sim_states = []                                          # the in-process simulator's states after each step
    for t in range(T + 3):
        for env, out in zip(envs, outs):
            out.append(env.step(actions(t)))
        sim_states.append(envs[1].session.sim.states.copy())
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        for x, y in zip(a[:4], b[:4]):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
        for key in (k for k in a[4] if k != "episode_id"):   # ids come from disjoint per-server blocks
            np.testing.assert_allclose(a[4][key], b[4][key], rtol=1e-6, atol=1e-6)
    steps = outs[0][1:]
    for t in range(T - 1):
        assert not steps[t][3].any()
    obs_end, _, _, truncated, info_end = steps[T - 1]
    assert truncated.all() and info_end["_success"].all()            # every episode ends at its length
    obs_reset, reward_reset, term_r, trunc_r, info_reset = steps[T]  # next step: the reset observation
    assert (reward_reset == 0).all() and not term_r.any() and not trunc_r.any()
    assert not info_reset["_reward/total"].any() and not info_reset["_success"].any()
    assert not np.allclose(obs_reset, obs_end)
    # the reset observation is the fresh initial state itself: held envs did not move under the ignored action
    np.testing.assert_array_equal(sim_states[T], sim_states[T - 1])
    task = envs[1].session.sim.task
    np.testing.assert_allclose(obs_reset, task.observe(sim_states[T - 1]), rtol=1e-6)
    assert (np.abs(sim_states[T - 1][:, 1]) <= 1.0).all()    # pendulum's initial angular speed is within +-1
    assert info_reset["_reward/total"].sum() == 0 and steps[T + 1][4]["_reward/total"].all()
    assert (steps[T + 1][4]["episode_id"] != info_end["episode_id"]).all()
    for env in envs:
        env.close()


def test_composes_with_gymnasium_wrappers_and_make_vec(setup):
    gym.register("FlywheelRemote-v0", vector_entry_point=lambda num_envs, **kw: RemoteVectorEnv(
        setup["address"], TASK, num_envs, fidelity=1.0, seed=0))
    env = gym.make_vec("FlywheelRemote-v0", num_envs=2, vectorization_mode="vector_entry_point")
    env = DictInfoToList(RecordEpisodeStatistics(NormalizeObservation(env)))
    obs, infos = env.reset(seed=0)
    assert obs.shape == (2, 3) and [set(i) for i in infos] == [{"episode_id"}, {"episode_id"}]
    assert infos[0]["episode_id"] != infos[1]["episode_id"]
    for _ in range(T + 1):
        _obs, _reward, _terminated, _truncated, infos = env.step(env.action_space.sample())
    assert "episode" not in infos[0] and "reward/task" not in infos[0]  # the reset step carries no terms
    env.close()


@pytest.mark.parametrize("make", [remote, local], ids=["remote", "local"])
def test_per_env_seeds_reset_mask_episode_ids_and_closed_envs(setup, make):
    env = make(setup)
    a, info = env.reset(seed=[5, 6, 7])
    b, _ = env.reset(seed=[5, 6, 7])
    c, _ = env.reset(seed=[5, 6, 8])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(env.reset(seed=[9, 9, 9])[0], env.reset(seed=9)[0])   # equal seeds: that seed
    with pytest.raises(ValueError, match="one per env: got 2 for 3 envs"):
        env.reset(seed=[1, 2])
    ids = info["episode_id"]
    assert info["_episode_id"].all() and len(set(ids.tolist())) == B
    obs, info = env.reset(options={"reset_mask": np.ones(B, bool)})
    _, _, _, _, step_info = env.step(actions(0))
    np.testing.assert_array_equal(step_info["episode_id"], info["episode_id"])     # the episodes the reset started
    with pytest.raises(ValueError, match="reset_mask resetting only some envs is not supported"):
        env.reset(options={"reset_mask": np.array([True, False, True])})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"bogus": 1})
    env.close()
    with pytest.raises(RuntimeError, match="is closed"):
        env.step(actions(1))
    with pytest.raises(RuntimeError, match="is closed"):
        env.reset()


@pytest.mark.parametrize("make", [remote, local], ids=["remote", "local"])
def test_normalized_actions_are_rllibs_unsquash_for_the_whole_batch(setup, make):
    from ray.rllib.utils.spaces.space_utils import unsquash_action  # RLlib's map, one env at a time

    spec = setup["spec"]
    physical, normalized = make(setup), make(setup, normalized_actions=True)
    assert normalized.single_action_space == gym.spaces.Box(-1.0, 1.0, (spec.action_size,), np.float32)
    assert normalized.physical_action_space == physical.single_action_space == physical.physical_action_space
    assert normalized.action_space.shape == (B, spec.action_size)
    physical.reset(seed=2)
    normalized.reset(seed=2)
    rng, clipped = np.random.default_rng(5), 0
    for _ in range(12):
        a = rng.normal(0.0, 1.5, (B, spec.action_size)).astype(np.float32)     # a third beyond [-1, 1]
        mapped = np.stack([unsquash_action(row, physical.single_action_space) for row in a])
        np.testing.assert_array_equal(unsquash(a, physical.single_action_space), mapped)   # bit for bit
        for x, y in zip(physical.step(mapped)[:4], normalized.step(a)[:4]):
            np.testing.assert_array_equal(x, y)
        clipped += int(((mapped == spec.action_low) | (mapped == spec.action_high)).sum())
    assert clipped > 5                                                           # beyond [-1, 1]: at the bounds
    with pytest.raises(ValueError, match="non-finite action in env"):
        normalized.step(np.full((B, spec.action_size), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"expected \(3, 1\)"):
        normalized.step(np.zeros((B, 2), np.float32))
    physical.close()
    normalized.close()


def test_unsquash_is_rllibs_map_bit_for_bit_on_any_bounds():
    from ray.rllib.utils.spaces.space_utils import unsquash_action

    space = gym.spaces.Box(np.array([-2.0, 0.5, -1e-3], np.float32), np.array([3.0, 4.0, 7.5], np.float32))
    a = np.random.default_rng(0).normal(0.0, 1.5, (500, 3)).astype(np.float32)
    out = unsquash(a, space)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.stack([unsquash_action(row, space) for row in a]))
    assert all(space.contains(row) for row in out)
    half_open = gym.spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, np.inf], np.float32))
    b = a[:, :2]
    np.testing.assert_array_equal(unsquash(b, half_open), np.stack([unsquash_action(row, half_open) for row in b]))
    assert normalized_space(half_open) is half_open and normalized_space(space).low.tolist() == [-1.0] * 3


def test_observation_bounds_where_the_task_declares_them(setup):
    from dataclasses import dataclass

    from services.session import observation_bounds
    from simulators.tasks.pendulum import Pendulum

    @dataclass(frozen=True)
    class BoundedPendulum(Pendulum):
        observation_low: tuple = (-1.0, -1.0, None)
        observation_high: tuple = (1.0, 1.0, None)

    low, high = observation_bounds(BoundedPendulum(), 3)
    np.testing.assert_array_equal(low, [-1, -1, -np.inf])
    np.testing.assert_array_equal(high, [1, 1, np.inf])
    low, high = observation_bounds(make_task(TASK), 3)                 # the task does not say: unbounded
    env = remote(setup)
    np.testing.assert_array_equal(env.single_observation_space.low, low)
    np.testing.assert_array_equal(env.single_observation_space.high, high)
    env.close()
