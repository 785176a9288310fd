"""``brax`` backend: Brax's generalized pipeline on a system loaded from the same MJCF.

Its state is a batched ``brax.generalized.base.State``; ``q``/``qd`` are MuJoCo's qpos/qvel.
Brax integrates and resolves contacts its own way, so it agrees with MuJoCo on smooth
dynamics (e.g. a pendulum's period) rather than to the last digit. As in the ``mjx``
backend, the system is an argument of the compiled functions.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from simulators.jax_setup import configure_jax
from simulators.physics.base import EngineBase
from simulators.tasks import Task

jax = configure_jax()
import jax.numpy as jnp
from brax.generalized import pipeline
from brax.io import mjcf


@functools.partial(jax.jit, static_argnames="substeps")
def _step(sys, state, act, substeps: int):
    def one(s, u):
        for _ in range(substeps):
            s = pipeline.step(sys, s, u)
        return s

    return jax.vmap(one)(state, act)


@jax.jit
def _from_vector(sys, vec):
    nq = sys.q_size()
    return jax.vmap(lambda v: pipeline.init(sys, v[:nq], v[nq:]))(vec)


class BraxEngine(EngineBase):
    name = "brax"

    def __init__(self, task: Task, params: dict | None = None):
        super().__init__(task, params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Brax's notice that MJX is its maintained successor
            self.sys = mjcf.load_model(self.model)

    def bare_step(self, state, act):
        """The engine call alone: ``jax.vmap(pipeline.step)`` over ``n_substeps``, jitted."""
        return _step(self.sys, state, act, self.task.n_substeps)

    def reset(self, key: Any, n: int):
        return self.from_vector(self.initial_vectors(key, n))

    def step(self, state, action: np.ndarray):
        a = self.check_actions(action, state.q.shape[0])
        return self.bare_step(state, jnp.asarray(a, dtype=jnp.float32))

    def to_vector(self, state) -> np.ndarray:
        return np.concatenate([np.asarray(state.q), np.asarray(state.qd)], axis=1).astype(np.float64)

    def from_vector(self, vec: np.ndarray):
        return _from_vector(self.sys, jnp.asarray(self.check_vectors(vec), dtype=jnp.float32))
