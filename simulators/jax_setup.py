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
        _DONE = True
    return jax
