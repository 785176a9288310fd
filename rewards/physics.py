"""RLPF: how much an imagined trajectory violates the engine's physics.

For every imagined transition ``(s, a, s')`` of a window (``s`` is the real start state for the
first one, the previous imagined state after that) the engine checks:

- ``residual``: ``s'`` against the engine's own ``step_vectors(s, a)``, per dimension over the data
  scale, RMS over the dimensions;
- ``penetration`` and ``joint_limit``: the constraint violations of ``s'`` (MuJoCo collision);
- ``kinematic``: the change of position against the velocities. With ``n`` semi-implicit Euler
  substeps of ``h = dt / n``, ``dq = h * sum(v_k)``; under constant acceleration that is
  ``h * ((n - 1) v + (n + 1) v') / 2``, and what is left is allowed up to ``dt * |v' - v| / 2``
  (an impact inside the step). The engine's own trajectories satisfy it to ~1e-3;
- ``nonfinite``: a NaN/inf in ``s``, ``a`` or ``s'`` (masked before the engine call, never stepped).

Each component is in units of its tolerance (1.0 = at the tolerance); a transition's score is the
largest component, a window's the mean over its transitions, and it violates physics when any
transition scores above 1. The reward term is ``-tanh(window score)`` in (-1, 0].
All B*H transitions go to the engine in one ``step_vectors`` call and one constraints call; for
a JAX engine the batch is padded to a power of two, so a varying number of closed windows costs
a handful of compiles, not one per batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rewards.config import RewardConfig, validate
from rewards.imagination import check_scale

COMPONENTS: tuple[str, ...] = ("residual", "penetration", "joint_limit", "kinematic", "nonfinite")
_HINGE, _SLIDE = 3, 2  # mujoco.mjtJoint values
JIT_ENGINES = frozenset({"mjx", "brax"})  # engines whose batch is padded to a power of two (one compile per bucket)


def _bucket(n: int) -> int:
    return max(8, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class ViolationReport:
    """Per-transition and per-window physics violation of a batch of imagined windows."""

    per_transition: np.ndarray          # [B, H] score in tolerance units (largest component)
    per_window: np.ndarray              # [B] mean of per_transition over the window
    components: dict[str, np.ndarray]   # name -> [B, H] in tolerance units
    raw: dict[str, np.ndarray]          # name -> [B, H] in physical units (nonfinite: 0/1)
    violates: np.ndarray                # [B] bool: some transition exceeded a tolerance
    reward: np.ndarray                  # [B] -tanh(per_window), in (-1, 0]

    def fired(self) -> dict[str, np.ndarray]:
        """Per component, ``[B]`` bool: it exceeded its tolerance somewhere in the window."""
        return {k: (v > 1.0).any(axis=1) for k, v in self.components.items()}

    def reasons(self, i: int) -> list[str]:
        """Names of the components that exceeded their tolerance in window ``i``, worst first."""
        worst = {k: float(v[i].max(initial=0.0)) for k, v in self.components.items()}
        return sorted((k for k, w in worst.items() if w > 1.0), key=lambda k: -worst[k])


def physics_violation(engine: Any, start: np.ndarray, actions: np.ndarray, imagined: np.ndarray,
                      config: RewardConfig | None = None, scale: np.ndarray | None = None) -> ViolationReport:
    """Check imagined windows ``[B,H,S]`` from ``start [B,S]`` under ``actions [B,H,A]`` against ``engine``.

    ``scale [S]`` normalises the residual per dimension (pass ``WorldModel.state_scale``; raised
    to ``config.scale_floor``); without it the residual is in raw state units.
    """
    cfg = validate(config if config is not None else RewardConfig())
    tol = cfg.tolerances
    spec = engine.spec
    s0, acts, im = _check_inputs(spec, start, actions, imagined)
    B, H, S = im.shape
    sc = np.ones(S) if scale is None else check_scale(scale, S, cfg.scale_floor)

    prev = np.concatenate([s0[:, None], im[:, :-1]], axis=1).reshape(B * H, S)
    nxt = im.reshape(B * H, S)
    a = acts.reshape(B * H, -1)
    bad = ~(np.isfinite(prev).all(1) & np.isfinite(nxt).all(1) & np.isfinite(a).all(1))
    placeholder = _placeholder(engine, S)
    safe_prev = np.where(bad[:, None], placeholder, prev)
    safe_next = np.where(bad[:, None], placeholder, nxt)
    safe_a = np.where(bad[:, None], 0.0, a)

    pad = _bucket(len(bad)) - len(bad) if getattr(engine, "name", "") in JIT_ENGINES else 0
    if pad:  # a JAX engine compiles once per batch shape: round the batch up to a power of two
        safe_prev, safe_next = (np.concatenate([x, np.repeat(placeholder[None], pad, 0)]) for x in (safe_prev, safe_next))
        safe_a = np.concatenate([safe_a, np.zeros((pad, safe_a.shape[1]))])
    stepped = np.asarray(engine.step_vectors(safe_prev, safe_a), dtype=np.float64)
    constraints = engine.constraints(engine.from_vector(safe_next))
    n = len(bad)
    safe_prev, safe_next, stepped = safe_prev[:n], safe_next[:n], stepped[:n]
    hinges, joints = _joint_layout(engine, spec)

    with np.errstate(over="ignore", invalid="ignore"):
        diff = safe_next - stepped
        diff[:, hinges] = _wrap(diff[:, hinges])
        residual = np.sqrt(np.mean((diff / sc) ** 2, axis=1))
        residual = np.where(np.isfinite(stepped).all(1), residual, np.inf)
        kinematic = _kinematic_error(safe_prev, safe_next, spec, engine.task.n_substeps, joints, hinges)

    raw = {
        "residual": residual,
        "penetration": np.asarray(constraints.penetration, dtype=np.float64)[:n],
        "joint_limit": np.asarray(constraints.joint_limit_excess, dtype=np.float64)[:n],
        "kinematic": kinematic,
    }
    comps = {k: raw[k] / getattr(tol, k) for k in raw}
    big = 100.0 * cfg.nonfinite_score
    for k, value in comps.items():  # an absurd but finite state saturates rather than overflowing the score
        comps[k] = np.where(bad, 0.0, np.nan_to_num(value, nan=big, posinf=big))
        raw[k] = np.where(bad, 0.0, raw[k])
    comps["nonfinite"] = np.where(bad, float(cfg.nonfinite_score), 0.0)
    raw["nonfinite"] = bad.astype(np.float64)

    comps = {k: comps[k].reshape(B, H) for k in COMPONENTS}
    raw = {k: raw[k].reshape(B, H) for k in COMPONENTS}
    per_transition = np.max(np.stack([comps[k] for k in COMPONENTS]), axis=0)
    per_window = per_transition.mean(axis=1)
    return ViolationReport(per_transition=per_transition, per_window=per_window, components=comps, raw=raw,
                           violates=(per_transition > 1.0).any(axis=1), reward=-np.tanh(per_window))


def physics_reward(report: ViolationReport) -> np.ndarray:
    """The physics term ``[B]``: ``-tanh(window score)``, 0 for clean physics, towards -1 for violations."""
    return report.reward


def _check_inputs(spec: Any, start: np.ndarray, actions: np.ndarray, imagined: np.ndarray):
    S, A = spec.state_size, spec.action_size
    im = np.asarray(imagined, dtype=np.float64)
    if im.ndim != 3 or im.shape[2] != S or im.shape[1] < 1:
        raise ValueError(f"imagined has shape {im.shape}, expected (batch, horizon >= 1, {S})")
    B, H = im.shape[:2]
    s0 = np.asarray(start, dtype=np.float64)
    if s0.shape != (B, S):
        raise ValueError(f"start has shape {s0.shape}, expected ({B}, {S}) to match imagined {im.shape}")
    acts = np.asarray(actions, dtype=np.float64)
    if acts.ndim == 2 and A == 1 and acts.shape == (B, H):
        acts = acts[..., None]
    if acts.shape != (B, H, A):
        raise ValueError(f"actions have shape {acts.shape}, expected ({B}, {H}, {A}) to match imagined {im.shape}")
    return s0, acts, im


def _placeholder(engine: Any, S: int) -> np.ndarray:
    """A valid state to stand in for masked rows: the model's reference pose at rest."""
    model = getattr(engine, "model", None)
    out = np.zeros(S)
    if model is not None:
        out[: model.nq] = model.qpos0
    return out


