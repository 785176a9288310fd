"""Imagination accuracy: how close an open-loop world-model rollout came to what happened."""

from __future__ import annotations

import numpy as np


def check_scale(scale: np.ndarray, state_size: int) -> np.ndarray:
    """Validate a per-dimension state scale ``[S]`` (finite, > 0)."""
    s = np.asarray(scale, dtype=np.float64)
    if s.shape != (state_size,):
        raise ValueError(f"scale has shape {s.shape}, expected ({state_size},): one positive value per state dimension")
    if not (np.isfinite(s).all() and (s > 0).all()):
        bad = np.flatnonzero(~(np.isfinite(s) & (s > 0))).tolist()
        raise ValueError(f"scale must be finite and > 0 in every dimension; bad dimension(s) {bad}")
    return s


def imagination_accuracy(imagined: np.ndarray, actual: np.ndarray, scale: np.ndarray,
                         sharpness: float = 10.0) -> np.ndarray:
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
    s = check_scale(scale, im.shape[2])
    with np.errstate(over="ignore", invalid="ignore"):
        mse = np.mean(((im - ac) / s) ** 2, axis=(1, 2))
        acc = np.exp(-sharpness * mse)
    return np.where(np.isfinite(mse), acc, 0.0)


def open_loop_error(imagined: np.ndarray, actual: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Normalised RMS error ``[B]`` of a window (inf where anything is non-finite)."""
    im, ac = np.asarray(imagined, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    s = check_scale(scale, im.shape[-1])
    with np.errstate(over="ignore", invalid="ignore"):
        rms = np.sqrt(np.mean(((im - ac) / s) ** 2, axis=(1, 2)))
    return np.where(np.isfinite(rms), rms, np.inf)
