"""``flywheel serve``: a standalone simulator server started by the CLI, reached by a real client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np

from services.client import SimulatorClient


def test_flywheel_serve_prints_its_address_serves_and_stops_on_sigterm():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "serve", "--task", "pendulum", "--engine", "mujoco",
                             "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while not line.startswith("serving "):
            line = proc.stdout.readline()
            assert line, "the server exited before printing its address"
        address = line.split()[-1]
        assert address.startswith("127.0.0.1:")
        with SimulatorClient(address) as client:
            assert client.health() == "SERVING"
            session = client.create_session("pendulum", 2, fidelity=1.0)
            session.reset(seed=0)
            reply = session.step(np.zeros((2, 1), np.float32))
            assert reply.observations.shape == (2, 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
