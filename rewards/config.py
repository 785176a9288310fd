"""Grading configuration: term weights, imagination horizon and the physics tolerances.

Plain dataclasses (float/int/bool fields and nested dataclasses only), so the flywheel composes
them into its OmegaConf structured config under ``rewards``. ``validate`` accepts either the
dataclass or the resolved OmegaConf node and names the offending key and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

TERMS: tuple[str, ...] = ("task", "imagination", "physics")


@dataclass
class RewardWeights:
    """Weight of each term in the total: ``total = sum(w_k * term_k)``; 0 removes a term."""

    task: float = 1.0
    imagination: float = 0.5
    physics: float = 0.5


@dataclass
class Tolerances:
    """What counts as one unit of violation, per component of the physics check.

    A transition violates physics when any component exceeds its tolerance. Every component is
    measured against the engine's own step from the same state (see ``rewards.physics``), so the
    engine's trajectories score 0 on each whatever its soft contacts and limits do, and a tolerance
    is simply the smallest violation worth flagging: a corruption of 2 tolerances is always caught
    (``benchmarks/rlpf.py``).
    """

    residual: float = 0.1       # RMS over dims of (imagined s' - engine step) / data scale
    penetration: float = 0.005  # interpenetration beyond the engine's, m
    joint_limit: float = 0.01   # distance past a joint limit beyond the engine's, joint units (m or rad)
    kinematic: float = 0.01     # change of position no force over the control step explains, joint units


@dataclass
class RewardConfig:
    """Weights, imagination window and physics tolerances of the three grades."""

    weights: RewardWeights = field(default_factory=RewardWeights)
    tolerances: Tolerances = field(default_factory=Tolerances)
    horizon: int = 5                    # imagination window H (steps)
    accuracy_sharpness: float = 10.0    # k in accuracy = exp(-k * mean normalised squared error)
    nonfinite_score: float = 10.0       # violation score (in tolerances) of a transition with NaN/inf
    success_bonus: float = 1.0          # added to the task term on the step that ends a successful episode
    scale_floor: float = 1e-3           # per-dimension scales below this (state units) are raised to it

    def __post_init__(self) -> None:
        validate(self)


_RANGES: dict[str, tuple[float, float, bool]] = {  # key -> (low, high, low is exclusive)
    "weights.task": (0.0, math.inf, False),
    "weights.imagination": (0.0, math.inf, False),
    "weights.physics": (0.0, math.inf, False),
    "tolerances.residual": (0.0, math.inf, True),
    "tolerances.penetration": (0.0, math.inf, True),
    "tolerances.joint_limit": (0.0, math.inf, True),
    "tolerances.kinematic": (0.0, math.inf, True),
    "horizon": (1, 1000, False),
    "accuracy_sharpness": (0.0, math.inf, True),
    "nonfinite_score": (1.0, math.inf, True),
    "success_bonus": (0.0, math.inf, False),
    "scale_floor": (0.0, math.inf, False),
}


def validate(config: Any, prefix: str = "rewards") -> Any:
    """Check every field of a ``RewardConfig`` (or an OmegaConf node of one); returns it unchanged."""
    for key, (low, high, exclusive) in _RANGES.items():
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        ok = isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node)
        ok = ok and (node > low if exclusive else node >= low) and node <= high
        if key == "horizon":
            ok = ok and float(node).is_integer()
        if not ok:
            lo = f"> {low}" if exclusive else f">= {low}"
            rng = f"{lo}" if high == math.inf else f"{lo} and <= {high}"
            kind = "an integer" if key == "horizon" else "a finite number"
            raise ValueError(f"{prefix}.{key} must be {kind} {rng}, got {node!r}")
    return config
