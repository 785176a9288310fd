"""``brax`` backend: Brax's generalized pipeline on a system loaded from the same MJCF.

Its state is a batched ``brax.generalized.base.State``; ``q``/``qd`` are MuJoCo's qpos/qvel.
Brax integrates and resolves contacts its own way, so it agrees with MuJoCo on smooth
dynamics (e.g. a pendulum's period) rather than to the last digit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulators.jax_setup import configure_jax
from simulators.physics.base import EngineBase
from simulators.tasks import Task

jax = configure_jax()
import jax.numpy as jnp  # noqa: E402
from brax.generalized import pipeline  # noqa: E402
from brax.io import mjcf  # noqa: E402


class BraxEngine(EngineBase):
    name = "brax"

    def __init__(self, task: Task, params: dict | None = None):
        super().__init__(task, params)
        self.sys = mjcf.load_model(self.model)
        sys, substeps = self.sys, task.n_substeps

        def one_step(state, u):
            for _ in range(substeps):
                state = pipeline.step(sys, state, u)
            return state

        def one_init(v):
            return pipeline.init(sys, v[: sys.q_size()], v[sys.q_size():])

        self.bare_step = jax.jit(jax.vmap(one_step))
        self._from_vector = jax.jit(jax.vmap(one_init))

    def reset(self, key: Any, n: int):
        return self.from_vector(self.initial_vectors(key, n))

    def step(self, state, action: np.ndarray):
        a = self.check_actions(action, state.q.shape[0])
        return self.bare_step(state, jnp.asarray(a, dtype=jnp.float32))

    def to_vector(self, state) -> np.ndarray:
        return np.concatenate([np.asarray(state.q), np.asarray(state.qd)], axis=1).astype(np.float64)

    def from_vector(self, vec: np.ndarray):
        return self._from_vector(jnp.asarray(self.check_vectors(vec), dtype=jnp.float32))
