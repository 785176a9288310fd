"""Verify (RLPF over gRPC) is right for every task the server can step: the task's own scale, the documented keys."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import rewards
import simulators
from rewards.corruptions import true_windows
from services.client import InvalidArgument, SimulatorClient
from services.config import ServerConfig
from services.server import ServerProcess
from simulators.physics.scale import data_scale

PROTO = Path(__file__).resolve().parent.parent / "services/proto/flywheel/simulator/v1/simulator.proto"
DOCUMENTED = {"per_transition", "per_window", "violates", "reward", "scale",
              *(f"{part}/{name}" for part in ("components", "raw") for name in rewards.COMPONENTS)}


@pytest.fixture(scope="module")
def client():
    with ServerProcess(ServerConfig(task="pendulum", engine="mujoco", max_batch=512)) as proc, \
            SimulatorClient(proc.address) as c:
        yield c


@pytest.mark.parametrize("task", simulators.TASKS)
def test_verify_grades_each_task_with_its_own_scale(client, task):
    engine = simulators.make_engine("mujoco", task)
    start, actions, nxt = true_windows(engine, 2, 5, seed=3, bang=True)
    real = client.verify(start, actions, nxt, task=task)
    assert set(real) == DOCUMENTED
    assert real["per_transition"].shape == nxt.shape[:2] and not real["violates"].any()
    expected = np.ones(2) if task == "pendulum" else data_scale(task)   # the pendulum server's (untrained) model
    np.testing.assert_allclose(real["scale"], expected, rtol=1e-6)
    teleport = nxt.copy()
    teleport[:, 2, 0] += 0.05                       # 5 tolerances of position jump with no velocity behind it
    fake = client.verify(start, actions, teleport, task=task)
    assert fake["violates"].all() and (fake["components/kinematic"][:, 2] > 1).all()
    local = rewards.physics_violation(engine, start, actions, teleport, scale=expected)
    np.testing.assert_allclose(fake["per_window"], local.per_window, rtol=1e-5, atol=1e-6)


def test_verify_names_what_is_wrong(client):
    engine = simulators.make_engine("mujoco", "cartpole")
    start, actions, nxt = true_windows(engine, 1, 5)
    with pytest.raises(InvalidArgument, match=r"next_states.*\(\d+, 5, 4\)"):
        client.verify(start, actions, nxt[..., :2], task="cartpole")
    with pytest.raises(InvalidArgument, match="valid tasks"):
        client.verify(start, actions, nxt, task="hopper")


def test_the_documented_keys_are_the_keys():
    proto = PROTO.read_text()
    response = proto[proto.index("// The physics-violation (RLPF) report"):proto.index("message LoadWorldModelRequest")]
    for text in (SimulatorClient.verify.__doc__, response):
        for key in ("per_transition", "per_window", "violates", "reward", "scale", "components/<name>", "raw/<name>"):
            assert re.search(rf"\b{re.escape(key)}", text), key
        assert "score" not in text and "component/" not in text
