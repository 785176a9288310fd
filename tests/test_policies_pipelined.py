"""The pipelined sampler (``EnvConfig.lanes=2``) in RLlib's EnvRunner against a real server: the data RLlib's
own loop would give (whole episodes of the task's length, counts, model outputs), PPO training, and lanes as
separate sessions on one channel."""

import os
import signal

import gymnasium as gym
import numpy as np
import pytest
import ray
from ray.rllib.core.columns import Columns

from policies import EnvConfig, PolicyTrainer, ppo_config_for
from services.config import ServerConfig
from services.lanes import LanedVectorEnv
from services.server import ServerProcess
from simulators import make_task

T = make_task("pendulum").episode_length
ENVS = 6


@pytest.fixture(scope="module")
def trainer():
    with ServerProcess(ServerConfig(task="pendulum", engine="mujoco")) as server:
        ppo = ppo_config_for("pendulum", num_env_runners=0, num_envs_per_runner=ENVS, train_batch_size=600,
                             minibatch_size=100, num_epochs=1)
        t = PolicyTrainer(ppo, EnvConfig(task="pendulum", addresses=[server.address], lanes=2), num_cpus=2)
        yield t
        t.stop()
        ray.shutdown()


def runner(trainer):
    return trainer.algo.env_runner_group.local_env_runner


def test_the_runner_steps_two_sessions_on_one_channel(trainer):
    env = runner(trainer).env.unwrapped
    assert isinstance(env, LanedVectorEnv) and env.bounds == [(0, 3), (3, 6)]
    assert env.lanes[0].client is env.lanes[1].client
    assert env.lanes[0].session.id != env.lanes[1].session.id


def test_samples_hold_whole_episodes_and_the_steps_asked_for(trainer):
    r = runner(trainer)
    r.sample(num_timesteps=30)                               # the runner may sample once synced (PolicyTrainer did)
    episodes = r.sample(num_timesteps=T * ENVS + 10)         # every env passes an episode end (next-step reset)
    steps = sum(len(e) for e in episodes)
    assert T * ENVS + 10 <= steps < T * ENVS + 10 + ENVS     # RLlib's bound: fewer than num_envs over
    done = [e for e in episodes if e.is_done]
    assert len(done) >= ENVS and all(len(e) + e.t_started == T and e.is_truncated for e in done)
    assert len({e.id_ for e in episodes}) == len(episodes)
    for e in episodes:
        assert len(e.get_observations()) == len(e) + 1
        assert np.isfinite(e.get_rewards()).all() and np.isfinite(e.get_actions()).all()
        assert len(e.get_extra_model_outputs(Columns.ACTION_LOGP)) == len(e)
    starts = [e.get_observations(0) for e in done if e.t_started == 0]
    assert len({tuple(np.round(o, 6)) for o in starts}) == len(starts)   # lanes do not repeat each other's seeds


@pytest.mark.parametrize("loop", ["pipelined", "rllib"])
def test_every_sampled_action_reaches_the_server_as_rllibs_unsquash(trainer, loop, monkeypatch):
    """RLlib's per-env unsquash is off; the env maps the module's actions to the task's bounds exactly as it would."""
    from ray.rllib.utils.spaces.space_utils import unsquash_action

    r = runner(trainer)
    assert not r.config.normalize_actions and not r.config.clip_actions
    env = r.env.unwrapped
    physical = env.physical_action_space
    assert physical.low.tolist() == [-1.0] and physical.high.tolist() == [1.0]   # pendulum's torque bounds
    assert env.single_action_space == gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    sent = []
    for lane in env.lanes:
        def send(actions, hold, lane=lane, original=lane._send):
            sent.append(actions.copy())
            return original(actions, hold)
        monkeypatch.setattr(lane, "_send", send)
    episodes = r.sample(num_timesteps=60) if loop == "pipelined" else r.sample(num_episodes=1)
    raw = np.concatenate([e.get_actions() for e in episodes])
    on_wire = {tuple(row) for batch in sent for row in batch}
    assert len(raw) >= 60 and np.abs(raw).max() > 1.0                  # the module's samples leave [-1, 1]
    assert all(tuple(unsquash_action(a, physical)) in on_wire for a in raw)
    assert all(physical.contains(row) for row in np.concatenate(sent))


def test_ppo_trains_through_lanes_and_logs_the_reward_terms(trainer):
    metrics = trainer.train(iterations=2)
    last = metrics[-1]
    assert last["env_steps"] >= 2 * 600 and np.isfinite(last["episode_return_mean"])
    assert 0.0 <= last["reward/task"] <= 1.0
    for term in ("imagination", "physics", "total"):
        assert np.isfinite(last[f"reward/{term}"])


def test_lane_counts_are_checked():
    with pytest.raises(ValueError, match=r"lanes must be in \[1, 8\]"):
        EnvConfig(task="pendulum", addresses=["127.0.0.1:1"], lanes=0).validate()


def test_a_dead_server_fails_the_sample_naming_the_lane():
    server = ServerProcess(ServerConfig(task="pendulum", engine="mujoco")).start()
    ppo = ppo_config_for("pendulum", num_env_runners=0, num_envs_per_runner=4, train_batch_size=200,
                         minibatch_size=100, num_epochs=1)
    t = PolicyTrainer(ppo, EnvConfig(task="pendulum", addresses=[server.address], lanes=2, timeout_s=3.0), num_cpus=2)
    try:
        r = runner(t)
        assert len(r.sample(num_timesteps=20)) == 4
        os.kill(server.pid, signal.SIGKILL)
        server.stop()
        with pytest.raises(RuntimeError, match=r"lane 0 of EnvRunner 0 failed to step .* unavailable"):
            r.sample(num_timesteps=20)                   # after the client's retry window (timeout_s), not forever
    finally:
        t.stop()                                         # Ray itself stays up for the module's trainer
