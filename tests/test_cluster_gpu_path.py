"""The GPU path's decisions, checked on this CPU-only machine: which engine ``auto`` picks, where a server runs
its world model, when the corrected simulator blends on the device, and the DLPack hand-over itself (on CPU
tensors, the same code path a GPU takes). The GPU install's pins are checked against the CPU ones."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np

from services.server_actor import server_device
from simulators.corrected import CorrectedSimulator, device_path, engine_platform, engine_tensor
from simulators.physics import auto_backend, make_engine
from simulators.world_model import WorldModel, WorldModelConfig

ROOT = Path(__file__).resolve().parent.parent


def test_device_decisions():
    assert device_path("gpu", "cuda") and device_path("gpu", "cuda:1")
    assert not device_path("gpu", "cpu") and not device_path("cpu", "cuda:0")
    assert server_device("cpu", gpu_ids=[0], cuda=True) == "cuda"            # Ray gave the actor a GPU
    assert server_device("cuda", gpu_ids=[], cuda=True) == "cuda"            # the checkpoint asks for CUDA
    assert server_device("cuda", gpu_ids=[0], cuda=False) == "cpu"           # no CUDA torch: never fail to serve
    assert server_device("cpu", gpu_ids=[], cuda=True) == "cpu"
    assert auto_backend() == "mujoco"                                        # JAX sees no GPU here


def test_dlpack_blend_matches_the_host_blend():
    wm = WorldModel("pendulum", 2, 1, WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1))
    engine = make_engine("mjx", "pendulum")
    assert engine_platform(engine) == "cpu" and engine_platform(make_engine("mujoco", "pendulum")) == "cpu"
    host, device = (CorrectedSimulator("pendulum", wm, engine, fidelity=0.5, num_envs=4, seed=3) for _ in range(2))
    assert not host.device_blend and not device.device_blend                 # CPU: the host path by default
    device.device_blend = True                                               # the GPU's code path, on CPU tensors
    host.reset(), device.reset()
    rng = np.random.default_rng(0)
    for _ in range(7):
        a = rng.uniform(-1, 1, (4, 1))
        r_host, r_device = host.step(a), device.step(a)
        np.testing.assert_allclose(r_device.next_states, r_host.next_states, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(device._imagined_state, host._imagined_state, rtol=1e-12, atol=1e-12)
    s = host.states
    t = engine_tensor(engine, s, np.zeros((4, 1)))
    assert t.shape == (4, 2) and t.device.type == "cpu"
    np.testing.assert_allclose(t.double().numpy(), engine.step_vectors(s, np.zeros((4, 1))), rtol=1e-6)


def test_gpu_extra_pins_the_same_jax_as_the_cpu_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {re.split(r"[=\[]", d)[0]: d.split("==")[1] for d in project["dependencies"] if "==" in d}
    (gpu,) = project["optional-dependencies"]["gpu"]
    assert re.fullmatch(r"jax\[cuda13\]==(.+)", gpu).group(1) == pins["jax"] == pins["jaxlib"]
    makefile = (ROOT / "Makefile").read_text()
    torch_gpu = re.search(r"'torch==([\d.]+)\+cu130'", makefile).group(1)
    assert torch_gpu == pins["torch"] and "'.[dev,gpu]'" in makefile
