"""Selection: which self-play episodes retrain the world model, and why the others were not chosen.

An episode qualifies when it is complete (its final transition was recorded), succeeded (if
required), and its imagination windows were accurate enough and physically plausible enough:
the mean ``imagination`` grade over the windows that closed in the episode is at least
``min_imagination_accuracy`` and the mean violation (``-physics`` grade) at most
``max_physics_violation``. Windows close every ``horizon`` steps from the episode start, so the
closing transitions are those with ``(step + 1) % horizon == 0``. All per-episode statistics are
computed with ``np.unique``/``np.bincount`` (no loop over episodes).
"""

from __future__ import annotations

import math

import numpy as np

from flywheel.config import SelectionSection
from simulators.dataset import TransitionDataset

REASONS = ("incomplete", "not_successful", "low_imagination_accuracy", "high_physics_violation", "over_cap")


def _episode_mean(values: np.ndarray, weights: np.ndarray, inverse: np.ndarray, n: int) -> np.ndarray:
    total = np.bincount(inverse, weights=values * weights, minlength=n)
    count = np.bincount(inverse, weights=weights, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1e-12), np.nan)


def select_episodes(data: TransitionDataset | None, config: SelectionSection,
                    horizon: int) -> tuple[TransitionDataset | None, dict]:
    """Return the selected transitions (whole episodes) and stats: counts, rejections per reason, means.

    ``rejected/<reason>`` counts each rejected episode once, under the first reason (in ``REASONS`` order) it
    fails, so the counts add up to the episodes not selected; ``failed/<check>`` counts every episode failing
    each check (an episode may fail several).
    """
    stats = {"episodes": 0, "selected_episodes": 0, "selected_transitions": 0,
             **{f"rejected/{r}": 0 for r in REASONS}, **{f"failed/{r}": 0 for r in REASONS}}
    if data is None or len(data) == 0:
        return None, stats
    episodes, inverse = np.unique(data.episode_ids, return_inverse=True)
    n = len(episodes)
    done = data.dones.astype(bool)
    complete = np.bincount(inverse, weights=done, minlength=n) > 0
    success = np.bincount(inverse, weights=done & data.success.astype(bool), minlength=n) > 0
    closed = ((data.steps.astype(np.int64) + 1) % horizon == 0).astype(np.float64)
    imag = data.rewards.get("imagination")
    phys = data.rewards.get("physics")
    accuracy = _episode_mean(np.nan_to_num(imag), closed, inverse, n) if imag is not None else np.full(n, np.nan)
    violation = _episode_mean(np.nan_to_num(-phys), closed, inverse, n) if phys is not None else np.full(n, np.nan)
    task = data.rewards.get("task")
    ret = np.bincount(inverse, weights=np.nan_to_num(task), minlength=n) if task is not None else np.zeros(n)

    fails = {
        "incomplete": ~complete,
        "not_successful": complete & ~success if config.require_success else np.zeros(n, bool),
        "low_imagination_accuracy": accuracy < config.min_imagination_accuracy,   # NaN (no window) passes
        "high_physics_violation": violation > config.max_physics_violation,
    }
    keep = ~np.logical_or.reduce(list(fails.values()))
    if config.max_episodes and keep.sum() > config.max_episodes:
        order = np.argsort(-np.where(keep, ret, -np.inf), kind="stable")
        capped = np.zeros(n, bool)
        capped[order[: config.max_episodes]] = True
        fails["over_cap"] = keep & ~capped
        keep &= capped
    stats.update({f"failed/{r}": int(m.sum()) for r, m in fails.items()})
    earlier = np.zeros(n, bool)
    for reason, failing in fails.items():     # dicts keep REASONS' order
        stats[f"rejected/{reason}"] = int((failing & ~earlier).sum())
        earlier |= failing
    stats.update(episodes=n, selected_episodes=int(keep.sum()), complete_episodes=int(complete.sum()),
                 successful_episodes=int(success.sum()),
                 # no episode closed an imagination window: no value (NaN), not a perfect or a failing 0
                 mean_imagination_accuracy=float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else math.nan,
                 mean_physics_violation=float(np.nanmean(violation)) if np.isfinite(violation).any() else math.nan)
    mask = keep[inverse]
    stats["selected_transitions"] = int(mask.sum())
    return (data.select(mask) if mask.any() else None), stats
