"""``mjx`` backend: MuJoCo XLA, jitted and vmapped over the batch (the fast engine on a GPU).

Its state is a batched ``mjx.Data``. Each control step runs ``task.n_substeps`` of ``mjx.step``
inside one compiled function. The model is an argument of the compiled functions, not a
constant baked into them, so engines of one task with other parameters (a sim-to-real gap)
reuse the same compilation; JAX's persistent cache keeps it across processes.
"""

from __future__ import annotations

import functools

from simulators.jax_setup import configure_jax
from simulators.physics.jax_engine import JaxEngine
from simulators.tasks import Task

jax = configure_jax()
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


class MjxEngine(JaxEngine):
    name = "mjx"
    _jit_step, _jit_from_vector = staticmethod(_step), staticmethod(_from_vector)

    def __init__(self, task: Task, params: dict | None = None):
        super().__init__(task, params)
        self.jax_model = self.mx = mjx.put_model(self.model)
