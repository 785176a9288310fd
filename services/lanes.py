"""``LanedVectorEnv``: one batch of envs served as several sessions ("lanes") that can be stepped in turn.

    env = LanedVectorEnv(lambda lane, n, seed: RemoteVectorEnv(address, "pendulum", n, seed=seed),
                         num_envs=16, lanes=2, seed=0)
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(actions)       # both lanes on the wire at once
    env.lanes[0].step_async(a0); env.lanes[1].step_async(a1)         # or one lane at a time:
    out0 = env.lanes[0].step_wait()                                    # lane 0's answer while lane 1 is served

Lanes of one server share one client (one channel: ``RemoteVectorEnv(client=...)``; ``on_close`` closes
it after the lanes). A policy worker that steps lane 0, computes lane 1's actions while the server steps lane 0, and so on
(``policies.pipelined_sampler``) keeps both its own core and the server's busy. Stepped whole, the env is
one gymnasium ``VectorEnv`` of ``num_envs`` envs with next-step autoreset: lane ``l`` holds envs
``bounds[l][0]:bounds[l][1]``. Each lane is its own session with its own seed
(``seed + LANE_SEED_STRIDE * l``), so its episodes, recordings and episode ids are its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from services.vector_env import SimulatorVectorEnv, check_actions

LANE_SEED_STRIDE = 500_009   # seed distance of lanes (runners are 1000 apart, re-created sessions 1_000_003)
MAX_LANES = 8


class LanedVectorEnv(VectorEnv):
    """``num_envs`` envs as ``lanes`` sessions made by ``make_lane(lane, num_envs, seed)``."""

    metadata: ClassVar[dict] = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}
    render_mode = None

    def __init__(self, make_lane: Callable[[int, int, int], SimulatorVectorEnv], num_envs: int, lanes: int,
                 seed: int = 0, on_close: Callable[[], None] | None = None):
        self._on_close, self.lanes = None, []    # until every lane is open, a failure closes what was opened
        try:
            if not 1 <= int(lanes) <= min(MAX_LANES, int(num_envs)):
                raise ValueError(f"lanes must be in [1, min({MAX_LANES}, num_envs={num_envs})], got {lanes!r}")
            self.sizes = [len(part) for part in np.array_split(np.arange(int(num_envs)), int(lanes))]
            edges = np.cumsum([0, *self.sizes])
            self.bounds = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
            for lane, n in enumerate(self.sizes):
                self.lanes.append(make_lane(lane, n, lane_seed(seed, lane)))
        except BaseException:
            for env in self.lanes:
                env.close()
            if on_close is not None:
                on_close()
            raise
        self._on_close = on_close
        first = self.lanes[0]
        self.num_envs = int(num_envs)
        self.session_info = first.session_info
        self.single_observation_space = first.single_observation_space
        self.single_action_space = first.single_action_space
        self.physical_action_space = first.physical_action_space    # the task's bounds (see ``normalized_actions``)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

    @property
    def client(self):
        """The first lane's client (the server this env talks to), where the lanes are served."""
        return getattr(self.lanes[0], "client", None)

    @property
    def sessions_recreated(self) -> int:
        return sum(getattr(env, "sessions_recreated", 0) for env in self.lanes)

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        self._check_open()
        super().reset(seed=seed if isinstance(seed, int) else None)
        if isinstance(seed, (list, tuple, np.ndarray)) and len(seed) != self.num_envs:
            raise ValueError(f"a list of seeds needs one per env: got {len(seed)} for {self.num_envs} envs")
        results = []
        for lane, (env, (lo, hi)) in enumerate(zip(self.lanes, self.bounds, strict=True)):
            lane_seeds = (list(seed[lo:hi]) if isinstance(seed, (list, tuple, np.ndarray))
                          else None if seed is None else lane_seed(int(seed), lane))
            lane_options = None if options is None else {**options, **(
                {"reset_mask": np.asarray(options["reset_mask"])[lo:hi]} if "reset_mask" in options else {})}
            results.append(env.reset(seed=lane_seeds, options=lane_options))
        return np.concatenate([obs for obs, _ in results]), merge_infos([info for _, info in results], self.sizes)

    def step(self, actions):
        self._check_open()
        a = check_actions(actions, self.action_space.shape)
        for env, (lo, hi) in zip(self.lanes, self.bounds, strict=True):
            env.step_async(a[lo:hi])
        outs = [env.step_wait() for env in self.lanes]
        obs, reward, terminated, truncated = (np.concatenate([o[i] for o in outs]) for i in range(4))
        return obs, reward, terminated, truncated, merge_infos([o[4] for o in outs], self.sizes)

    def _check_open(self) -> None:
        if getattr(self, "closed", False):
            raise RuntimeError("LanedVectorEnv is closed; create a new env")

    def close_extras(self, **kwargs) -> None:
        errors = []
        for close in [env.close for env in self.lanes] + ([self._on_close] if self._on_close else []):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - close every lane, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def lane_seed(seed: int, lane: int) -> int:
    return int(seed) + LANE_SEED_STRIDE * int(lane)


def merge_infos(infos: list[dict], sizes: list[int]) -> dict:
    """The lanes' vector infos as one: every key's arrays concatenated in lane order (each lane reports
    the same keys on a step; a key some lane lacks is missing, with its mask, for that lane's envs)."""
    if len(infos) == 1:
        return infos[0]
    out: dict[str, np.ndarray] = {}
    for key in dict.fromkeys(k for info in infos for k in info):
        parts = []
        for info, n in zip(infos, sizes, strict=True):
            if key in info:
                parts.append(np.asarray(info[key]))
            elif key.startswith("_"):
                parts.append(np.zeros(n, bool))
            else:
                ref = next(np.asarray(i[key]) for i in infos if key in i)
                parts.append(np.zeros((n, *ref.shape[1:]), ref.dtype))
        out[key] = np.concatenate(parts)
    return out

