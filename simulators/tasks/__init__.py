"""Task registry: name -> ``"module:Class"``, imported lazily. Adding a task is one module plus one line here.

``TASKS`` is a live view of the registry, not a copy: a module that did ``from simulators.tasks
import TASKS`` sees a task registered later (``name in TASKS``, iteration, ``len``, ``", ".join``).

Tasks registered at run time with ``register_task`` also reach processes started afterwards
(simulator servers, Ray workers): ``register_task`` records them in the ``FLYWHEEL_TASKS``
environment variable (``name=module:Class`` entries separated by commas), which this module reads
on import. The task's module must be importable there too (on ``sys.path``/``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator

from simulators.tasks.base import PARAM_NAMES, Task, tolerance, wrap_angle

ENV_VAR = "FLYWHEEL_TASKS"
_BUILTIN = {
    "pendulum": "simulators.tasks.pendulum:Pendulum",
    "cartpole": "simulators.tasks.cartpole:Cartpole",
    "reacher": "simulators.tasks.reacher:Reacher",
    "lift": "simulators.tasks.lift:Lift",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TaskRegistry:
    """The registered task names in registration order; supports ``in``, iteration, ``len`` and indexing."""

    def __init__(self, entries: dict[str, str]):
        self._entries: dict[str, str] = {}
        for name, target in entries.items():
            self.add(name, target)

    def add(self, name: str, target: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"task name {name!r} is not allowed; use lower-case letters, digits and '_', "
                             "starting with a letter")
        if not isinstance(target, str) or not _TARGET.match(target):
            raise ValueError(f"task target {target!r} for {name!r} is not of the form 'package.module:ClassName'")
        self._entries[name] = target

    def remove(self, name: str) -> None:
        if name in _BUILTIN:
            raise ValueError(f"task {name!r} is built in and cannot be removed")
        self._entries.pop(name, None)

    def target(self, name: str) -> str:
        if name not in self._entries:
            shown = name if len(str(name)) <= 64 else f"{str(name)[:64]}... ({len(str(name))} characters)"
            raise ValueError(f"unknown task {shown!r}; valid tasks: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> str:
        return list(self._entries)[index]

    def __eq__(self, other: object) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list, TaskRegistry)) else NotImplemented

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"TaskRegistry({tuple(self)!r})"


def _from_env(value: str | None) -> dict[str, str]:
    """``FLYWHEEL_TASKS`` parsed: ``"a=pkg.mod:A,b=pkg.other:B"`` -> ``{"a": "pkg.mod:A", ...}``."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        name, sep, target = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_VAR} entry {item!r} is not of the form name=package.module:ClassName")
        out[name.strip()] = target.strip()
    return out


TASKS = TaskRegistry({**_BUILTIN, **_from_env(os.environ.get(ENV_VAR))})


def register_task(name: str, target: str, export: bool = True) -> None:
    """Register a task class given as ``"package.module:ClassName"``; every holder of ``TASKS`` sees it.

    With ``export`` (the default) it is also added to ``FLYWHEEL_TASKS`` so that processes started
    from this one afterwards know it.
    """
    TASKS.add(name, target)
    if export:
        entries = _from_env(os.environ.get(ENV_VAR))
        entries[name] = target
        os.environ[ENV_VAR] = ",".join(f"{k}={v}" for k, v in entries.items())


def unregister_task(name: str) -> None:
    """Remove a task registered at run time (here and from ``FLYWHEEL_TASKS``)."""
    TASKS.remove(name)
    entries = _from_env(os.environ.get(ENV_VAR))
    entries.pop(name, None)
    if entries:
        os.environ[ENV_VAR] = ",".join(f"{k}={v}" for k, v in entries.items())
    else:
        os.environ.pop(ENV_VAR, None)


def make_task(task: str | Task) -> Task:
    """Build a task by name (or pass a Task through); an unknown name lists the valid ones."""
    if isinstance(task, Task):
        return task
    module, cls = TASKS.target(task).split(":")
    try:
        obj = getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"task {task!r} is registered as {TASKS.target(task)!r}, which cannot be loaded: {exc}; "
                         "the module must be importable (on sys.path or PYTHONPATH)") from exc
    if not isinstance(obj, Task):
        raise ValueError(f"task {task!r} ({TASKS.target(task)}) is a {type(obj).__name__}, not a simulators.tasks.Task")
    check_task(obj, task)
    return obj


def check_task(task: Task, registered: str | None = None) -> Task:
    """Check the fields every task must set (README, "Adding a task"); ``ValueError`` names the first one wrong."""
    where = f"task class {type(task).__name__}" + (f" (registered as {registered!r})" if registered else "")
    if registered is not None and task.name != registered:
        raise ValueError(f"{where} has name {task.name!r}; set its name field to {registered!r}")
    if "<mujoco" not in task.xml:
        raise ValueError(f"{where}: xml must be an MJCF document (<mujoco ...>), got {task.xml[:40]!r}")
    for field, low in (("n_substeps", 1), ("episode_length", 1), ("success_steps", 1), ("observation_size", 1)):
        value = getattr(task, field)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: {field} must be an integer >= {low}, got {value!r}")
    if task.success_steps > task.episode_length:
        raise ValueError(f"{where}: success_steps ({task.success_steps}) must be <= episode_length ({task.episode_length})")
    return task


__all__ = ["ENV_VAR", "PARAM_NAMES", "TASKS", "Task", "TaskRegistry", "check_task", "make_task", "register_task", "tolerance",
           "unregister_task", "wrap_angle"]
