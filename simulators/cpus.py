"""How many CPUs this process may use: for thread pools made explicit (a Ray worker's ``OMP_NUM_THREADS`` is
Ray's choice, not the code's) and for the CPUs a local Ray offers."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_ray_cpus() -> int:
    """CPUs a new local Ray offers: what Ray itself detects (a container's CPU quota included, where
    ``os.cpu_count()`` sees the host's cores), at least 2 (the driver's tasks and one runner at once)."""
    try:
        from ray._private.utils import get_num_cpus

        n = int(get_num_cpus())
    except Exception:  # noqa: BLE001 - Ray's private helper moved: the affinity mask is the next best
        n = usable_cpus()
    return max(2, n)
