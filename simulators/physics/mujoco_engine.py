"""``mujoco`` backend: MuJoCo's C engine stepping the batch on a thread pool (``mujoco.rollout``).

The fast engine on a CPU and the reference the JAX backends are tested against. Its state is
the float64 state-vector batch ``[n, nq + nv]`` itself.
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np
from mujoco import rollout

from simulators.physics.agreement import Agreement
from simulators.physics.base import EngineBase, _num_threads
from simulators.tasks import Task

SERIAL_BELOW = 32   # envs: a smaller batch steps in the calling thread (waking the pool costs more than it saves)


class MujocoEngine(EngineBase):
    name = "mujoco"
    agreement = Agreement(note="MuJoCo's C engine itself, stepped by mujoco.rollout")

    def __init__(self, task: Task, params: dict | None = None, nthread: int | None = None):
        super().__init__(task, params)
        self.nthread = nthread or _num_threads()
        self._datas = [mujoco.MjData(self.model) for _ in range(self.nthread)]
        self._rollout = rollout.Rollout(nthread=self.nthread)
        self._serial = rollout.Rollout(nthread=0)
        self._state_size = mujoco.mj_stateSize(self.model, mujoco.mjtState.mjSTATE_FULLPHYSICS)

    def reset(self, key: Any, n: int) -> np.ndarray:
        return self.initial_vectors(key, n).astype(np.float64)

    def step(self, state: np.ndarray, action: np.ndarray) -> np.ndarray:
        s = self.check_vectors(state)
        return self.bare_step(s, self.check_actions(action, len(s)))

    def bare_step(self, s: np.ndarray, a: np.ndarray) -> np.ndarray:
        """The engine call alone (no checks): ``mujoco.rollout`` over ``n_substeps``."""
        n, nqv = len(s), self.spec.state_size
        full = np.zeros((n, self._state_size))
        full[:, 1 : 1 + nqv] = s
        control = np.repeat(a[:, None, :], self.task.n_substeps, axis=1)
        runner, datas = (self._serial, self._datas[:1]) if n < SERIAL_BELOW else (self._rollout, self._datas)
        states, _ = runner.rollout(self.model, datas, full, control, nstep=self.task.n_substeps)
        return states[:, -1, 1 : 1 + nqv]

    def to_vector(self, state: np.ndarray) -> np.ndarray:
        return np.asarray(state, dtype=np.float64)

    def from_vector(self, vec: np.ndarray) -> np.ndarray:
        return self.check_vectors(vec).copy()

    def close(self) -> None:
        self._rollout.close()
        self._serial.close()
        super().close()
