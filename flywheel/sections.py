"""The config sections other packages own, gathered in one place for ``flywheel.config``.

Each package defines its own dataclass (world model, rewards, service, PPO); the flywheel composes
them under ``world_model``, ``rewards``, ``service`` and ``ppo``. The flywheel fills the service's
per-lap fields itself (task, engine, engine_params, world_model_path, trajectory_dir, lap,
episode_offset, seed, reward) from the other sections: those keys follow another key or are
refused in a layer (``flywheel.layers.FOLLOWS`` and ``PER_LAP``).
"""

from __future__ import annotations

from policies.config import PPOConfig
from rewards import RewardConfig
from services.config import ServerConfig
from simulators.world_model import WorldModelConfig

__all__ = ["PPOConfig", "RewardConfig", "ServerConfig", "WorldModelConfig"]
