"""The task term: the task's dense reward per step plus a bonus on the step that ends a successful episode."""

from __future__ import annotations

from typing import Any

import numpy as np


def task_term(dense: np.ndarray, ended: np.ndarray, success: np.ndarray, success_bonus: float = 1.0) -> np.ndarray:
    """``dense + success_bonus * (ended & success)``, all ``[B]``; ``success`` counts only where ``ended``."""
    d = np.asarray(dense, dtype=np.float64)
    e = np.asarray(ended, dtype=bool)
    s = np.asarray(success, dtype=bool)
    if d.ndim != 1 or e.shape != d.shape or s.shape != d.shape:
        raise ValueError(f"dense {d.shape}, ended {e.shape} and success {s.shape} must all be [batch]")
    return d + float(success_bonus) * (e & s)


def task_grades(task: Any, next_states: np.ndarray, actions: np.ndarray, ended: np.ndarray,
                success: np.ndarray, success_bonus: float = 1.0) -> dict[str, np.ndarray]:
    """From the task definition, per env for one step: ``dense`` reward, ``good`` (the success
    predicate of the state reached), ``success`` (episode success, False where no episode ended)
    and the ``task`` term."""
    s = np.asarray(next_states, dtype=np.float64)
    dense = np.asarray(task.reward(s, np.asarray(actions)), dtype=np.float64)
    ended = np.asarray(ended, dtype=bool)
    flag = ended & np.asarray(success, dtype=bool)
    return {"dense": dense, "good": np.asarray(task.is_good(s), dtype=bool), "success": flag,
            "task": task_term(dense, ended, flag, success_bonus)}


def episode_success(task: Any, good: np.ndarray) -> np.ndarray:
    """Success ``[B]`` of finished episodes from their ``[B, T]`` per-step ``good`` flags (the task's rule)."""
    g = np.asarray(good, dtype=bool)
    if g.ndim != 2:
        raise ValueError(f"good has shape {g.shape}, expected (batch, steps)")
    return np.asarray(task.episode_success(g), dtype=bool)
