"""Simulators: physics engines, tasks, the world model, the corrected (learned) simulator and reality.

Depends on no other Flywheel package. JAX is imported only when a JAX backend is built.
"""

from simulators.physics import ENGINES, Constraints, EngineSpec, PhysicsEngine, make_engine
from simulators.tasks import TASKS, Task, make_task

__all__ = ["ENGINES", "TASKS", "Constraints", "EngineSpec", "PhysicsEngine", "Task", "make_engine", "make_task"]
