"""The planning agent as a policy: observations in, actions out, committing to one plan per imagination window.

    policy = PlannerPolicy(planner, window=5, episode_length=100)
    a = policy.act(obs, skip=held)                      # in the served simulator (next-step reset) ...
    policy.observe(next_obs, live=~held, ended=ended)    # ... then what the actions led to
    a = policy(obs)                                     # in reality: a plain observations -> actions
    policy.save(path); policy = PlannerPolicy.load(path)  # world model and settings in one verified file

With ``replan="window"`` an env plans when its episode step is a multiple of ``window`` (the served
simulator's imagination horizon, whose windows start at the same steps) and executes that plan's
first ``window`` actions: the trajectory it imagined for them is the one the service grades. With
``replan="step"`` it replans every step (receding horizon) and reports the world model's imagination
of the actions it executed. Each closed window is summarised in ``windows`` (start, actions, imagined).

Called as a plain function (``Reality.rollout``), the policy cannot be told where episodes start: it
counts calls and starts every env afresh every ``episode_length`` calls or when the batch size changes,
which is how ``Reality`` runs episodes (all envs together, for exactly ``episode_length`` steps).
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.checkpoint import CheckpointError, read_verified, write_verified
from policies.planner import ObservationInverse, Planner, PlannerConfig

MAGIC = b"FLYWHEEL-PLAN\x00"
FORMAT = 1


@dataclass
class Window:
    """One closed imagination window of one env, as the agent saw it."""

    env: int
    episode: int               # the served episode id (-1 where not told)
    episode_step: int          # step of the episode the window started at
    start: np.ndarray          # [S] the state the plan started from (from the observation)
    actions: np.ndarray        # [H, A] executed
    imagined: np.ndarray       # [H, S] the agent's imagination of them
    actual: np.ndarray         # [H, S] the states observed after each action


class PlannerPolicy:
    """A ``Planner`` acting over a batch of envs, one imagination window at a time."""

    def __init__(self, planner: Planner, window: int, episode_length: int, keep_windows: int = 0,
                 world_model_bytes: bytes | None = None):
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if planner.cfg.replan == "window" and planner.cfg.horizon < int(window):
            raise ValueError(f"planner horizon {planner.cfg.horizon} is shorter than the imagination window {window}; "
                             "with replan=window each plan must cover the window it commits to")
        self.planner, self.window, self.episode_length = planner, int(window), int(episode_length)
        self.inverse = ObservationInverse(planner.task, planner.wm.state_size)
        self.windows: deque[Window] = deque(maxlen=max(0, int(keep_windows)) or None)
        self.keep = int(keep_windows)
        self.world_model_bytes = world_model_bytes
        self.errors: list[float] = []          # normalised squared imagination error of each closed window
        self.plan_seconds = 0.0
        self.plans = 0
        self._n, self._calls = -1, 0

    # -- acting --------------------------------------------------------------------------------
    def reset(self, n: int) -> None:
        """Forget every env's plan and window; ``n`` envs start episodes at their next observation."""
        H, S, A = self.planner.cfg.horizon, self.planner.wm.state_size, len(self.planner.low)
        w = self.window
        self._n = int(n)
        self._t = np.zeros(n, np.int64)
        self._plan = np.zeros((n, H, A))
        self._plan_imagined = np.zeros((n, H, S))
        self._k = np.zeros(n, np.int64)                 # index into the current plan
        self._start = np.zeros((n, S))
        self._actions = np.zeros((n, w, A))
        self._imagined = np.zeros((n, w, S))
        self._actual = np.zeros((n, w, S))
        self._fresh = np.ones(n, bool)
        self._episode = np.full(n, -1, np.int64)

    def act(self, obs: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        """Actions ``[B, A]`` for observations ``[B, O]``; envs in ``skip`` (a next-step reset) get the mid action
        and their clocks do not move. An env marked fresh (``reset``, an ended episode) starts a new episode."""
        obs = np.asarray(obs)
        if len(obs) != self._n:
            self.reset(len(obs))
        live = np.ones(self._n, bool) if skip is None else ~np.asarray(skip, bool)
        states = self.inverse(obs)
        start = live & self._fresh
        self._t[start], self._k[start] = 0, 0
        self._fresh &= ~live
        due = live & ((self._t % self.window == 0) | (self.planner.cfg.replan == "step"))
        if due.any():
            t0 = time.perf_counter()
            plan = self.planner.plan(states[due], self._shifted(due))
            self.plan_seconds += time.perf_counter() - t0
            self.plans += 1
            self._plan[due], self._plan_imagined[due], self._k[due] = plan.actions, plan.imagined, 0
        opens = live & (self._t % self.window == 0)
        self._start[opens] = states[opens]
        actions = np.tile(self.planner.mid, (self._n, 1))
        rows = np.flatnonzero(live)
        actions[rows] = self._plan[rows, self._k[rows]]
        j = self._t[rows] % self.window
        self._actions[rows, j] = actions[rows]
        if self.planner.cfg.replan == "window":
            self._imagined[rows, j] = self._plan_imagined[rows, self._k[rows]]
        self._k[rows] += 1
        self._t[rows] += 1
        return actions.astype(np.float32)

    def observe(self, obs: np.ndarray, live: np.ndarray | None = None, ended: np.ndarray | None = None,
                episode_ids: np.ndarray | None = None) -> None:
        """The observations that followed the last actions: windows that are full close; ``ended`` envs start afresh.

        ``live``: envs that acted (default all); ``episode_ids``: the episode of each env's transition (reported
        with the windows); an ended env's observation is its final one (next-step reset), not the new episode's.
        """
        live = np.ones(self._n, bool) if live is None else np.asarray(live, bool)
        rows = np.flatnonzero(live & ~self._fresh & (self._t > 0))
        if len(rows):
            states = self.inverse(np.asarray(obs)[rows])
            j = (self._t[rows] - 1) % self.window
            self._actual[rows, j] = states
            if episode_ids is not None:
                self._episode[rows] = np.asarray(episode_ids)[rows]
            for i in rows[j == self.window - 1]:
                self._close(int(i))
        if ended is not None:
            self._fresh |= np.asarray(ended, bool)

    def _shifted(self, due: np.ndarray) -> np.ndarray:
        """Each due env's remaining plan, shifted to start now and padded with its last action (normalised)."""
        H = self.planner.cfg.horizon
        idx = np.minimum(self._k[due][:, None] + np.arange(H)[None], H - 1)
        u = self.planner.to_unit(np.take_along_axis(self._plan[due], idx[:, :, None], axis=1))
        u[self._t[due] == 0] = 0.0
        return u

    def _close(self, i: int) -> None:
        if self.planner.cfg.replan == "step":
            self._imagined[i] = self.planner.wm.imagine(self._start[i][None], self._actions[i][None])[0]
        d = self.inverse.difference(self._imagined[i], self._actual[i]) / self.planner.wm.state_scale
        self.errors.append(float(np.mean(d**2)))
        if self.keep:
            self.windows.append(Window(i, int(self._episode[i]), int(self._t[i] - self.window), self._start[i].copy(),
                                       self._actions[i].copy(), self._imagined[i].copy(), self._actual[i].copy()))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Plain ``observations -> actions`` for ``Reality``: episodes restart every ``episode_length`` calls."""
        obs = np.asarray(obs)
        if len(obs) != self._n or self._calls % self.episode_length == 0:
            self.reset(len(obs))
            self._calls = 0
        else:
            self.observe(obs)
        self._calls += 1
        return self.act(obs)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One verified file: planner settings, action bounds, window, the world model and any warm-start policy."""
        if self.world_model_bytes is None:
            with tempfile.TemporaryDirectory() as tmp:
                self.planner.wm.save(Path(tmp) / "wm.pt")
                self.world_model_bytes = (Path(tmp) / "wm.pt").read_bytes()
        warm = self.planner.warm_policy
        payload = {"format": FORMAT, "planner": self.planner.cfg.to_dict(), "action_low": self.planner.low.tolist(),
                   "action_high": self.planner.high.tolist(), "window": self.window,
                   "episode_length": self.episode_length, "world_model": self.world_model_bytes,
                   "warm_policy": None if warm is None else {"config": warm.config(), "state_dict": warm.state_dict()}}
        write_verified(path, payload, MAGIC)

    @classmethod
    def load(cls, path: str | Path) -> PlannerPolicy:
        """Load a file written by ``save``; ``CheckpointError`` naming the file for any defect."""
        blob = read_verified(path, MAGIC, "planner file")
        need = {"planner", "action_low", "action_high", "window", "episode_length", "world_model"}
        if blob.get("format") != FORMAT or not need <= set(blob):
            raise CheckpointError(f"planner file {path} has format {blob.get('format')!r}, expected {FORMAT} "
                                  f"with {sorted(need)}")
        try:
            return from_parts(blob["world_model"], PlannerConfig.from_object(blob["planner"]), blob["action_low"],
                              blob["action_high"], blob["window"], blob["episode_length"], blob.get("warm_policy"))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"planner file {path} does not describe a planner: {exc}") from exc


