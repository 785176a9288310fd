"""Shared test set-up: JAX on the CPU with the persistent compilation cache, quiet logs; a small served pendulum."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def pendulum_server(tmp_path_factory):
    """A pendulum server process (MuJoCo engine, a small untrained world model): ``{"address", "config", "spec"}``."""
    from services import ServerConfig, ServerProcess
    from simulators import make_engine
    from simulators.world_model import WorldModel, WorldModelConfig

    root = tmp_path_factory.mktemp("pendulum-server")
    spec = make_engine("mujoco", "pendulum").spec
    WorldModel("pendulum", spec.state_size, spec.action_size,
               WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1)).save(root / "wm.pt")
    config = ServerConfig(task="pendulum", engine="mujoco", world_model_path=str(root / "wm.pt"))
    with ServerProcess(config) as proc:
        yield {"address": proc.address, "config": config, "spec": spec}
