"""World-model errors on a dataset: one-step and H-step open-loop, normalised by ``state_scale``."""

from __future__ import annotations

import numpy as np

from simulators.dataset import TransitionDataset


def normalised_mse(pred: np.ndarray, actual: np.ndarray, scale: np.ndarray) -> float:
    """Mean over rows and dims of ``((pred - actual) / scale) ** 2``."""
    return float(np.mean(((np.asarray(pred) - np.asarray(actual)) / scale) ** 2))


def one_step_error(wm, data: TransitionDataset) -> float:
    """Held-out one-step normalised MSE of the ensemble mean."""
    if len(data) == 0:
        return float("nan")
    return normalised_mse(wm.step(data.states, data.actions), data.next_states, wm.state_scale)


def windows(data: TransitionDataset, horizon: int) -> np.ndarray:
    """Row indices ``[W, H]`` of every run of ``horizon`` consecutive transitions within one episode."""
    order = np.lexsort((data.steps, data.episode_ids))
    n = len(order) - horizon + 1
    if n <= 0:
        return np.zeros((0, horizon), dtype=np.int64)
    idx = order[np.arange(n)[:, None] + np.arange(horizon)[None, :]]
    ep, st = data.episode_ids[idx], data.steps[idx].astype(np.int64)
    ok = (ep == ep[:, :1]).all(axis=1) & (st - st[:, :1] == np.arange(horizon)).all(axis=1)
    return idx[ok]


def open_loop_error(wm, data: TransitionDataset, horizon: int = 10, max_windows: int = 4096, seed: int = 0) -> dict:
    """Normalised MSE of ``wm.imagine`` over ``horizon`` steps against what happened, per step and overall."""
    idx = windows(data, horizon)
    if len(idx) > max_windows:
        idx = idx[np.random.default_rng(seed).choice(len(idx), max_windows, replace=False)]
    if len(idx) == 0:
        return {"open_loop_mse": float("nan"), "per_step": [], "windows": 0}
    imagined = wm.imagine(data.states[idx[:, 0]], data.actions[idx])
    actual = data.next_states[idx]
    per_step = np.mean(((imagined - actual) / wm.state_scale) ** 2, axis=(0, 2))
    return {"open_loop_mse": float(per_step.mean()), "final_mse": float(per_step[-1]),
            "per_step": per_step.tolist(), "windows": len(idx)}
