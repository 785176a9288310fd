"""Grades: pure, batched reward terms (task, imagination, physics/RLPF) and their weighting.

Importing this package does not import JAX: the physics check takes the engine as an argument.

    cfg = rewards.RewardConfig()
    acc = rewards.imagination_accuracy(imagined, actual, wm.state_scale)        # [B] in [0, 1]
    rep = rewards.physics_violation(engine, start, actions, imagined, cfg, scale=wm.state_scale)
    rep.per_window, rep.violates, rep.reasons(0), rep.reward                  # [B], [B], list, [B]
    total, logged = rewards.composite({"task": t, "imagination": acc, "physics": rep.reward}, cfg.weights)
"""

from rewards.composite import composite, grade_step
from rewards.config import TERMS, RewardConfig, RewardWeights, Tolerances, validate
from rewards.imagination import imagination_accuracy, open_loop_error
from rewards.physics import COMPONENTS, ViolationReport, physics_reward, physics_violation
from rewards.task import episode_success, task_grades, task_term

__all__ = ["COMPONENTS", "TERMS", "RewardConfig", "RewardWeights", "Tolerances", "ViolationReport", "composite",
           "episode_success", "grade_step", "imagination_accuracy", "open_loop_error", "physics_reward",
           "physics_violation", "task_grades", "task_term", "validate"]
