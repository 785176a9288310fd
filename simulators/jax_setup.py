"""JAX set-up in one place: the persistent compilation cache, so a second process does not recompile."""

from __future__ import annotations

import os
from pathlib import Path

_DONE = False


def cache_dir() -> Path:
    """``$FLYWHEEL_JAX_CACHE`` or ``~/.cache/flywheel/jax``."""
    env = os.environ.get("FLYWHEEL_JAX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flywheel" / "jax"


def configure_jax():
    """Import JAX with the persistent compilation cache switched on; returns the ``jax`` module."""
    global _DONE
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if not _DONE:
        path = cache_dir()
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _single_threaded_cpu_client(jax)
        _DONE = True
    return jax


def _single_threaded_cpu_client(jax) -> None:
    """Create JAX's CPU client with an intra-op thread pool of one thread.

    XLA's CPU runtime runs LAPACK custom calls (the Cholesky factorisations in every MJX step) on its
    intra-op pool, and their batch loop blocks a pool thread until work it queued on that same pool
    is done: when independent factorisations start on every pool thread at once, all of them wait
    and the step never returns (seen on 2 cores, with the float64 contact task). A pool of one thread
    cannot wedge. The pool is sized from the CPUs the creating thread may run on, so the client is
    made while this thread is pinned to one CPU; then every thread of the process gets back the CPUs
    it had. Batches are still parallel across processes (Ray workers, servers), and on a GPU the
    device does the work.
    """
    if not hasattr(os, "sched_getaffinity"):
        return
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        jax.devices("cpu")
    except RuntimeError:        # no CPU platform in JAX_PLATFORMS: nothing to size
        pass
    finally:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:     # a thread that ended meanwhile
                pass
