"""RLlib PPO through real simulator servers (gRPC on 127.0.0.1): metrics, spread, no JAX, checkpoints, faults.

One trainer (2 EnvRunners over 2 servers, MuJoCo engine, fidelity 1) is shared by the tests in order.
"""

import os
import signal
import time

import numpy as np
import pytest
import ray

from policies import EnvConfig, PolicyTrainer, ppo_config_for
from policies.checkpoint import CheckpointError
from services.config import ServerConfig
from services.server import ServerProcess


@pytest.fixture(scope="module")
def servers():
    procs = [ServerProcess(ServerConfig(task="pendulum", engine="mujoco")).start() for _ in range(2)]
    yield [p.address for p in procs]
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def trainer(servers):
    ppo = ppo_config_for("pendulum", num_env_runners=2, num_envs_per_runner=8, train_batch_size=1024,
                         minibatch_size=128, num_epochs=2, num_cpus_per_runner=0.5, restart_delay_s=0.5)
    t = PolicyTrainer(ppo, EnvConfig(task="pendulum", addresses=servers), num_cpus=2)
    yield t
    t.stop()
    ray.shutdown()


def test_runners_spread_over_servers_and_import_no_jax(trainer, servers):
    probes = sorted(trainer.runner_probe(), key=lambda p: p["worker_index"])
    assert [p["worker_index"] for p in probes] == [1, 2]
    assert [p["address"] for p in probes] == servers              # runner i -> addresses[(i - 1) % 2]
    assert all(p["heavy_modules"] == [] for p in probes), probes   # no jax, jaxlib, mujoco.mjx, brax
    assert len({p["pid"] for p in probes} | {os.getpid()}) == 3


def test_train_reports_env_steps_returns_and_reward_terms(trainer):
    metrics = trainer.train(iterations=2)
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert metrics[1]["env_steps"] >= 2 * 1024 and metrics[1]["env_steps"] > metrics[0]["env_steps"]
    last = metrics[-1]
    assert np.isfinite(last["episode_return_mean"]) and last["episode_len_mean"] > 0
    assert 0.0 <= last["reward/task"] <= 1.0 and 0.0 <= last["success_rate"] <= 1.0
    for term in ("imagination", "physics", "total"):
        assert np.isfinite(last[f"reward/{term}"])
    assert last["healthy_runners"] == 2


def test_weights_round_trip_and_checkpoint_restore_acts_identically(trainer, tmp_path):
    obs = np.random.default_rng(0).normal(size=(32, 3)).astype(np.float32)
    before = trainer.policy()(obs)
    weights = trainer.get_weights()
    optim_before = _optimizer_state(trainer)
    path = trainer.save(str(tmp_path / "ckpt"))
    trainer.train(iterations=1)                                   # moves weights and optimizer moments
    assert not np.allclose(trainer.policy()(obs), before)
    trainer.restore(path)
    np.testing.assert_allclose(trainer.policy()(obs), before, rtol=0, atol=1e-6)
    optim_after = _optimizer_state(trainer)
    assert optim_before.keys() == optim_after.keys() and optim_before
    for key in optim_before:
        np.testing.assert_allclose(optim_after[key], optim_before[key], atol=1e-7, err_msg=key)
    trainer.train(iterations=1)
    trainer.set_weights(weights)
    np.testing.assert_allclose(trainer.policy()(obs), before, rtol=0, atol=1e-6)


def test_restore_refuses_a_different_network(trainer, tmp_path):
    path = trainer.save(str(tmp_path / "ckpt"))
    hidden = trainer.ppo.hidden_sizes
    trainer.ppo.hidden_sizes = [16]
    try:
        with pytest.raises(ValueError, match="hidden_sizes"):
            trainer.restore(path)
    finally:
        trainer.ppo.hidden_sizes = hidden
    with pytest.raises(CheckpointError, match="not a policy checkpoint: no flywheel_policy.json"):
        trainer.restore(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.restore(str(tmp_path / "policy_lap007"))


def test_killing_an_env_runner_does_not_stop_training(trainer):
    victim = min(trainer.runner_probe(), key=lambda p: p["worker_index"])
    os.kill(victim["pid"], signal.SIGKILL)
    metrics = trainer.train(iterations=3)
    assert sum(m["env_steps_this_iter"] for m in metrics) >= 3 * 1024 and metrics[-1]["env_steps_this_iter"] > 0
    deadline = time.time() + 60
    while time.time() < deadline:                                  # RLlib restarts the runner in a new process
        probes = trainer.runner_probe()
        if len(probes) == 2 and victim["pid"] not in {p["pid"] for p in probes}:
            break
        trainer.train(iterations=1)
    assert sorted(p["worker_index"] for p in probes) == [1, 2]
    assert victim["pid"] not in {p["pid"] for p in probes}
    assert all(d["matches"] and d["synced"] for d in trainer.runner_digests())


def _optimizer_state(trainer) -> dict:
    state = trainer.algo.learner_group.get_state()
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif "optimizer" in prefix and hasattr(node, "shape") and np.asarray(node).dtype.kind == "f":
            flat[prefix] = np.array(node)

    walk("", state)
    return flat
