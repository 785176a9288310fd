"""Simulator servers as Ray actors (how a lap serves): real Ray, real gRPC, recorders flushed on stop."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray

from services.client import SimulatorClient
from services.config import ServerConfig
from simulators import Reality
from simulators.cpus import usable_cpus
from simulators.dataset import TransitionDataset
from simulators.world_model import WorldModel, WorldModelConfig


def test_server_actors_serve_sessions_and_flush_recordings_on_stop(tmp_path):
    from policies.rllib_adapter import init_ray
    from services.server_actor import start_server_actors, stop_server_actors

    wm = WorldModel("pendulum", 2, 1, WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1))
    wm.save(tmp_path / "wm.pt")
    configs = [ServerConfig(task="pendulum", engine="mujoco", world_model_path=str(tmp_path / "wm.pt"),
                            trajectory_dir=str(tmp_path / f"shards{i}"), episode_offset=i * 10**6, torch_threads=i,
                            num_cpus=i)
               for i in range(2)]
    init_ray(2)
    actors, addresses = start_server_actors(configs)
    try:
        assert len(set(addresses)) == 2 and all(a.startswith("127.0.0.1:") for a in addresses)
        assert len({ray.get(a.pid.remote()) for a in actors}) == 2
        reserved = 0.0
        for _ in range(100):                                  # Ray's resource view catches up within a moment
            reserved = ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0.0)
            if reserved == 1.0:
                break
            time.sleep(0.1)
        assert reserved == 1.0                                # service.num_cpus=1 holds one of Ray's CPUs; 0 holds none
        for address in addresses:
            with SimulatorClient(address) as client:
                assert client.health() == "SERVING"
                session = client.create_session("pendulum", 4, fidelity=1.0, seed=3)
                session.reset()
                for _ in range(7):
                    session.step(np.zeros((4, 1), np.float32))
    finally:
        reports = stop_server_actors(actors)
    # Ray gives an actor holding no CPU OMP_NUM_THREADS=1; service.torch_threads=0 still means every CPU
    assert [r["torch_threads"] for r in reports] == [usable_cpus(), 1]
    from flywheel.orchestrator import ray_logs_dir

    logs = ray_logs_dir()                                     # a failed lap's error.txt points here
    assert logs and any(p.name.startswith("worker-") for p in Path(logs).iterdir())
    for i in range(2):
        shards = sorted((tmp_path / f"shards{i}").glob("*.npz"))
        data = TransitionDataset.concat([TransitionDataset.load(p) for p in shards])
        assert len(data) == 4 * 7
        assert data.episode_ids.min() >= i * 10**6
        np.testing.assert_array_equal(data.actions, 0.0)


def test_the_world_model_fit_task_uses_every_cpu_unless_told_otherwise():
    """A 1-CPU Ray task gets OMP_NUM_THREADS=1 from Ray: ``world_model.num_threads=0`` is made explicit."""
    from flywheel.parts import _fit_remote
    from policies.rllib_adapter import init_ray

    init_ray(2)
    data = Reality("pendulum", engine="mujoco").collect(None, 400, n_envs=4, seed=0)
    fit = ray.remote(_fit_remote).options(num_cpus=1)
    for threads, expected in ((0, usable_cpus()), (1, 1)):
        cfg = WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1, max_epochs=1, num_threads=threads)
        _, metrics = ray.get(fit.remote("pendulum", data, cfg, None))
        assert metrics["threads"] == expected


def test_the_lap_learns_at_once_when_every_server_is_dead_for_good(tmp_path):
    """``servers_watch``: restarting or alive is not lost; every server dead with its restarts spent is, named."""
    from flywheel.parts import servers_watch
    from policies.rllib_adapter import init_ray
    from services.server_actor import start_server_actors, stop_server_actors

    init_ray(2)
    configs = [ServerConfig(task="pendulum", engine="mujoco", trajectory_dir=str(tmp_path / f"s{i}"), max_restarts=0)
               for i in range(2)]
    actors, addresses = start_server_actors(configs)
    try:
        lost = servers_watch(actors, addresses, max_restarts=0, every_s=0.0)
        assert lost() is None
        ray.kill(actors[0], no_restart=True)
        time.sleep(1.0)
        assert lost() is None                                  # runners fall back to the other server
        ray.kill(actors[1], no_restart=True)
        reason = None
        for _ in range(50):
            reason = lost()
            if reason:
                break
            time.sleep(0.2)
        assert reason and "every simulator server is gone for good" in reason and addresses[1] in reason
    finally:
        stop_server_actors(actors)
