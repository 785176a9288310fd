"""What the JAX backends (``mjx``, ``brax``) share: a batched pytree state, jitted step and init.

A subclass names its state's position and velocity fields and supplies two jitted functions
that take the physics model as an argument (so one compilation serves every parameter set):
``_jit_step(model, state, ctrl, substeps)`` and ``_jit_from_vector(model, vec)``.

``dtype`` is the precision the engine computes in (``float32`` unless a subclass needs more for a
task); a ``float64`` engine runs every JAX call inside ``jax.enable_x64(True)``, which is local to
the calling thread, so float32 engines in the same process are unaffected.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from simulators.jax_setup import configure_jax
from simulators.physics.agreement import Agreement
from simulators.physics.base import EngineBase

jax = configure_jax()
import jax.numpy as jnp  # noqa: E402


class JaxEngine(EngineBase):
    pos_field, vel_field = "qpos", "qvel"
    _jit_step: Any
    _jit_from_vector: Any
    jax_model: Any
    dtype: str = "float32"
    agreement = Agreement()

    def precision(self):
        """The context every JAX call of this engine runs in (``float64`` switches on 64-bit types)."""
        return jax.enable_x64(True) if self.dtype == "float64" else contextlib.nullcontext()

    def bare_step(self, state, ctrl):
        """The engine call alone: the jitted ``vmap`` of the backend's step over ``n_substeps``."""
        with self.precision():
            return type(self)._jit_step(self.jax_model, state, jnp.asarray(ctrl, dtype=self.dtype), self.task.n_substeps)

    def reset(self, key: Any, n: int):
        return self.from_vector(self.initial_vectors(key, n))

    def step(self, state, action: np.ndarray):
        a = self.check_actions(action, getattr(state, self.pos_field).shape[0])
        return self.bare_step(state, a)

    def to_vector(self, state) -> np.ndarray:
        q, v = getattr(state, self.pos_field), getattr(state, self.vel_field)
        return np.concatenate([np.asarray(q), np.asarray(v)], axis=1).astype(np.float64)

    def from_vector(self, vec: np.ndarray):
        with self.precision():
            return type(self)._jit_from_vector(self.jax_model, jnp.asarray(self.check_vectors(vec), dtype=self.dtype))
