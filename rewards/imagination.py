"""Imagination accuracy: how close an open-loop world-model rollout came to what happened."""

from __future__ import annotations

import numpy as np

DEFAULT_SCALE_FLOOR = 1e-3


def check_scale(scale: np.ndarray, state_size: int, floor: float = DEFAULT_SCALE_FLOOR) -> np.ndarray:
    """Validate a per-dimension state scale ``[S]`` (finite, >= 0) and raise it to at least ``floor``.

    The floor keeps a dimension that never moves in the data (std 0, e.g. a target's velocity)
    from turning a negligible prediction error into a huge normalised one.
    """
    s = np.asarray(scale, dtype=np.float64)
    if s.shape != (state_size,):
        raise ValueError(f"scale has shape {s.shape}, expected ({state_size},): one value per state dimension")
    ok = np.isfinite(s) & (s >= 0)
    if not ok.all():
        raise ValueError(f"scale must be finite and >= 0 in every dimension; bad dimension(s) {np.flatnonzero(~ok).tolist()}")
    s = np.maximum(s, floor)
    if not (s > 0).all():
        raise ValueError(f"scale is 0 in dimension(s) {np.flatnonzero(s <= 0).tolist()} and scale_floor is {floor}")
    return s


def imagination_accuracy(imagined: np.ndarray, actual: np.ndarray, scale: np.ndarray,
                         sharpness: float = 10.0, scale_floor: float = DEFAULT_SCALE_FLOOR) -> np.ndarray:
    """Accuracy ``[B]`` in [0, 1] of ``imagined [B,H,S]`` against ``actual [B,H,S]``.

    ``exp(-sharpness * mean(((imagined - actual) / scale)^2))`` over the window and the state
    dimensions: 1 for a perfect prediction, strictly decreasing in the normalised error, so
    angles and velocities count alike. A window with any non-finite value scores 0.
    """
    im = np.asarray(imagined, dtype=np.float64)
    ac = np.asarray(actual, dtype=np.float64)
    if im.ndim != 3 or im.shape != ac.shape:
        raise ValueError(f"imagined {im.shape} and actual {ac.shape} must both be [batch, horizon, state_size]")
    if not (np.isfinite(sharpness) and sharpness > 0):
        raise ValueError(f"sharpness must be a finite number > 0, got {sharpness!r}")
    s = check_scale(scale, im.shape[2], scale_floor)
    with np.errstate(over="ignore", invalid="ignore"):
        mse = np.mean(((im - ac) / s) ** 2, axis=(1, 2))
        acc = np.exp(-sharpness * mse)
    return np.where(np.isfinite(mse), acc, 0.0)


def open_loop_error(imagined: np.ndarray, actual: np.ndarray, scale: np.ndarray,
                    scale_floor: float = DEFAULT_SCALE_FLOOR) -> np.ndarray:
    """Normalised RMS error ``[B]`` of a window (inf where anything is non-finite)."""
    im, ac = np.asarray(imagined, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    s = check_scale(scale, im.shape[-1], scale_floor)
    with np.errstate(over="ignore", invalid="ignore"):
        rms = np.sqrt(np.mean(((im - ac) / s) ** 2, axis=(1, 2)))
    return np.where(np.isfinite(rms), rms, np.inf)
