"""Laps on a three-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head without CPUs for
tasks, and two worker nodes with one CPU and one stand-in GPU each (Ray schedules by the resource; no CUDA
is touched, JAX stays on the CPU).

Two smoke laps run through ``Orchestrator`` with the real parts; where things ran is read back from Ray's
own tables (the GCS actor table and task events), not from what the flywheel says about itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from netns_cluster import task_nodes
from ray._private import state as ray_state
from ray.cluster_utils import Cluster

from flywheel import cluster
from flywheel.config import load_config
from flywheel.layers import ConfigError
from flywheel.orchestrator import Orchestrator
from flywheel.tracking import Tracker
from services.client import SimulatorClient, Unauthenticated
from services.config import ServerConfig
from services.server_actor import Placement, start_server_actors, stop_server_actors

REQUIRED = ["capability/success_rate", "capability/return", "world_model/one_step_error",
            "world_model/open_loop_error", "imagination/accuracy", "physics/violation_rate", "reward/task",
            "reward/imagination", "reward/physics", "data/selected_trajectories", "data/total_transitions",
            "data/stored_transitions", "self_play/env_steps", "lap/seconds", "time/self_play", "time/retrain"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()                      # a local Ray of an earlier test: this module drives the cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, c.head_node.node_id, {w.node_id for w in workers}
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text("cluster-test-token\n")
    path.chmod(0o600)
    return path


def _actors(class_name: str) -> list[dict]:
    return [a for a in ray_state.actors().values() if a["ActorClassName"] == class_name]


def _task_nodes(name: str, want: int, wait_s: float = 60.0) -> dict[str, str]:
    """task id -> node id of every task called ``name`` in Ray's task events (they arrive asynchronously)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = {t: node for t, (n, node) in task_nodes().items() if n == name}
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def test_two_smoke_laps_on_three_nodes(ray_cluster, token_file, tmp_path):
    c, head, gpu_nodes = ray_cluster
    cfg = load_config(["preset=smoke", "laps=2", "engine.name=mujoco", "reality.engine=mujoco",
                       f"ray.address={c.address}", "service.placement=per_node", "service.num_gpus=1",
                       f"service.token_file={token_file}", "world_model.num_gpus=1", "ppo.num_env_runners=2",
                       f"runs_root={tmp_path}"])
    lines: list[str] = []
    orch = Orchestrator.create(cfg, tmp_path / "run", say=lines.append)
    orch.run()
    run_dir = orch.run_dir
    assert ray.get_runtime_context().get_node_id() == head          # the driver is on the head node

    # all metrics in MLflow, one value per lap
    tracker = Tracker.attach(run_dir)
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    for key in REQUIRED:
        assert sorted(s for s, _ in tracker.metric_history(key)) == [0, 1], key

    # servers: one per stand-in-GPU node, bound beyond loopback, their recordings copied to the driver
    servers = _actors("SimulatorServerActor")
    assert len(servers) == 4 and {a["Address"]["NodeID"] for a in servers} == gpu_nodes
    by_pid = {a["Pid"]: a["Address"]["NodeID"] for a in servers}
    runners_by_pid = {a["Pid"]: a["Address"]["NodeID"] for a in _actors("FlywheelEnvRunner")}
    for lap in (0, 1):
        record = json.loads((run_dir / "laps" / f"lap_{lap:03d}" / "placement.json").read_text())
        assert len(record["servers"]) == 2 and all(not s["address"].startswith("127.") for s in record["servers"])
        server_node = {s["address"]: by_pid[s["pid"]] for s in record["servers"]}     # Ray's word, by pid
        assert set(server_node.values()) == gpu_nodes
        assert len(record["runners"]) == 2
        for r in record["runners"]:
            assert server_node[r["address"]] == runners_by_pid[r["pid"]], r          # its own node's server
        shards = sorted((run_dir / "store" / f"lap_{lap:03d}" / "raw").glob("*.npz"))
        assert len({p.name.rsplit("-", 1)[0] for p in shards}) >= 2                   # sessions of both servers
    copied = [x for x in lines if "copied into the store" in x]
    assert len(copied) == 2 and all("from 2 of 2 server(s) on other nodes" in x for x in copied)

    # every world-model fit (seed + two retrains) ran as a Ray task on a node with the stand-in GPU
    fits = _task_nodes("fit_world_model", want=3)
    assert len(fits) >= 3 and set(fits.values()) <= gpu_nodes


def test_server_beyond_loopback_requires_the_token(ray_cluster, token_file):
    c, head, gpu_nodes = ray_cluster
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    node = sorted(gpu_nodes)[0]
    config = ServerConfig(host="0.0.0.0", task="pendulum", engine="mujoco", num_gpus=1, max_restarts=0)
    with pytest.raises(Exception, match="needs a token"):
        start_server_actors([config], [Placement(node_id=node)], timeout_s=120)
    import dataclasses

    actors, addresses = start_server_actors([dataclasses.replace(config, token_file=str(token_file))],
                                            [Placement(node_id=node)], timeout_s=120)
    try:
        assert ray.get(actors[0].node_id.remote()) == node and not addresses[0].startswith("127.")
        with SimulatorClient(addresses[0], timeout=30, token="wrong") as client:
            with pytest.raises(Unauthenticated):
                client.create_session("pendulum", 2)
        with SimulatorClient(addresses[0], timeout=30, token_file=str(token_file)) as client:
            session = client.create_session("pendulum", 2, fidelity=1.0)
            assert session.reset().shape[0] == 2
            session.step(np.zeros((2, 1), np.float32))
    finally:
        stop_server_actors(actors)


def test_preflight_names_nodes_without_the_token(ray_cluster, monkeypatch, tmp_path):
    c, head, gpu_nodes = ray_cluster
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    base = ["preset=smoke", f"ray.address={c.address}", f"runs_root={tmp_path}"]
    monkeypatch.delenv("FLYWHEEL_TOKEN", raising=False)
    monkeypatch.delenv("FLYWHEEL_TOKEN_FILE", raising=False)
    with pytest.raises(ConfigError, match="service.token_file"):
        cluster.preflight(load_config(base))
    monkeypatch.setenv("FLYWHEEL_TOKEN", "only-the-driver-has-it")   # the nodes were started without it
    with pytest.raises(cluster.ClusterError) as err:
        cluster.preflight(load_config(base))
    message = str(err.value)
    assert all(n[:8] in message for n in {head, *gpu_nodes}) and "no token" in message
    facts = cluster.preflight(load_config([*base, f"service.token_file={_token(tmp_path)}"]))
    assert {f["node_id"] for f in facts} == {head, *gpu_nodes} and len({f["code"] for f in facts}) == 1


def _token(tmp_path: Path) -> Path:
    path = tmp_path / "token2"
    path.write_text("another-token")
    os.chmod(path, 0o600)
    return path