def _joint_layout(engine: Any, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """(qpos indices of unlimited hinges, [J, 2] (qpos, qvel) index pairs of hinge/slide joints)."""
    model = getattr(engine, "model", None)
    if model is None:  # no MuJoCo model: assume one scalar joint per coordinate
        n = spec.nq if spec.nq == spec.nv else 0
        return np.zeros(0, dtype=int), np.stack([np.arange(n), spec.nq + np.arange(n)], axis=1)
    scalar = (model.jnt_type == _HINGE) | (model.jnt_type == _SLIDE)
    q, v = model.jnt_qposadr[scalar], model.jnt_dofadr[scalar]
    hinges = model.jnt_qposadr[(model.jnt_type == _HINGE) & ~model.jnt_limited.astype(bool)]
    return hinges.astype(int), np.stack([q, spec.nq + v], axis=1).astype(int)


def _wrap(x: np.ndarray) -> np.ndarray:
    return (x + np.pi) % (2 * np.pi) - np.pi


def _kinematic_error(prev: np.ndarray, nxt: np.ndarray, spec: Any, n: int, joints: np.ndarray,
                     hinges: np.ndarray) -> np.ndarray:
    """Largest change of position ``[N]`` not explained by the velocities (joint units)."""
    if len(joints) == 0:
        return np.zeros(len(prev))
    qi, vi = joints[:, 0], joints[:, 1]
    v0, v1 = prev[:, vi], nxt[:, vi]
    dt = spec.control_dt
    h = dt / n
    gap = nxt[:, qi] - prev[:, qi] - h * ((n - 1) * v0 + (n + 1) * v1) / 2.0
    wrap = np.isin(qi, hinges)  # a whole turn of a free hinge is the same configuration
    gap[:, wrap] = _wrap(gap[:, wrap])
    err = np.abs(gap) - 0.5 * dt * np.abs(v1 - v0)
    return np.clip(err, 0.0, None).max(axis=1)
