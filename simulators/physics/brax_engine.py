"""``brax`` backend: Brax's generalized pipeline on a system loaded from the same MJCF.

Its state is a batched ``brax.generalized.base.State``; ``q``/``qd`` are MuJoCo's qpos/qvel. As in
the ``mjx`` backend, the system is an argument of the compiled functions.

Agreement with ``mj_step``: the mass matrix is inverted exactly (``matrix_inv_iterations=0``), which
also makes Brax's Euler step implicit in joint damping as MuJoCo's is (Brax's default, an
approximate inverse, integrates damping explicitly and is off by up to 1e0 after one step on
``reacher``). Free motion then matches to ~1e-6 after ten control steps. Brax resolves constraints
with its own projected-gradient solver: a joint held at its limit differs by up to ~1e-3 per control
step (``agreement.at_limits``), and contacts differ at O(1), so a task with contacts is refused
(``UnsupportedTask``) along with MJCF features Brax ignores (dof friction loss, gravity compensation).
"""

from __future__ import annotations

import functools
import warnings

from simulators.jax_setup import configure_jax
from simulators.physics.agreement import Agreement, UnsupportedTask, contact_pairs, describe_pairs
from simulators.physics.jax_engine import JaxEngine
from simulators.tasks import Task

jax = configure_jax()
from brax.generalized import pipeline
from brax.io import mjcf

CAPABLE = "mjx, mujoco"   # the engines that reproduce mj_step where Brax cannot


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
    agreement = Agreement(at_limits=1e-3, note="Brax's own constraint solver at joint limits; contacts refused")

    def __init__(self, task: Task, params: dict | None = None):
        super().__init__(task, params)
        self._check_supported()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Brax's notice that MJX is its maintained successor
            try:
                sys = mjcf.load_model(self.model)
            except (NotImplementedError, RuntimeError) as exc:
                raise UnsupportedTask(f"brax cannot load task {task.name!r}: {exc}; engines that can: {CAPABLE}") from exc
        self.jax_model = self.sys = sys.replace(matrix_inv_iterations=0)

    def _check_supported(self) -> None:
        m, name = self.model, self.task.name
        pairs = contact_pairs(m)
        if pairs:
            raise UnsupportedTask(
                f"brax cannot reproduce mj_step on task {name!r}: it has contacts ({describe_pairs(pairs)}), which "
                f"Brax resolves with its own solver (O(1) state error within a few steps); engines that can: {CAPABLE}")
        if (m.dof_frictionloss > 0).any():
            raise UnsupportedTask(f"brax ignores dof friction loss, which task {name!r} has; engines that can: {CAPABLE}")
        if (getattr(m, "body_gravcomp", 0) != 0).any():
            raise UnsupportedTask(f"brax ignores gravity compensation, which task {name!r} has; engines that can: {CAPABLE}")
