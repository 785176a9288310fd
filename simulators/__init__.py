"""Simulators: physics engines, tasks, the world model, the corrected (learned) simulator and reality.

Depends on no other Flywheel package. JAX is imported only when a JAX backend is built, torch only
when the world model is used (the names below load their module on first access).
"""

import importlib

from simulators.physics import ENGINES, Constraints, EngineSpec, PhysicsEngine, make_engine
from simulators.tasks import TASKS, Task, make_task

_LAZY = {
    "WorldModel": "simulators.world_model",
    "WorldModelConfig": "simulators.world_model",
    "Reality": "simulators.reality",
    "Episodes": "simulators.reality",
    "CorrectedSimulator": "simulators.corrected",
    "StepResult": "simulators.corrected",
    "ImaginationWindow": "simulators.corrected",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'simulators' has no attribute {name!r}")


__all__ = ["ENGINES", "TASKS", "Constraints", "CorrectedSimulator", "EngineSpec", "Episodes", "ImaginationWindow",
           "PhysicsEngine", "Reality", "StepResult", "Task", "WorldModel", "WorldModelConfig", "make_engine",
           "make_task"]
