"""Weighting the terms, and grading one step of the corrected simulator.

Canonical use (what the simulator service does every step)::

    result = simulator.step(actions)
    grades = rewards.grade_step(result, engine, world_model.state_scale, config)
    # grades["task"], grades["imagination"], grades["physics"], grades["total"]: each [B]
    total, logged = rewards.composite({k: grades[k] for k in rewards.TERMS}, config.weights)
    # logged == {"reward/task": ..., "reward/imagination": ..., "reward/physics": ...}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from rewards.config import TERMS, RewardConfig, validate
from rewards.imagination import imagination_accuracy
from rewards.physics import physics_violation
from rewards.task import task_term


def _weights(weights: Any) -> dict[str, float]:
    if dataclasses.is_dataclass(weights):
        weights = {f.name: getattr(weights, f.name) for f in dataclasses.fields(weights)}   # flat: no deep copy
    elif not isinstance(weights, Mapping):
        weights = {k: getattr(weights, k) for k in TERMS if hasattr(weights, k)}
    out = {}
    for k, w in weights.items():
        if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0):
            raise ValueError(f"weight {k!r} must be a finite number >= 0, got {w!r}")
        out[str(k)] = float(w)
    return out


def composite(terms: Mapping[str, np.ndarray], weights: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``total = sum(w_k * term_k)`` over ``terms`` (name -> ``[B]``) and each term as ``reward/<name>``.

    ``weights``: a ``RewardWeights``, a mapping or an OmegaConf node. Every term needs a weight;
    weights of terms not given are ignored. A weight of 0 removes the term from the total.
    """
    w = _weights(weights)
    missing = [k for k in terms if k not in w]
    if missing:
        raise ValueError(f"no weight for term(s) {missing}; weights are given for {sorted(w)}")
    if not terms:
        raise ValueError("composite needs at least one term")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in terms.items()}
    shapes = {v.shape for v in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"terms must all be [batch] arrays of one size, got { {k: v.shape for k, v in arrays.items()} }")
    total = np.zeros(next(iter(shapes)))
    for k, v in arrays.items():
        if w[k] != 0.0:  # a 0 weight removes the term, even a non-finite one
            total = total + w[k] * v
    return total, {f"reward/{k}": v for k, v in arrays.items()}


def grade_step(step_result: Any, engine: Any, scale: np.ndarray, config: RewardConfig | None = None
               ) -> dict[str, np.ndarray]:
    """The three terms and the total ``[B]`` for one ``CorrectedSimulator`` step.

    ``task``: the step's dense task reward plus the success bonus where a successful episode
    ended. ``imagination`` (accuracy in [0, 1]) and ``physics`` (``-tanh`` of the violation) pay
    at the step that closes a window and are 0 elsewhere. Only the envs that closed a window go
    to the engine, all in one call.
    """
    cfg = config if isinstance(config, RewardConfig) else validate(config if config is not None else RewardConfig())
    dense = np.asarray(step_result.task_reward, dtype=np.float64)
    B = dense.shape[0]
    ended = np.asarray(step_result.terminated, dtype=bool) | np.asarray(step_result.truncated, dtype=bool)
    terms = {"task": task_term(dense, ended, np.asarray(step_result.success, dtype=bool), cfg.success_bonus),
             "imagination": np.zeros(B), "physics": np.zeros(B)}
    window = getattr(step_result, "window", None)
    if window is not None:
        mask = np.asarray(window.mask, dtype=bool)
        if mask.shape != (B,):
            raise ValueError(f"window.mask has shape {mask.shape}, expected ({B},)")
        if mask.any():
            start, actions, imagined, actual = (_rows(getattr(window, k), mask, k)
                                                for k in ("start", "actions", "imagined", "actual"))
            terms["imagination"][mask] = imagination_accuracy(imagined, actual, scale, cfg.accuracy_sharpness,
                                                                 cfg.scale_floor)
            report = physics_violation(engine, start, actions, imagined, cfg, scale=scale)
            terms["physics"][mask] = report.reward
    total, _ = composite(terms, cfg.weights)
    return {**terms, "total": total}


def _rows(x: np.ndarray, mask: np.ndarray, name: str) -> np.ndarray:
    """The rows of the envs that closed a window, from a full ``[B, ...]`` array or the selected rows."""
    x = np.asarray(x)
    if len(x) == len(mask):
        return x[mask]
    if len(x) == int(mask.sum()):
        return x
    raise ValueError(f"window.{name} has {len(x)} rows; expected {len(mask)} (all envs) or {int(mask.sum())} (closed)")
