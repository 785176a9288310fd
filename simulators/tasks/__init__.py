"""Task registry: name -> module:class, imported lazily. Adding a task is one module plus one line here."""

from __future__ import annotations

import importlib

from simulators.tasks.base import PARAM_NAMES, Task, tolerance, wrap_angle

_REGISTRY = {
    "pendulum": "simulators.tasks.pendulum:Pendulum",
    "cartpole": "simulators.tasks.cartpole:Cartpole",
    "reacher": "simulators.tasks.reacher:Reacher",
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


def register_task(name: str, target: str) -> None:
    """Register a task class given as ``"package.module:ClassName"``."""
    _REGISTRY[name] = target
    global TASKS
    TASKS = tuple(_REGISTRY)


def make_task(task: str | Task) -> Task:
    """Build a task by name (or pass a Task through); an unknown name lists the valid ones."""
    if isinstance(task, Task):
        return task
    if task not in _REGISTRY:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(sorted(_REGISTRY))}")
    module, cls = _REGISTRY[task].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["PARAM_NAMES", "TASKS", "Task", "make_task", "register_task", "tolerance", "wrap_angle"]
