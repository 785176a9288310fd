"""Shared test set-up: JAX on the CPU with the persistent compilation cache, quiet logs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
