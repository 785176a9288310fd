"""Physics engine registry: backends by name, imported lazily (JAX loads only when asked for)."""

from __future__ import annotations

import importlib

from simulators.physics.agreement import Agreement, UnsupportedTask, contact_pairs
from simulators.physics.base import Constraints, EngineSpec, PhysicsEngine, build_model, constraint_violations
from simulators.tasks import Task, make_task

_BACKENDS = {
    "mjx": "simulators.physics.mjx_engine:MjxEngine",
    "brax": "simulators.physics.brax_engine:BraxEngine",
    "mujoco": "simulators.physics.mujoco_engine:MujocoEngine",
}
ENGINES: tuple[str, ...] = (*_BACKENDS, "auto")


def auto_backend() -> str:
    """The fastest backend for this device: ``mjx`` where JAX has a GPU, else MuJoCo's C engine.

    ``benchmarks/physics.py`` measures the table behind this choice.
    """
    try:
        import jax  # only asked when JAX is already installed; cheap compared with a compile

        if any(d.platform == "gpu" for d in jax.devices()):
            return "mjx"
    except Exception:  # noqa: BLE001 - no JAX or no backend means CPU
        pass
    return "mujoco"


def make_engine(name: str, task: str | Task, params: dict | None = None) -> PhysicsEngine:
    """Build a backend by name (``mjx``, ``brax``, ``mujoco`` or ``auto``) for a task with optional scaled params.

    An engine that cannot reproduce ``mj_step`` on the task raises ``UnsupportedTask`` (a ``ValueError``)
    naming why and the engines that can; ``engine.agreement`` is what the others promise.
    """
    if name == "auto":
        name = auto_backend()
    if name not in _BACKENDS:
        raise ValueError(f"unknown physics engine {name!r}; valid engines: {', '.join(ENGINES)}")
    task = make_task(task)
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(task, params)


__all__ = ["ENGINES", "Agreement", "Constraints", "EngineSpec", "PhysicsEngine", "auto_backend", "build_model",
           "constraint_violations", "contact_pairs", "make_engine", "UnsupportedTask"]
