"""JAX's CPU client is made so that it cannot wedge: one intra-op thread, and the process keeps its CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os
from simulators.jax_setup import configure_jax
jax = configure_jax()
import jax.numpy as jnp
x = jnp.eye(4)[None].repeat(8, 0) * 2.0
jax.jit(jax.vmap(jnp.linalg.cholesky))(x).block_until_ready()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
cpus = {t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
print(json.dumps({"eigen": names.count("tf_XLAEigen"), "cpus": cpus, "all": sorted(os.sched_getaffinity(0))}))
"""


def test_cpu_client_has_one_intra_op_thread_and_every_thread_keeps_its_cpus():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["eigen"] == 1, probe
    assert probe["all"] == sorted(os.sched_getaffinity(0))
    assert all(c == probe["all"] for c in probe["cpus"].values()), probe["cpus"]
