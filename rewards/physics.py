"""RLPF: how much an imagined trajectory violates the engine's physics.

For every imagined transition ``(s, a, s')`` of a window (``s`` is the real start state for the
first one, the previous imagined state after that) the engine steps ``e = step(s, a)`` and:

- ``residual``: ``s' - e`` per dimension over the data scale, RMS over the dimensions;
- ``kinematic``: the part of ``s' - e`` that no force can explain. The engine integrates with
  semi-implicit Euler over ``n`` substeps of ``h = dt / n``: ``q_n = q_0 + h * sum_k v_k``. An imagined
  step that differs from the engine's by any force held over the control step (the error a world
  model makes) has velocity deviations growing linearly, ``dv_k = (k / n) dv``, so its position
  deviation is exactly ``h (n + 1) / 2 * dv``. The check is ``|dq - h (n + 1) / 2 * dv|`` per
  hinge/slide joint (joint units, largest over the joints): 0 for the engine's own step and for
  any smooth dynamics error, the jump itself for a teleport, ``h (n + 1) / 2 * |dv|`` for a velocity
  the position change does not follow;
- ``penetration``: how much deeper the deepest interpenetration of ``s'`` is (MuJoCo collision)
  than that of ``e``; ``joint_limit``: how much further a joint of ``s'`` lies past its limit than
  in ``e`` (largest over the joints). The engine's own soft contacts and limits allow some of
  both; only what the imagination adds is a violation;
- ``nonfinite``: a NaN/inf in ``s``, ``a`` or ``s'``, or a value of magnitude ``MAX_VALUE`` (1e10, MuJoCo's
  ``mjMAXVAL``, past which MuJoCo resets the state) or more (masked before the engine call, never stepped).

So a trajectory the engine produced scores exactly 0 on every component, with no slack that a
corruption could hide in (``benchmarks/rlpf.py`` measures both). Each component is in units of its
tolerance (1.0 = at the tolerance); a transition's score is the largest component, a window's the
mean over its transitions, and it violates physics when any transition scores above 1. The reward
term is ``-tanh(window score)`` in (-1, 0]. All B*H transitions go to the engine in one ``step_vectors``
call and two ``constraints`` calls (imagined and stepped states); for a JAX engine the batch is
padded to a power of two, so a varying number of closed windows costs a handful of compiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rewards.config import RewardConfig, validate
from rewards.imagination import check_scale

COMPONENTS: tuple[str, ...] = ("residual", "penetration", "joint_limit", "kinematic", "nonfinite")
_HINGE, _SLIDE = 3, 2  # mujoco.mjtJoint values
MAX_VALUE = 1e10  # MuJoCo's mjMAXVAL: a state past it is reset by the engine, so it cannot be stepped honestly
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
    cfg = config if isinstance(config, RewardConfig) else validate(config if config is not None else RewardConfig())
    tol = cfg.tolerances
    spec = engine.spec
    s0, acts, im = _check_inputs(spec, start, actions, imagined)
    B, H, S = im.shape
    sc = np.ones(S) if scale is None else check_scale(scale, S, cfg.scale_floor)

    prev = np.concatenate([s0[:, None], im[:, :-1]], axis=1).reshape(B * H, S)
    nxt = im.reshape(B * H, S)
    a = acts.reshape(B * H, -1)
    with np.errstate(invalid="ignore"):
        bad = ~((np.abs(prev) < MAX_VALUE).all(1) & (np.abs(nxt) < MAX_VALUE).all(1) & np.isfinite(a).all(1))
    placeholder = _placeholder(engine, S)
    safe_prev = np.where(bad[:, None], placeholder, prev)
    safe_next = np.where(bad[:, None], placeholder, nxt)
    safe_a = np.where(bad[:, None], 0.0, a)

    n = len(bad)
    pad = _bucket(n) - n if getattr(engine, "name", "") in JIT_ENGINES else 0
    if pad:  # a JAX engine compiles once per batch shape: round the batch up to a power of two
        safe_prev, safe_next = (np.concatenate([x, np.repeat(placeholder[None], pad, 0)]) for x in (safe_prev, safe_next))
        safe_a = np.concatenate([safe_a, np.zeros((pad, safe_a.shape[1]))])
    stepped = np.asarray(engine.step_vectors(safe_prev, safe_a), dtype=np.float64)
    finite_step = (np.abs(stepped) < MAX_VALUE).all(1)
    both = engine.vector_constraints(np.concatenate([safe_next, np.where(finite_step[:, None], stepped, placeholder)]))
    imagined_c, stepped_c = both.rows(slice(0, len(safe_next))), both.rows(slice(len(safe_next), None))
    safe_prev, safe_next, stepped, finite_step = safe_prev[:n], safe_next[:n], stepped[:n], finite_step[:n]
    hinges, joints = _joint_layout(engine, spec)

    with np.errstate(over="ignore", invalid="ignore"):
        diff = safe_next - stepped
        diff[:, hinges] = _wrap(diff[:, hinges])
        residual = np.sqrt(np.mean((diff / sc) ** 2, axis=1))
        kinematic = _kinematic_error(diff, spec.control_dt, engine.task.n_substeps, joints)
    raw = {  # where the engine itself blew up from s, s was no physical state: saturate
        "residual": np.where(finite_step, residual, np.inf),
        "penetration": _excess(imagined_c.penetration, stepped_c.penetration, n),
        "joint_limit": np.where(finite_step, _limit_excess(safe_next, stepped, spec.joint_limits), np.inf),
        "kinematic": np.where(finite_step, kinematic, np.inf),
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


def _limit_excess(imagined: np.ndarray, stepped: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Largest distance ``[N]`` a joint lies further past its limit in the imagined state than in the engine's."""
    def past(states: np.ndarray) -> np.ndarray:
        q = states[:, : len(limits)]
        with np.errstate(invalid="ignore"):
            out = np.maximum(limits[:, 0] - q, q - limits[:, 1])
        return np.where(np.isfinite(limits).all(axis=1), np.clip(out, 0.0, None), 0.0)

    return np.clip(past(imagined) - past(stepped), 0.0, None).max(axis=1, initial=0.0)


def _excess(imagined: np.ndarray, stepped: np.ndarray, n: int) -> np.ndarray:
    """How much a constraint violation of the imagined states exceeds the engine's, ``>= 0``."""
    return np.clip(np.asarray(imagined, np.float64)[:n] - np.asarray(stepped, np.float64)[:n], 0.0, None)


def kinematic_gap(diff: np.ndarray, control_dt: float, n_substeps: int, joints: np.ndarray) -> np.ndarray:
    """``dq - h (n + 1) / 2 * dv`` per hinge/slide joint ``[N, J]`` of deviations ``diff = s' - step(s, a)``."""
    if len(joints) == 0:
        return np.zeros((len(diff), 0))
    h = control_dt / n_substeps
    return diff[:, joints[:, 0]] - h * (n_substeps + 1) / 2.0 * diff[:, joints[:, 1]]


def _kinematic_error(diff: np.ndarray, control_dt: float, n_substeps: int, joints: np.ndarray) -> np.ndarray:
    """Largest change of position ``[N]`` that no force held over the control step explains (joint units)."""
    return np.abs(kinematic_gap(diff, control_dt, n_substeps, joints)).max(axis=1, initial=0.0)
