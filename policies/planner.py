"""Planning in the world model: CEM or MPPI over H-step action sequences, batched over envs and candidates.

    planner = Planner(wm, PlannerConfig(horizon=15), action_low, action_high)
    plan = planner.plan(states)             # states [B, S] -> Plan: actions [B, H, A], imagined [B, H, S]
    a = plan.actions[:, 0]                  # act on the plan (``policies.planner_policy`` commits to a window)

Every candidate sequence of every env is rolled out open loop through the world model's ensemble
mean in one batch per step (``B x candidates`` rows) and scored by the task's dense reward plus a
bonus for every step in the task's success region (success is a trailing run of such steps, and the
dense reward alone barely tells the region's edge apart), minus an optional penalty on the ensemble's
predictive spread. The chosen plan's ``imagined`` trajectory is ``wm.imagine(states, plan.actions)``:
exactly the open-loop prediction the simulator service grades for the same start and actions. A
warm-start policy (a PPO ``TorchPolicy``) is rolled closed loop through the world model to give the
initial mean that the search refines (and a candidate itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

METHODS = ("cem", "mppi")
REPLAN = ("window", "step")


@dataclass
class PlannerConfig:
    """How the planner searches (the ``agent`` section of a run's config, ``kind`` aside)."""

    method: str = "cem"              # cem | mppi
    horizon: int = 15                # planning horizon in steps (>= the imagination window when replan=window)
    candidates: int = 64             # action sequences per env per iteration
    iterations: int = 3              # refinements of the sampling distribution per plan
    elites: int = 8                  # CEM: best candidates the distribution is refitted to
    temperature: float = 0.5         # MPPI: softmax temperature over returns (in reward units)
    init_std: float = 0.5            # initial sampling std, as a fraction of the half action range
    min_std: float = 0.05            # floor of the sampling std (same units)
    momentum: float = 0.1            # weight of the previous mean/std in each refit
    discount: float = 1.0            # per-step discount of imagined rewards
    uncertainty_penalty: float = 0.0  # subtract this x the mean normalised predictive std per step
    success_bonus: float = 1.0       # add this per imagined step in which the task's success predicate holds
    replan: str = "window"           # window: commit to each imagination window's plan; step: replan every step
    warm_start: str = ""             # a TorchPolicy file (a PPO run's policy_lapNNN.pt) to plan around; "" = none
    num_workers: int = 1             # Ray workers, each stepping one session of the served simulator
    torch_threads: int = 1           # torch CPU threads while planning (small batches: 1 is fastest); 0 = torch's own

    def validate(self) -> PlannerConfig:
        """Raise ``ValueError`` naming the first bad field and what is allowed."""
        if self.method not in METHODS:
            raise ValueError(f"PlannerConfig.method is {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.replan not in REPLAN:
            raise ValueError(f"PlannerConfig.replan is {self.replan!r}; allowed: {', '.join(REPLAN)}")
        for name in ("horizon", "candidates", "iterations", "elites", "num_workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PlannerConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if int(self.torch_threads) < 0:
            raise ValueError(f"PlannerConfig.torch_threads must be >= 0 (0 = torch's own setting), "
                             f"got {self.torch_threads!r}")
        if self.method == "cem" and self.elites > self.candidates:   # mppi weights every candidate: no elites
            raise ValueError(f"PlannerConfig.elites ({self.elites}) must be <= candidates ({self.candidates}) "
                             "with method cem")
        for name, lo, hi in (("init_std", 0.0, 2.0), ("min_std", 0.0, 2.0), ("momentum", 0.0, 0.99),
                             ("discount", 0.0, 1.0)):
            value = getattr(self, name)
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"PlannerConfig.{name} must be in [{lo}, {hi}], got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"PlannerConfig.temperature must be > 0, got {self.temperature!r}")
        for name in ("uncertainty_penalty", "success_bonus"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PlannerConfig.{name} must be a number >= 0, got {value!r}")
        if self.min_std > self.init_std:
            raise ValueError(f"PlannerConfig.min_std ({self.min_std}) must be <= init_std ({self.init_std})")
        return self

    @classmethod
    def from_object(cls, obj) -> PlannerConfig:
        """The planner fields of any object or dict that has them (e.g. the flywheel's ``agent`` section)."""
        get = obj.get if isinstance(obj, dict) else lambda k, d: getattr(obj, k, d)
        return cls(**{f.name: get(f.name, getattr(cls, f.name)) for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """The planner's answer for a batch of start states."""

    actions: np.ndarray      # [B, H, A] the chosen sequence, within the action bounds
    imagined: np.ndarray     # [B, H, S] wm.imagine(states, actions)
    returns: np.ndarray      # [B] its imagined (discounted, penalised) return


class ObservationInverse:
    """States from observations for tasks whose observation is the state with angles as (cos, sin).

    Found numerically from ``task.observe``: each state dimension is either copied into a column or
    appears as a cos/sin pair; other observations cannot be planned from and raise ``ValueError``.
    Angles come back in [-pi, pi): the world model and the task's reward see them only through
    cos/sin, so a plan is the same, and its imagined angles differ from the served ones by 2 pi k.
    """

    def __init__(self, task, state_size: int):
        rng = np.random.default_rng(0)
        x = rng.uniform(-3.0, 3.0, size=(64, int(state_size)))
        obs = np.asarray(task.observe(x), dtype=np.float64)
        self.copy: list[tuple[int, int]] = []
        self.angles: list[tuple[int, int, int]] = []
        for j in range(x.shape[1]):
            same = [c for c in range(obs.shape[1]) if np.allclose(obs[:, c], x[:, j])]
            cos = [c for c in range(obs.shape[1]) if np.allclose(obs[:, c], np.cos(x[:, j]))]
            sin = [c for c in range(obs.shape[1]) if np.allclose(obs[:, c], np.sin(x[:, j]))]
            if same:
                self.copy.append((j, same[0]))
            elif cos and sin:
                self.angles.append((j, cos[0], sin[0]))
            else:
                raise ValueError(f"task {task.name!r}: state dimension {j} cannot be read back from the observation; "
                                 "the planner needs observations that hold each state value or its angle's cos/sin")
        self.state_size = int(state_size)
        self.angle_dims = np.array([j for j, *_ in self.angles], dtype=np.int64)

    @classmethod
    def for_task(cls, task) -> ObservationInverse:
        """The inverse for ``task``'s state vectors (their size taken from its initial states)."""
        return cls(task, task.initial_states(np.random.default_rng(0), 1).shape[1])

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        s = np.empty((len(obs), self.state_size))
        for j, c in self.copy:
            s[:, j] = obs[:, c]
        for j, c, si in self.angles:
            s[:, j] = np.arctan2(obs[:, si], obs[:, c])
        return s

    def difference(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a - b`` with angle dimensions wrapped to [-pi, pi)."""
        d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
        if len(self.angle_dims):
            d[..., self.angle_dims] = (d[..., self.angle_dims] + math.pi) % (2 * math.pi) - math.pi
        return d


class Planner:
    """CEM or MPPI in the normalised action space [-1, 1], batched over envs and candidates."""

    def __init__(self, world_model, config: PlannerConfig, action_low, action_high,
                 warm_policy: Callable | None = None, seed: int = 0):
        self.wm, self.cfg = world_model, config.validate()
        self.task = world_model.task
        self.low = np.asarray(action_low, np.float64).ravel()
        self.high = np.asarray(action_high, np.float64).ravel()
        if self.low.shape != (world_model.action_size,) or not (self.low < self.high).all():
            raise ValueError(f"action bounds {self.low} .. {self.high} do not fit the world model's "
                             f"{world_model.action_size} action(s)")
        self.mid, self.half = (self.high + self.low) / 2, (self.high - self.low) / 2
        self.warm_policy = warm_policy
        self.scale = torch.as_tensor(np.asarray(world_model.state_scale, np.float64))
        self.rng = np.random.default_rng(seed)

    def to_actions(self, u: np.ndarray) -> np.ndarray:
        return self.mid + np.clip(u, -1.0, 1.0) * self.half

    def to_unit(self, a: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(a, np.float64) - self.mid) / self.half, -1.0, 1.0)

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def returns(self, states: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Imagined return of each sequence: ``states [B, S]``, ``u [B, N, H, A]`` (normalised) -> ``[B, N]``."""
        B, N, H, A = u.shape
        s = torch.as_tensor(np.repeat(np.asarray(states, np.float64), N, axis=0))
        a = torch.as_tensor(self.to_actions(u).reshape(B * N, H, A))
        total = np.zeros(B * N)
        for h in range(H):
            s, std = self.wm.predict(s, a[:, h])
            r = np.asarray(self.task.reward(s.numpy(), a[:, h].numpy()), np.float64)
            if self.cfg.success_bonus:
                r = r + self.cfg.success_bonus * np.asarray(self.task.is_good(s.numpy()), np.float64)
            if self.cfg.uncertainty_penalty:
                r = r - self.cfg.uncertainty_penalty * (std / self.scale).mean(1).numpy()
            total += self.cfg.discount ** h * np.where(np.isfinite(r), r, -1e9)
        return total.reshape(B, N)

    @torch.inference_mode()
    def policy_sequence(self, states: np.ndarray, horizon: int) -> np.ndarray:
        """The warm-start policy rolled closed loop through the world model: normalised ``[B, H, A]``."""
        s = np.asarray(states, np.float64)
        out = np.empty((len(s), horizon, len(self.low)))
        for h in range(horizon):
            a = np.asarray(self.warm_policy(self.task.observe(s).astype(np.float32)), np.float64)
            out[:, h] = self.to_unit(a.reshape(len(s), -1))
            s = self.wm.step(s, self.to_actions(out[:, h]))
        return out

    # -- search --------------------------------------------------------------------------------
    def plan(self, states: np.ndarray, init: np.ndarray | None = None) -> Plan:
        """The best sequence found for each start state; ``init`` is a normalised initial mean ``[B, H, A]``."""
        from simulators.world_model.model import torch_threads

        with torch_threads(int(self.cfg.torch_threads)):
            return self._plan(states, init)

    def _plan(self, states: np.ndarray, init: np.ndarray | None) -> Plan:
        cfg, states = self.cfg, np.asarray(states, np.float64)
        B, H, A = len(states), cfg.horizon, len(self.low)
        mean = np.zeros((B, H, A)) if init is None else np.array(init, np.float64).reshape(B, H, A)
        if self.warm_policy is not None:
            mean = self.policy_sequence(states, H)
        std = np.full((B, H, A), cfg.init_std)
        best_u, best_r = mean.copy(), np.full(B, -np.inf)
        rows = np.arange(B)
        for _ in range(cfg.iterations):
            noise = self.rng.standard_normal((B, cfg.candidates, H, A))
            u = np.clip(mean[:, None] + std[:, None] * noise, -1.0, 1.0)
            u[:, 0] = mean                                   # the current mean is always a candidate
            r = self.returns(states, u)
            top = np.argmax(r, axis=1)
            better = r[rows, top] > best_r
            best_u[better], best_r[better] = u[rows, top][better], r[rows, top][better]
            new_mean, new_std = self._refit(u, r)
            mean = cfg.momentum * mean + (1 - cfg.momentum) * new_mean
            std = np.maximum(cfg.momentum * std + (1 - cfg.momentum) * new_std, cfg.min_std)
        actions = self.to_actions(best_u)
        return Plan(actions, self.wm.imagine(states, actions), best_r)

    def _refit(self, u: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The next sampling mean and std from candidates ``u [B, N, H, A]`` and their returns ``r [B, N]``."""
        if self.cfg.method == "cem":
            idx = np.argsort(-r, axis=1)[:, : self.cfg.elites]
            elite = np.take_along_axis(u, idx[:, :, None, None], axis=1)
            return elite.mean(1), elite.std(1)
        z = (r - r.max(axis=1, keepdims=True)) / self.cfg.temperature
        w = np.exp(z)
        w /= w.sum(axis=1, keepdims=True)
        mean = np.einsum("bn,bnha->bha", w, u)
        var = np.einsum("bn,bnha->bha", w, (u - mean[:, None]) ** 2)
        return mean, np.sqrt(var)
