"""The Task contract: an MJCF model, an initial-state distribution, a dense reward, a success predicate.

A task speaks only in flat state vectors ``s = concat(qpos, qvel)`` batched as ``[B, S]``
numpy arrays, so every engine, the world model and the graders share one definition.

Canonical episode loop (what ``CorrectedSimulator`` and ``Reality`` do for a batch)::

    s = task.initial_states(rng, B)
    for t in range(task.episode_length):
        s = engine_or_world_model(s, a)
        r = task.reward(s, a)                 # dense, in [0, 1]
        good = task.is_good(s)                # per-step success predicate
    success = trailing run of good >= task.success_steps
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

PARAM_NAMES = ("mass_scale", "damping_scale", "gain_scale", "friction_scale")
PARAM_MAX = 100.0   # physics scales lie in (0, PARAM_MAX]: 0 removes the physics, beyond it the MJCF is another model


def check_params(params: Mapping[str, float] | None) -> dict[str, float]:
    """Every physics scale (1.0 where not given) after checking names and ranges; ``ValueError`` names the bad one."""
    params = dict(params or {})
    unknown = set(params) - set(PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown physics parameter(s) {sorted(unknown)}; allowed: {', '.join(PARAM_NAMES)}")
    out = {k: 1.0 for k in PARAM_NAMES}
    for key, value in params.items():
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not (ok and 0.0 < value <= PARAM_MAX):
            raise ValueError(f"physics parameter {key}={value!r} is out of range; allowed: a number > 0 and <= {PARAM_MAX:g}")
        out[key] = float(value)
    return out


def tolerance(x: np.ndarray, bounds: tuple[float, float], margin: float, value_at_margin: float = 0.1) -> np.ndarray:
    """dm_control-style tolerance: 1 inside ``bounds``, a Gaussian fall-off to ``value_at_margin`` at ``margin``."""
    lo, hi = bounds
    x = np.asarray(x)
    inside = (x >= lo) & (x <= hi)
    if margin <= 0:
        return inside.astype(np.float32)
    d = np.where(x < lo, lo - x, x - hi) / margin
    scale = math.sqrt(-2.0 * math.log(value_at_margin))
    out = np.where(inside, 1.0, np.exp(-0.5 * (d * scale) ** 2))
    return out.astype(np.float32)


def wrap_angle(theta):
    """Map angles to [-pi, pi) (numpy arrays or torch tensors)."""
    return (theta + math.pi) % (2 * math.pi) - math.pi


def xp_of(x):
    """The array namespace of ``x``: ``torch`` for tensors, else ``numpy``."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    return np


@dataclass(frozen=True)
class Task:
    """Base class for tasks; subclasses set the fields and override the four methods."""

    name: str = "task"
    xml: str = ""
    n_substeps: int = 1               # physics steps per control step
    episode_length: int = 100         # control steps per episode
    success_steps: int = 1            # trailing good steps needed for success
    observation_size: int = 0
    description: str = ""
    default_params: dict = field(default_factory=lambda: {k: 1.0 for k in PARAM_NAMES})

    def initial_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Sample ``n`` initial state vectors ``[n, S]`` (float64)."""
        raise NotImplementedError

    def observe(self, states: np.ndarray) -> np.ndarray:
        """Observation ``[B, O]`` of state vectors ``[B, S]``; numpy in, numpy out, torch in, torch out."""
        raise NotImplementedError

    def reward(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Dense reward in [0, 1] for arriving in ``states`` under ``actions``: ``[B]``."""
        raise NotImplementedError

    def is_good(self, states: np.ndarray) -> np.ndarray:
        """Per-step success predicate ``[B]`` bool; success is a trailing run of ``success_steps``."""
        raise NotImplementedError

    def episode_success(self, good: np.ndarray) -> np.ndarray:
        """Success per episode from a ``[B, T]`` history of ``is_good`` flags."""
        tail = np.asarray(good)[:, -self.success_steps:]
        return tail.all(axis=1)
