"""Physics engines that follow sessions: borrowed on open, given back on close, closed beyond a few idle ones.

    pool = EnginePool("mujoco", {"mass_scale": 1.2}, idle=2)
    engine = pool.acquire(task)       # an idle engine of this task, or a new one
    pool.release(engine)              # kept for the next session, or closed (its threads end)
    pool.close()                      # server shutdown: every idle engine closed

A session has its engine to itself while it is open (engines are not shared between concurrent
calls), so a server holds at most ``open sessions + idle`` engines per task, however many sessions
come and go. Reusing an engine also keeps a JAX backend's compiled steps.
"""

from __future__ import annotations

import threading
from collections import defaultdict


def close_engine(engine) -> None:
    """Free an engine's threads: its own ``close`` (MuJoCo's rollout threads) and its constraint thread pool."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()
    pool = getattr(engine, "_pool", None)
    if pool is not None:
        pool.shutdown(wait=False)
        engine._pool = None


class EnginePool:
    """Engines of one backend and physics, per task, lent to one session at a time."""

    def __init__(self, engine: str, params: dict | None = None, idle: int = 2):
        self.engine, self.params, self.idle = engine, dict(params or {}) or None, int(idle)
        self._free: dict[str, list] = defaultdict(list)
        self._lock = threading.Lock()
        self._closed = False
        self.built = 0

    def acquire(self, task):
        """An engine of ``task`` (a ``Task``) for one session's sole use."""
        from simulators import make_engine

        with self._lock:
            if self._free[task.name]:
                return self._free[task.name].pop()
        engine = make_engine(self.engine, task, self.params)
        with self._lock:
            self.built += 1
        return engine

    def release(self, engine) -> None:
        """Take an engine back: kept while fewer than ``idle`` of its task wait, else closed."""
        with self._lock:
            free = self._free[engine.task.name]
            if not self._closed and len(free) < self.idle:
                free.append(engine)
                return
        close_engine(engine)

    def idle_engines(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._free.values())

    def close(self) -> None:
        """Close every idle engine; engines released later are closed too."""
        with self._lock:
            self._closed = True
            engines = [e for free in self._free.values() for e in free]
            self._free.clear()
        for engine in engines:
            close_engine(engine)
