"""Hand-made physics violations of true transitions, sized in tolerances: how RLPF's precision is measured.

``corrupt(kind, engine, prev, nxt, size, ...)`` returns ``nxt`` with one violation of ``size``
tolerances of the component that should catch it, per transition ``prev -> nxt`` (same action):

==============  ==========================================================================  ============
kind            what changes in ``s'``                                                      caught by
==============  ==========================================================================  ============
teleport        one joint's position jumps by ``size * tol.kinematic``, velocity kept        kinematic
kinematic       one joint's velocity changes by ``dv`` with ``h (n+1)/2 * dv = size * tol``  kinematic
energy_gain     one joint speeds up along its motion, position moved consistently            residual
                (``dq = h (n+1)/2 * dv``), so that the residual is ``size * tol.residual``
joint_limit     a limited joint moves ``size * tol.joint_limit`` further past its limit      joint_limit
penetration     a joint moves until some pair interpenetrates ``size * tol.penetration``     penetration
                deeper (nearest such move over the hinge/slide joints, found by bisection)
nan             one coordinate becomes NaN                                                   nonfinite
==============  ==========================================================================  ============

``applicable`` is False where a kind has nothing to act on (no limited joint, no contact pair, no
move within the joint ranges that reaches the depth). ``true_windows`` makes the clean windows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rewards.config import Tolerances
from rewards.physics import _joint_layout

KINDS: tuple[str, ...] = ("teleport", "kinematic", "energy_gain", "joint_limit", "penetration", "nan")
CAUGHT_BY = {"teleport": "kinematic", "kinematic": "kinematic", "energy_gain": "residual",
             "joint_limit": "joint_limit", "penetration": "penetration", "nan": "nonfinite"}


def true_windows(engine: Any, n_envs: int, horizon: int, seed: int = 0, bang: bool = False):
    """Tumbling windows ``(start [W,S], actions [W,H,A], next [W,H,S])`` of the engine's own episodes.

    ``n_envs`` episodes of ``task.episode_length`` steps from the task's initial distribution, under
    uniformly random actions (``bang``: each at a bound).
    """
    spec = engine.spec
    rng = np.random.default_rng(seed)
    state = engine.reset(seed, n_envs)
    states, acts = [engine.to_vector(state)], []
    for _ in range(engine.task.episode_length):
        a = rng.uniform(spec.action_low, spec.action_high, size=(n_envs, spec.action_size))
        if bang:
            a = np.where(a > (spec.action_low + spec.action_high) / 2, spec.action_high, spec.action_low)
        state = engine.step(state, a)
        states.append(engine.to_vector(state))
        acts.append(a)
    X, A = np.stack(states, 1), np.stack(acts, 1)
    t0 = np.arange(0, engine.task.episode_length - horizon + 1, horizon)
    start = X[:, t0].reshape(-1, spec.state_size)
    actions = np.stack([A[:, t0 + k] for k in range(horizon)], 2).reshape(-1, horizon, spec.action_size)
    nxt = np.stack([X[:, t0 + k + 1] for k in range(horizon)], 2).reshape(-1, horizon, spec.state_size)
    return start, actions, nxt


def corrupt(kind: str, engine: Any, prev: np.ndarray, nxt: np.ndarray, size: float = 2.0,
            tolerances: Tolerances | None = None, scale: np.ndarray | None = None,
            rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(corrupted next states [N,S], applicable [N] bool)``; see the module table for each kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown corruption {kind!r}; kinds: {', '.join(KINDS)}")
    tol = tolerances or Tolerances()
    rng = rng or np.random.default_rng(0)
    out = np.array(nxt, dtype=np.float64, copy=True)
    n, S = out.shape
    _, joints = _joint_layout(engine, engine.spec)
    if kind == "nan":
        out[np.arange(n), rng.integers(S, size=n)] = np.nan
        return out, np.ones(n, bool)
    if not len(joints):
        return out, np.zeros(n, bool)
    c = engine.spec.control_dt / engine.task.n_substeps * (engine.task.n_substeps + 1) / 2.0  # dq per unit dv
    pick = joints[rng.integers(len(joints), size=n)]
    qi, vi, rows = pick[:, 0], pick[:, 1], np.arange(n)
    sign = rng.choice([-1.0, 1.0], size=n)
    if kind == "teleport":
        out[rows, qi] += sign * size * tol.kinematic
    elif kind == "kinematic":
        out[rows, vi] += sign * size * tol.kinematic / c
    elif kind == "energy_gain":
        sc = np.ones(S) if scale is None else np.asarray(scale, dtype=np.float64)
        along = np.where(out[rows, vi] != 0, np.sign(out[rows, vi]), 1.0)
        dv = size * tol.residual * np.sqrt(S) / np.sqrt(c**2 / sc[qi] ** 2 + 1.0 / sc[vi] ** 2)
        out[rows, vi] += along * dv
        out[rows, qi] += along * c * dv
    elif kind == "joint_limit":
        return _past_limit(engine, out, size * tol.joint_limit, rng)
    else:
        return _penetrate(engine, out, size * tol.penetration, joints, rng)
    return out, np.ones(n, bool)


def _past_limit(engine: Any, out: np.ndarray, depth: float, rng: np.random.Generator):
    limits = engine.spec.joint_limits
    limited = np.flatnonzero(np.isfinite(limits).all(axis=1))
    n = len(out)
    if not len(limited):
        return out, np.zeros(n, bool)
    q = limited[rng.integers(len(limited), size=n)]
    lo, hi, x = limits[q, 0], limits[q, 1], out[np.arange(n), q]
    upper = (hi - x) < (x - lo)
    out[np.arange(n), q] = np.where(upper, np.maximum(x, hi) + depth, np.minimum(x, lo) - depth)
    return out, np.ones(n, bool)


def _penetration(engine: Any, states: np.ndarray) -> np.ndarray:
    from simulators.physics.base import constraint_violations

    return constraint_violations(engine.model, states, engine.spec.joint_limits).penetration


def _penetrate(engine: Any, out: np.ndarray, depth: float, joints: np.ndarray, rng: np.random.Generator,
               reach: float = 0.5, grid: int = 50, bisect: int = 20):
    """Move one hinge/slide joint (the smallest move found) so that penetration grows by ``depth``."""
    n = len(out)
    base = _penetration(engine, out)
    target = base + depth
    limits = engine.spec.joint_limits
    done = np.zeros(n, bool)
    steps = np.linspace(reach / grid, reach, grid)
    order = [rng.permutation(len(joints)) for _ in range(n)]
    for r in range(2 * len(joints)):
        todo = np.flatnonzero(~done)
        if not len(todo):
            break
        j = np.array([joints[order[i][r // 2], 0] for i in todo])
        sign = 1.0 if r % 2 == 0 else -1.0
        cand = np.repeat(out[todo], grid, axis=0)
        moved = np.repeat(out[todo, j], grid) + sign * np.tile(steps, len(todo))
        cand[np.arange(len(cand)), np.repeat(j, grid)] = moved
        inside = (moved >= np.repeat(limits[j, 0], grid)) & (moved <= np.repeat(limits[j, 1], grid))
        deep = (_penetration(engine, cand) >= np.repeat(target[todo], grid)) & inside
        deep = deep.reshape(len(todo), grid)
        hit = deep.any(axis=1)
        first = deep.argmax(axis=1)
        lo = np.where(first > 0, steps[np.maximum(first - 1, 0)], 0.0)
        hi = steps[first]
        for _ in range(bisect):  # the smallest move that reaches the depth, to ~1e-7 of the reach
            mid = (lo + hi) / 2
            trial = out[todo].copy()
            trial[np.arange(len(todo)), j] += sign * mid
            ok = _penetration(engine, trial) >= target[todo]
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
        rows = todo[hit]
        out[rows, j[hit]] += sign * hi[hit]
        done[rows] = True
    return out, done
