"""Policy workers: PPO on RLlib (behind ``policies.rllib_adapter``), torch policies, evaluation in reality.

Importing ``policies`` loads neither RLlib nor JAX; ``PolicyTrainer`` imports RLlib on first use::

    from policies import EnvConfig, PolicyTrainer, evaluate, ppo_config_for
    trainer = PolicyTrainer(ppo_config_for("pendulum"), EnvConfig(task="pendulum", addresses=[address]))
    trainer.train(iterations=5)
    metrics = evaluate(trainer.policy(), Reality("pendulum", engine="mujoco"), episodes=64)
"""

from __future__ import annotations

from policies.config import TASK_DEFAULTS, EnvConfig, PPOConfig, ppo_config_for
from policies.evaluate import evaluate
from policies.torch_policy import TorchPolicy


def __getattr__(name: str):
    if name == "PolicyTrainer":
        from policies.rllib_adapter import PolicyTrainer

        return PolicyTrainer
    raise AttributeError(f"module 'policies' has no attribute {name!r}")


__all__ = ["TASK_DEFAULTS", "EnvConfig", "PPOConfig", "PolicyTrainer", "TorchPolicy", "evaluate", "ppo_config_for"]
