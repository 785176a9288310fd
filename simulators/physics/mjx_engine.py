"""``mjx`` backend: MuJoCo XLA, jitted and vmapped over the batch (the fast engine on a GPU).

Its state is a batched ``mjx.Data``. Each control step runs ``task.n_substeps`` of ``mjx.step``
inside one compiled function. The model is an argument of the compiled functions, not a
constant baked into them, so engines of one task with other parameters (a sim-to-real gap)
reuse the same compilation; JAX's persistent cache keeps it across processes.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from simulators.jax_setup import configure_jax
from simulators.physics.base import EngineBase
from simulators.tasks import Task

jax = configure_jax()
import jax.numpy as jnp
from mujoco import mjx


@functools.partial(jax.jit, static_argnames="substeps")
def _step(mx, data, ctrl, substeps: int):
    def one(d, u):
        d = d.replace(ctrl=u)
        for _ in range(substeps):
            d = mjx.step(mx, d)
        return d

    return jax.vmap(one)(data, ctrl)


@jax.jit
def _from_vector(mx, vec):
    nq = mx.nq
    return jax.vmap(lambda v: mjx.make_data(mx).replace(qpos=v[:nq], qvel=v[nq:]))(vec)


class MjxEngine(EngineBase):
    name = "mjx"

    def __init__(self, task: Task, params: dict | None = None):
        super().__init__(task, params)
        self.mx = mjx.put_model(self.model)

    def bare_step(self, state, ctrl):
        """The engine call alone: ``jax.vmap(mjx.step)`` over ``n_substeps``, jitted."""
        return _step(self.mx, state, ctrl, self.task.n_substeps)

    def reset(self, key: Any, n: int):
        return self.from_vector(self.initial_vectors(key, n))

    def step(self, state, action: np.ndarray):
        a = self.check_actions(action, state.qpos.shape[0])
        return self.bare_step(state, jnp.asarray(a, dtype=jnp.float32))

    def to_vector(self, state) -> np.ndarray:
        return np.concatenate([np.asarray(state.qpos), np.asarray(state.qvel)], axis=1).astype(np.float64)

    def from_vector(self, vec: np.ndarray):
        return _from_vector(self.mx, jnp.asarray(self.check_vectors(vec), dtype=jnp.float32))
