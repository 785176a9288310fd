"""Cluster placement without a cluster: the decisions (which node, which server, which host, which token),
the per-node checks' verdicts, the cluster configs, and a staged server's recordings travelling back
through Ray on this machine's own Ray."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from flywheel import cluster
from flywheel.cluster import ClusterError, Node, check_nodes, plan_servers
from flywheel.config import load_config
from flywheel.layers import ConfigError
from policies.config import EnvConfig, server_order
from services.config import ServerConfig
from services.recorder import RecordingError

ROOT = Path(__file__).resolve().parent.parent
HEAD = Node("head", "10.0.0.1", {"CPU": 8.0})
GPU_A = Node("gpu-a", "10.0.0.2", {"CPU": 8.0, "GPU": 1.0})
GPU_B = Node("gpu-b", "10.0.0.3", {"CPU": 8.0, "GPU": 2.0})
CPU_C = Node("cpu-c", "10.0.0.4", {"CPU": 32.0})
NODES = [HEAD, GPU_A, GPU_B, CPU_C]


def test_per_node_placement_puts_servers_on_every_gpu_node():
    assert plan_servers("per_node", 1, 1, 1.0, NODES, driver="head") == ["gpu-a", "gpu-b"]
    assert plan_servers("per_node", 1, 2, 2.0, NODES, driver="head") == ["gpu-b", "gpu-b"]
    assert plan_servers("per_node", 1, 1, 0.0, NODES, driver="cpu-c") == ["cpu-c", "head", "gpu-a", "gpu-b"]


def test_spread_placement_goes_round_robin_from_the_driver_node():
    assert plan_servers("spread", 3, 1, 0.0, [HEAD], driver="head") == ["head"] * 3
    assert plan_servers("spread", 3, 1, 1.0, NODES, driver="gpu-b") == ["gpu-b", "gpu-a", "gpu-b"]


def test_placement_without_a_fitting_node_names_what_is_missing():
    with pytest.raises(ClusterError, match=r"service.num_gpus.*10.0.0.4.*0 GPU.*allowed: service.num_gpus=0"):
        plan_servers("per_node", 1, 1, 1.0, [CPU_C])
    assert plan_servers("per_node", 1, 1, 0.0, NODES, driver="head", num_cpus=16) == ["cpu-c"]
    with pytest.raises(ClusterError, match=r"no Ray node with the GPUs has the 12 CPU\(s\).*service.num_cpus.*10.0.0.3.*8 CPU"):
        plan_servers("per_node", 1, 1, 1.0, NODES, num_cpus=12)
    with pytest.raises(ConfigError, match="service.placement.*allowed: spread, per_node"):
        plan_servers("anywhere", 1, 1, 0.0, NODES)


def test_a_fixed_port_allows_one_server_per_node():
    cluster.check_ports(0, ["a", "a"])
    cluster.check_ports(50051, ["a", "b"])
    with pytest.raises(ConfigError, match=r"'service.port' is 50051, but 2 servers go to node a.*service.port=0"):
        cluster.check_ports(50051, ["a", "b", "a"])


def test_runners_prefer_their_own_nodes_server_and_spread_otherwise():
    addrs, nodes = ["a:1", "b:1", "c:1"], ["n1", "n2", "n2"]
    assert server_order(addrs, nodes, "n1", 5) == ["a:1", "b:1", "c:1"]
    assert server_order(addrs, nodes, "n2", 0) == ["b:1", "c:1", "a:1"]
    assert server_order(addrs, nodes, "n2", 1) == ["c:1", "b:1", "a:1"]
    assert [server_order(addrs, nodes, "cpu", i)[0] for i in range(4)] == ["a:1", "b:1", "c:1", "a:1"]
    assert server_order(addrs, [], "n1", 1) == ["b:1", "c:1", "a:1"]            # nodes unknown: as before
    with pytest.raises(ValueError, match="server_nodes must name one node per address"):
        EnvConfig(addresses=addrs, server_nodes=["n1"]).validate()


def test_cluster_mode_widens_a_loopback_host_and_keeps_a_named_one():
    assert cluster.bind_host(load_config([])) == "127.0.0.1"
    assert cluster.bind_host(load_config(["ray.address=10.0.0.1:6379"])) == "0.0.0.0"
    assert cluster.bind_host(load_config(["preset=cluster"])) == "0.0.0.0"
    assert cluster.bind_host(load_config(["ray.address=auto", "service.host=10.0.0.9"])) == "10.0.0.9"


def test_servers_beyond_loopback_need_a_token_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("FLYWHEEL_TOKEN", raising=False)
    monkeypatch.delenv("FLYWHEEL_TOKEN_FILE", raising=False)
    assert cluster.driver_token_digest(load_config([])) is None                 # loopback: no token needed
    with pytest.raises(ConfigError, match=r"'service.token_file' is not set.*listen on 0.0.0.0.*file_mounts"):
        cluster.driver_token_digest(load_config(["ray.address=auto"]))
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    cfg = load_config(["ray.address=auto", f"service.token_file={token}", "service.tls_cert_file=/c.pem",
                       "service.tls_key_file=/k.pem"])
    assert cluster.driver_token_digest(cfg) == cluster._digest("s3cret")
    server = cluster.server_config(cfg)
    assert type(server) is ServerConfig and server.host == "0.0.0.0" and server.token_file == str(token)
    assert cluster.tls_root_cert(cfg) == "/c.pem"                                # a self-signed server certificate
    monkeypatch.setenv("FLYWHEEL_TOKEN_FILE", "~/t")
    assert cluster.token_file(load_config(["ray.address=auto"])) == str(Path.home() / "t")


def test_node_checks_name_each_node_and_what_it_lacks():
    good = {"node_id": "a" * 16, "ip": "10.0.0.2", "code": "c1", "token": "t1", "token_error": ""}
    facts = [good, {**good, "node_id": "b" * 16, "code": "c2"}, {**good, "node_id": "d" * 16, "token": None},
             {**good, "node_id": "e" * 16, "token": None, "token_error": "cannot read the token file /x"},
             {"node_id": "f" * 16, "ip": "10.0.0.9", "error": "ModuleNotFoundError: No module named 'flywheel'"}]
    problems = check_nodes(facts, "c1", "t1", "/x")
    assert len(problems) == 4
    assert "bbbbbbbb" in problems[0] and "other flywheel sources" in problems[0]
    assert "dddddddd" in problems[1] and "no token" in problems[1] and "/x" in problems[1]
    assert "cannot read the token file /x" in problems[2]
    assert "10.0.0.9" in problems[3] and "install the project" in problems[3]
    assert check_nodes([good], "c1", None, None) == []


def test_placement_keys_are_checked_at_load():
    with pytest.raises(ConfigError, match="'service.placement' is 'everywhere'; allowed: spread, per_node"):
        load_config(["service.placement=everywhere"])
    with pytest.raises(ConfigError, match="'service.servers_per_node' is 0; allowed"):
        load_config(["service.servers_per_node=0"])


def test_cluster_preset_and_launcher_config_agree():
    cfg = load_config(["preset=cluster"])
    assert (cfg.service.placement, cfg.service.num_gpus, cfg.world_model.num_gpus) == ("per_node", 1.0, 1.0)
    assert cfg.service.token_file == str(Path.home() / ".flywheel" / "token") and cfg.engine.name == "auto"
    text = (ROOT / "configs" / "cluster" / "ray-cluster.yaml").read_text()
    launcher = yaml.safe_load(text)
    assert text.count("github.com/YOUR-ORG/flywheel.git") == 1                   # the repository, named once
    assert "~/.flywheel/token" in launcher["file_mounts"]
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all("~/flywheel/.venv/bin/" in c for c in starts)                     # the project's own Ray and MLflow
    assert any("mlflow server" in c and "--port 5000" in c for c in starts) and cfg.tracking.uri.endswith(":5000")


def test_a_staged_server_ships_its_recordings_and_serves_the_world_model_it_was_sent(tmp_path):
    import ray

    from policies.rllib_adapter import init_ray
    from services.client import SimulatorClient
    from services.server_actor import Placement, _owner_alive, staging_dir, start_server_actors, stop_server_actors
    from simulators.dataset import TransitionDataset
    from simulators.world_model import WorldModel, WorldModelConfig

    init_ray(2)
    wm = WorldModel("pendulum", 2, 1, WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1))
    wm.save(tmp_path / "wm.pt")
    node = ray.get_runtime_context().get_node_id()
    config = ServerConfig(task="pendulum", engine="mujoco", world_model_path="/nowhere/wm.pt",
                          trajectory_dir="/nowhere/raw", flush_seconds=0.2)
    name = f"test-{tmp_path.name}"
    placement = Placement(node_id=node, staging=name, world_model=ray.put((tmp_path / "wm.pt").read_bytes()))
    actors, addresses = start_server_actors([config], [placement])
    with SimulatorClient(addresses[0]) as client:
        session = client.create_session("pendulum", 3, fidelity=1.0, seed=1)
        assert session.info.wm_version == wm.version                       # the bytes it was sent, not a path
        session.reset()
        for _ in range(5):
            session.step(np.ones((3, 1), np.float32))
    assert staging_dir(name).is_dir()
    owner = (staging_dir(name) / "owner").read_text().split()
    assert int(owner[0]) == ray.get(actors[0].pid.remote())                  # the actor recording there
    assert _owner_alive(staging_dir(name))                                   # so no sweep removes it
    dest = tmp_path / "store" / "raw"
    reports = stop_server_actors(actors, collect=[dest])
    assert reports[0]["collected"] >= 1 and not staging_dir(name).exists()
    data = TransitionDataset.concat([TransitionDataset.load(p) for p in sorted(dest.glob("*.npz"))])
    assert len(data) == 3 * 5 and np.all(data.actions == 1.0)


def test_a_shard_that_cannot_be_copied_is_a_recording_error(tmp_path):
    import ray

    from policies.rllib_adapter import init_ray
    from services.client import SimulatorClient
    from services.server_actor import Placement, staging_dir, start_server_actors, stop_server_actors

    init_ray(2)
    config = ServerConfig(task="pendulum", engine="mujoco", trajectory_dir="/nowhere/raw", flush_seconds=0.2)
    placement = Placement(node_id=ray.get_runtime_context().get_node_id(), staging=f"test-{tmp_path.name}")
    actors, addresses = start_server_actors([dataclasses.replace(config)], [placement])
    with SimulatorClient(addresses[0]) as client:
        session = client.create_session("pendulum", 2, fidelity=1.0)
        session.reset()
        session.step(np.zeros((2, 1), np.float32))
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the directory should be")
    with pytest.raises(RecordingError, match=r"blocked/.*\.npz"):
        stop_server_actors(actors, collect=[blocked / "raw"])
    shutil.rmtree(staging_dir(placement.staging))              # kept by the failed copy; not the machine's to keep


def test_staging_that_a_dead_run_left_is_removed_and_a_live_or_recent_one_kept(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from services.server_actor import OWNER_FILE, _process_id, remove_abandoned_staging

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_id = _process_id(gone.pid)
    gone.wait()                                                # an actor of a run whose driver was killed
    dirs = {"live": _process_id(os.getpid()), "dead": gone_id, "reused-pid": f"{os.getpid()} 1",
            "never-owned": None, "dead-but-recent": gone_id}
    old = time.time() - 7200
    for name, owner in dirs.items():
        (tmp_path / name / "raw").mkdir(parents=True)
        (tmp_path / name / "raw" / "s-000.npz").write_bytes(b"shard")
        if owner is not None:
            (tmp_path / name / OWNER_FILE).write_text(owner)
        if name != "dead-but-recent":
            for p in (tmp_path / name / "raw", tmp_path / name / OWNER_FILE, tmp_path / name):
                if p.exists():
                    os.utime(p, (old, old))
    assert remove_abandoned_staging(tmp_path, after_s=3600) == ["dead", "never-owned", "reused-pid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dead-but-recent", "live"]
    assert remove_abandoned_staging(tmp_path / "nothing-here") == []


def test_a_restarted_staged_server_keeps_what_its_dead_incarnation_recorded(tmp_path):
    import os
    import signal
    import time

    import ray

    from policies.rllib_adapter import init_ray
    from services.client import SimulatorClient
    from services.server_actor import Placement, staging_dir, start_server_actors, stop_server_actors

    init_ray(2)
    name = f"test-restart-{tmp_path.name}"
    config = ServerConfig(task="pendulum", engine="mujoco", trajectory_dir="/nowhere/raw", flush_seconds=0.2)
    actors, addresses = start_server_actors([config], [Placement(ray.get_runtime_context().get_node_id(), name)])
    with SimulatorClient(addresses[0]) as client:
        session = client.create_session("pendulum", 2, fidelity=1.0)
        session.reset()
        session.step(np.zeros((2, 1), np.float32))
        session.reset()                                      # the abandoned episodes are written promptly
    raw = staging_dir(name) / "raw"
    deadline = time.monotonic() + 60
    while not list(raw.glob("*.npz")) and time.monotonic() < deadline:
        time.sleep(0.1)
    first = {p.name for p in raw.glob("*.npz")}
    assert first
    os.kill(ray.get(actors[0].pid.remote()), signal.SIGKILL)
    with SimulatorClient(addresses[0], timeout=120) as client:   # the new incarnation, same node and port
        session = client.create_session("pendulum", 2, fidelity=1.0)
        session.reset()
        session.step(np.ones((2, 1), np.float32))
    dest = tmp_path / "raw"
    reports = stop_server_actors(actors, collect=[dest])
    names = {p.name for p in dest.glob("*.npz")}
    assert reports[0]["incarnation"] == 1 and first < names and not staging_dir(name).exists()


def test_self_play_asking_a_local_ray_for_more_cpus_than_it_has_is_refused_naming_the_keys():
    import ray

    from flywheel.parts import check_local_cpus
    from policies.rllib_adapter import init_ray

    init_ray(2)
    have = ray.cluster_resources()["CPU"]
    check_local_cpus(load_config([f"ppo.num_env_runners={int(have)}"]))                 # fits: no error
    with pytest.raises(ConfigError, match=rf"needs {int(have) + 1} of this machine's Ray CPUs .*has {have:g}.*"
                                          r"ppo.num_env_runners or ppo.num_cpus_per_runner"):
        check_local_cpus(load_config([f"ppo.num_env_runners={int(have) + 1}", "service.max_sessions=64"]))
    with pytest.raises(ConfigError, match=r"1 server\(s\) x 1, service.num_cpus"):
        check_local_cpus(load_config([f"ppo.num_env_runners={int(have)}", "service.num_cpus=1"]))
    with pytest.raises(ConfigError, match="agent.num_workers"):
        check_local_cpus(load_config(["agent.kind=planner", f"agent.num_workers={int(have) + 1}"]))
