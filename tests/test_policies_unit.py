"""Fast policy-package tests (no Ray): configs, the torch policy, evaluation in reality, import hygiene."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from policies import TASK_DEFAULTS, EnvConfig, PPOConfig, TorchPolicy, evaluate, ppo_config_for
from simulators.reality import Reality


def test_task_defaults_cover_every_task_and_validate():
    import simulators

    assert set(TASK_DEFAULTS) == set(simulators.TASKS)
    for task in TASK_DEFAULTS:
        cfg = ppo_config_for(task)
        assert cfg.train_batch_size >= cfg.minibatch_size
    assert ppo_config_for("pendulum", lr=1e-2).lr == 1e-2


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, "lr must be > 0"),
    ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"minibatch_size": 512, "train_batch_size": 256}, "minibatch_size"),
    ({"activation": "sigmoid"}, "activation must be one of"),
    ({"hidden_sizes": []}, "hidden_sizes"),
])
def test_ppo_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs).validate()


def test_unknown_override_and_task_are_named():
    with pytest.raises(ValueError, match="unknown PPOConfig key.*'learning_rate'"):
        ppo_config_for("pendulum", learning_rate=1e-3)
    with pytest.raises(ValueError, match="no PPO defaults for task 'walker'"):
        ppo_config_for("walker")


def test_env_config_needs_addresses_and_valid_fidelity():
    with pytest.raises(ValueError, match="addresses"):
        EnvConfig(task="pendulum").validate()
    with pytest.raises(ValueError, match="host:port"):
        EnvConfig(addresses=["localhost"]).validate()
    with pytest.raises(ValueError, match=r"fidelity must be in \[0, 1\]"):
        EnvConfig(addresses=["127.0.0.1:1"], fidelity=1.5).validate()


def _module_weights(obs, act, hidden, rng):
    """A state dict laid out as RLlib's DefaultPPOTorchRLModule (actor, critic, value head)."""
    w, size = {}, obs
    for i, h in enumerate(hidden):
        w[f"encoder.actor_encoder.net.mlp.{2 * i}.weight"] = rng.normal(size=(h, size)).astype(np.float32)
        w[f"encoder.actor_encoder.net.mlp.{2 * i}.bias"] = rng.normal(size=h).astype(np.float32)
        w[f"encoder.critic_encoder.net.mlp.{2 * i}.weight"] = rng.normal(size=(h, size)).astype(np.float32)
        size = h
    w["pi.net.mlp.0.weight"] = rng.normal(size=(2 * act, size)).astype(np.float32)
    w["pi.net.mlp.0.bias"] = rng.normal(size=2 * act).astype(np.float32)
    w["vf.net.mlp.0.weight"] = rng.normal(size=(1, size)).astype(np.float32)
    w["pi.log_std_clip_param_const"] = np.array([20.0], np.float32)
    return w


def test_torch_policy_matches_the_module_mean_unsquashed_and_clipped(tmp_path):
    rng = np.random.default_rng(0)
    w = _module_weights(3, 2, [8, 8], rng)
    low, high = np.array([-1.0, 0.0]), np.array([1.0, 4.0])
    policy = TorchPolicy(3, low, high, [8, 8], "tanh").load_module_weights(w)
    obs = rng.normal(size=(5, 3)).astype(np.float32)
    h = np.tanh(obs @ w["encoder.actor_encoder.net.mlp.0.weight"].T + w["encoder.actor_encoder.net.mlp.0.bias"])
    h = np.tanh(h @ w["encoder.actor_encoder.net.mlp.2.weight"].T + w["encoder.actor_encoder.net.mlp.2.bias"])
    mean = (h @ w["pi.net.mlp.0.weight"].T + w["pi.net.mlp.0.bias"])[:, :2]
    expected = np.clip(low + (mean + 1) * (high - low) / 2, low, high)
    np.testing.assert_allclose(policy(obs), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(policy(obs), policy(obs))                     # deterministic
    assert isinstance(policy(torch.from_numpy(obs)), torch.Tensor)
    policy.save(str(tmp_path / "p.pt"))
    np.testing.assert_array_equal(TorchPolicy.load(str(tmp_path / "p.pt"))(obs), policy(obs))


def test_torch_policy_rejects_mismatched_weights_and_observations():
    w = _module_weights(3, 1, [8, 8], np.random.default_rng(0))
    with pytest.raises(ValueError, match="actor layers"):
        TorchPolicy(3, [-1.0], [1.0], [8], "tanh").load_module_weights(w)
    with pytest.raises(ValueError, match="shape"):
        TorchPolicy(3, [-1.0], [1.0], [16, 8], "tanh").load_module_weights(w)
    with pytest.raises(ValueError, match=r"expected \(batch, 3\)"):
        TorchPolicy(3, [-1.0], [1.0], [8, 8], "tanh")(np.zeros((2, 4)))


def test_evaluate_in_reality_random_vs_a_known_good_controller():
    reality = Reality("pendulum", engine="mujoco")
    rand = evaluate(None, reality, episodes=16, seed=0, batch_size=8)
    assert rand["episodes"] == 16 and rand["episode_length"] == 100
    assert 0 <= rand["return_mean"] <= 100 and rand["success_rate"] <= 0.2

    def pd(obs):  # the motor out-torques gravity (6 N m > 4.9 N m), so a saturated PD swings up and holds
        theta = np.arctan2(obs[:, 1], obs[:, 0])
        return np.clip(-3.0 * theta - 0.5 * obs[:, 2], -1, 1)[:, None]

    good = evaluate(pd, reality, episodes=16, seed=0)
    assert good["return_mean"] > rand["return_mean"] + 20
    assert good["success_rate"] == 1.0 and good["return_mean"] > 90
    assert evaluate(None, reality, episodes=16, seed=0, batch_size=8) == rand   # seeded
    with pytest.raises(ValueError, match="episodes >= 1"):
        evaluate(None, reality, episodes=0)


def test_importing_policies_loads_neither_ray_nor_jax():
    code = "import sys, policies; print(any(m.split('.')[0] in ('ray', 'jax', 'flax') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_served_success_and_reward_terms_are_per_episode_and_per_step_over_all_runners():
    """RLlib merges runners' ``reduce="mean"`` values as a mean of means; success and the reward terms are sums
    merged across runners, so a runner that saw 1 episode weighs 1/10 beside one that saw 9."""
    from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

    from policies.rllib_adapter import _ratio
    from policies.rllib_runners import ServedRewardMetrics

    class Episode:
        def __init__(self, infos):
            self.infos = infos

        def get_infos(self, index=None):
            return self.infos if index is None else self.infos[index]

    def runner(successes: list[bool], reward: float) -> dict:
        logger, callbacks = MetricsLogger(), ServedRewardMetrics()
        infos = [{"success": s, **{f"reward/{t}": reward for t in ("total", "task", "imagination", "physics")}}
                 for s in successes]
        for info in infos:
            callbacks.on_episode_end(episode=Episode([info]), metrics_logger=logger)
        callbacks.on_sample_end(metrics_logger=logger, samples=[Episode(infos)])
        return logger.reduce()

    root = MetricsLogger(root=True)
    root.aggregate([runner([True], 1.0), runner([False] * 9, 0.0)])
    merged = {k: v.peek() for k, v in root.reduce().items()}        # what the iteration's result holds
    assert _ratio(merged["served_successes"], merged["served_episodes"]) == pytest.approx(0.1)
    assert _ratio(merged["reward_sum/task"], merged["reward_steps"]) == pytest.approx(0.1)
    assert np.isnan(_ratio(None, 0)) and np.isnan(_ratio(3, None))
