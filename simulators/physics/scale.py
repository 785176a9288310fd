"""A task's data scale: the per-dimension spread of its states under random control.

It is what a world model fitted on random-policy data would use as ``state_scale``, so it serves
as the documented default wherever a scale is needed and no world model of the task is at hand
(the RLPF residual of a Verify call, ``benchmarks/rlpf.py``). Computed once per task and
parameters with MuJoCo's C engine: ``envs`` episodes from the task's initial distribution under
uniformly random actions, seeded, so every process gets the same numbers.
"""

from __future__ import annotations

import threading

import numpy as np

from simulators.tasks import Task, make_task

FLOOR = 1e-3  # a dimension that never moves (a fixed target) gets this scale rather than 0
_LOCK = threading.Lock()


_CACHE: dict[tuple, np.ndarray] = {}


def data_scale(task: str | Task, params: dict | None = None, envs: int = 64, seed: int = 0) -> np.ndarray:
    """Standard deviation ``[S]`` of the task's states over ``envs`` random-action episodes (at least ``FLOOR``)."""
    task = make_task(task)
    key = (task.name, task.xml, task.n_substeps, task.episode_length, tuple(sorted((params or {}).items())), envs, seed)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _measure(task, params, envs, seed)
        return _CACHE[key].copy()


def _measure(task: Task, params: dict | None, envs: int, seed: int) -> np.ndarray:
    from simulators.physics.mujoco_engine import MujocoEngine

    engine = MujocoEngine(task, params)
    try:
        spec, rng = engine.spec, np.random.default_rng(seed)
        s = engine.reset(seed, envs)
        states = [s]
        for _ in range(task.episode_length):
            s = engine.step(s, rng.uniform(spec.action_low, spec.action_high, (envs, spec.action_size)))
            states.append(s)
    finally:
        engine.close()
    return np.maximum(np.concatenate(states).std(axis=0), FLOOR)