def load_world_model(blob: bytes):
    """A ``WorldModel`` from its checkpoint bytes (digest-checked by its loader)."""
    from simulators.world_model import WorldModel

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "wm.pt").write_bytes(blob)
        return WorldModel.load(Path(tmp) / "wm.pt")


def warm_policy_from(spec: dict | None):
    """A ``TorchPolicy`` from ``{"config", "state_dict"}`` (or ``None``)."""
    if spec is None:
        return None
    from policies.torch_policy import TorchPolicy

    policy = TorchPolicy(**spec["config"])
    policy.load_state_dict(spec["state_dict"])
    return policy


def warm_policy_spec(path: str) -> dict | None:
    """The warm-start policy file at ``path`` as ``{"config", "state_dict"}`` ("" = none)."""
    if not path:
        return None
    from policies.torch_policy import TorchPolicy

    policy = TorchPolicy.load(path)
    return {"config": policy.config(), "state_dict": policy.state_dict()}


def from_parts(world_model_bytes: bytes, config: PlannerConfig, action_low, action_high, window: int,
               episode_length: int, warm: dict | None = None, keep_windows: int = 0, seed: int = 0) -> PlannerPolicy:
    """A ``PlannerPolicy`` from the world model's checkpoint bytes, settings and bounds (``seed``: its sampling)."""
    wm = load_world_model(world_model_bytes)
    planner = Planner(wm, config, action_low, action_high, warm_policy_from(warm), seed)
    return PlannerPolicy(planner, window, episode_length, keep_windows, world_model_bytes)
