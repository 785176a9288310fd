"""The world model package: ensemble network, ``WorldModel``, checkpoints and error metrics."""

from simulators.world_model.evaluation import normalised_mse, one_step_error, open_loop_error
from simulators.world_model.model import ARCHITECTURE, WorldModel, WorldModelConfig

__all__ = ["ARCHITECTURE", "WorldModel", "WorldModelConfig", "normalised_mse", "one_step_error", "open_loop_error"]
