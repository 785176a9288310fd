"""``mjx`` backend: MuJoCo XLA, jitted and vmapped over the batch (the fast engine on a GPU).

Its state is a batched ``mjx.Data``. Each control step runs ``task.n_substeps`` of ``mjx.step``
inside one compiled function. The model is an argument of the compiled functions, not a
constant baked into them, so engines of one task with other parameters (a sim-to-real gap)
reuse the same compilation; JAX's persistent cache keeps it across processes.

Precision: float32 on tasks without contacts, where it stays within ~3e-6 of ``mj_step`` after
ten control steps (~2e-5 after one step into a joint limit: ``agreement.at_limits``). On a task
with contacts (``agreement.contact_pairs``) the contact stiffness amplifies float32 rounding
(about 1e-2 after ten steps on ``lift``), so there it computes in float64 and matches ``mj_step``
to ~1e-10 where MJX's collision functions are C MuJoCo's: sphere-sphere and sphere-plane pairs are;
capsule pairs (a 1e-6 m^2 regulariser in MJX's segment distance) and boxes or meshes (iterative
convex collision) are not exactly, which the contract suite shows for a task that uses them.
"""

from __future__ import annotations

import functools

from simulators.jax_setup import configure_jax
from simulators.physics.agreement import Agreement, contact_pairs
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
    agreement = Agreement(note="float64 on a task with contacts")

    def __init__(self, task: Task, params: dict | None = None):
        super().__init__(task, params)
        self.contacts = contact_pairs(self.model)
        self.dtype = "float64" if self.contacts else "float32"
        if not self.contacts:  # a limit's stiffness amplifies float32 rounding: ~2e-5 measured on cartpole
            self.agreement = Agreement(at_limits=1e-4, note="float32 without contacts")
        with self.precision():
            self.jax_model = self.mx = mjx.put_model(self.model)
