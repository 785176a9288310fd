"""The config sections other packages own, gathered in one place for ``flywheel.config``.

Each package defines its own dataclass (world model, rewards, service, PPO); the flywheel composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

try:
    from policies.config import TASK_DEFAULTS, PPOConfig
except ImportError:  # placeholder until policies.config lands
    TASK_DEFAULTS: dict = {}

    @dataclass
    class PPOConfig:
        lr: float = 3e-4
        gamma: float = 0.99
        num_env_runners: int = 1
        num_envs_per_runner: int = 16
        train_batch_size: int = 2000
        seed: int = 0

try:
    from rewards import RewardConfig
except ImportError:  # placeholder until rewards lands
    @dataclass
    class RewardWeights:
        task: float = 1.0
        imagination: float = 0.5
        physics: float = 0.5

    @dataclass
    class RewardConfig:
        weights: RewardWeights = field(default_factory=RewardWeights)
        horizon: int = 5

try:
    from services.config import ServerConfig
except ImportError:  # placeholder until services.config lands
    @dataclass
    class ServerConfig:
        host: str = "127.0.0.1"
        port: int = 0
        max_batch: int = 4096

try:
    from simulators.world_model import WorldModelConfig
except ImportError:  # placeholder until simulators.world_model lands
    @dataclass
    class WorldModelConfig:
        ensemble_size: int = 5
        hidden_size: int = 200
        num_layers: int = 3
        learning_rate: float = 1e-3
        batch_size: int = 256
        max_epochs: int = 50
        patience: int = 5
        holdout: float = 0.1
        seed: int = 0
        device: str = "cpu"


def task_ppo_defaults(task: str) -> dict:
    """The tuned PPO settings for a task (empty when none are registered)."""
    return dict(TASK_DEFAULTS.get(task, {}))


__all__ = ["PPOConfig", "RewardConfig", "ServerConfig", "WorldModelConfig", "task_ppo_defaults"]
