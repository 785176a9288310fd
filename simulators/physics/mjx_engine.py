"""``mjx`` backend: MuJoCo XLA, jitted and vmapped over the batch (the fast engine on a GPU).

Its state is a batched ``mjx.Data``. Each control step runs ``task.n_substeps`` of ``mjx.step``
inside one compiled function; jitted functions are built once per engine and cached on disk
by JAX's persistent compilation cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulators.jax_setup import configure_jax
from simulators.physics.base import EngineBase
from simulators.tasks import Task

jax = configure_jax()
import jax.numpy as jnp  # noqa: E402
from mujoco import mjx  # noqa: E402


class MjxEngine(EngineBase):
    name = "mjx"

    def __init__(self, task: Task, params: dict | None = None):
        super().__init__(task, params)
        self.mx = mjx.put_model(self.model)
        mx, nq, substeps = self.mx, self.model.nq, task.n_substeps

        def one_step(d, u):
            d = d.replace(ctrl=u)
            for _ in range(substeps):
                d = mjx.step(mx, d)
            return d

        def one_from_vector(v):
            return mjx.make_data(mx).replace(qpos=v[:nq], qvel=v[nq:])

        self.bare_step = jax.jit(jax.vmap(one_step))
        self._from_vector = jax.jit(jax.vmap(one_from_vector))

    def reset(self, key: Any, n: int):
        return self.from_vector(self.initial_vectors(key, n))

    def step(self, state, action: np.ndarray):
        a = self.check_actions(action, state.qpos.shape[0])
        return self.bare_step(state, jnp.asarray(a, dtype=jnp.float32))

    def to_vector(self, state) -> np.ndarray:
        return np.concatenate([np.asarray(state.qpos), np.asarray(state.qvel)], axis=1).astype(np.float64)

    def from_vector(self, vec: np.ndarray):
        return self._from_vector(jnp.asarray(self.check_vectors(vec), dtype=jnp.float32))
