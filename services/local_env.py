"""``LocalVectorEnv``: the gymnasium ``VectorEnv`` of ``RemoteVectorEnv`` over an in-process session.

The same session code as the server (``services.session``: corrected simulator, grading, optional
recording) and the same next-step autoreset conversion (``SimulatorVectorEnv``), without the wire.
Used for benchmarks and to compare a served env with an in-process one.

    env = LocalVectorEnv("pendulum", num_envs=64, fidelity=0.5, config=ServerConfig(engine="mujoco"))
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(actions)
"""

from __future__ import annotations

import itertools

import numpy as np

from services.client import StepReply
from services.config import ServerConfig
from services.models import ModelStore
from services.session import TERMS, SessionRequest, open_session
from services.vector_env import SimulatorVectorEnv


class LocalVectorEnv(SimulatorVectorEnv):
    """A ``VectorEnv`` over an in-process ``CorrectedSimulator`` session (imports the physics and torch)."""

    def __init__(self, task: str, num_envs: int, fidelity: float = 1.0, mode: str = "blend", seed: int = 0,
                 reward_weights: dict[str, float] | None = None, horizon: int = 0, world_model=None,
                 config: ServerConfig | None = None, normalized_actions: bool = False):
        self.config = config or ServerConfig(task=task)
        if world_model is None and not self.config.world_model_path:
            self.config = ServerConfig(**{**vars(self.config), "task": task})
        self.models = ModelStore(self.config, world_model)
        offsets = itertools.count()
        request = SessionRequest(task, num_envs, fidelity, mode, seed, "", dict(reward_weights or {}), horizon)
        self.session = open_session(self.config, self.models, request,
                                    lambda: self.config.episode_offset + next(offsets) * 2**32)
        self._setup(self.session.info, normalized_actions)

    def _reset(self, seed: int | list[int] | None) -> np.ndarray:
        return self.session.restart(seed)

    def _episode_ids(self) -> np.ndarray:
        return self.session.start_ids()

    def _step(self, actions: np.ndarray, hold: np.ndarray | None = None) -> StepReply:
        r, g = self.session.advance(actions, hold)
        window = np.zeros(self.num_envs, bool) if r.window is None else np.asarray(r.window.mask, bool)
        f32 = np.float32
        return StepReply(np.asarray(r.observations, f32), np.asarray(r.final_observations, f32),
                         np.asarray(g["total"], f32), {k: np.asarray(g[k], f32) for k in TERMS},
                         np.asarray(r.terminated, bool), np.asarray(r.truncated, bool), np.asarray(r.success, bool),
                         np.asarray(r.episode_ids, np.int64), np.asarray(r.steps, np.int32), window,
                         self.session.wm_version)

    def close_extras(self, **kwargs) -> None:
        self.session.close()            # recordings written, the engine closed
