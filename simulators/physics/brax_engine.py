"""``brax`` backend: Brax's generalized pipeline on a system loaded from the same MJCF.

Its state is a batched ``brax.generalized.base.State``; ``q``/``qd`` are MuJoCo's qpos/qvel.
Brax integrates and resolves contacts its own way, so it agrees with MuJoCo on smooth
dynamics (e.g. a pendulum's period) rather than to the last digit. As in the ``mjx``
backend, the system is an argument of the compiled functions.
"""

from __future__ import annotations

import functools
import warnings

from simulators.jax_setup import configure_jax
from simulators.physics.jax_engine import JaxEngine
from simulators.tasks import Task

jax = configure_jax()
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


class BraxEngine(JaxEngine):
    name = "brax"
    pos_field, vel_field = "q", "qd"
    _jit_step, _jit_from_vector = staticmethod(_step), staticmethod(_from_vector)

    def __init__(self, task: Task, params: dict | None = None):
        super().__init__(task, params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Brax's notice that MJX is its maintained successor
            self.jax_model = self.sys = mjcf.load_model(self.model)
