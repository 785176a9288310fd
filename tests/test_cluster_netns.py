"""Two smoke laps on a Ray cluster of three separate hosts: head and two workers, each in its own network
namespace with its own IP (``tests/netns_cluster.py``), one stand-in GPU and one CPU per worker.

``test_cluster_multinode.py`` runs its nodes on one network stack, where an address any node reports
reaches every node; here an address that only works on its own host fails as it would between machines.
One simulator server (``service.placement=spread``) serves two runners, one per worker host, so one
runner's steps cross from one host to the other. The run is the ``flywheel run`` command a user types on
the head node; where things ran is read from Ray's own tables.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from netns_cluster import ROOT, NetnsCluster, available
from test_cluster_multinode import REQUIRED

from flywheel.tracking import Tracker

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(available()), reason=available() or "n/a")]


def test_two_smoke_laps_across_three_hosts(tmp_path):
    token = tmp_path / "token"
    token.write_text("netns-cluster-token\n")
    token.chmod(0o600)
    run_dir = tmp_path / "run"
    with NetnsCluster(tmp_path, workers=2, worker_resources={"num_gpus": 1}) as c:
        head_ip, worker_ips = c.ips[0], set(c.ips[1:])
        done = c.run([sys.executable, "-m", "flywheel", "run", "preset=smoke", "laps=2", "engine.name=mujoco",
                      "reality.engine=mujoco", f"ray.address={c.address}", "service.placement=spread",
                      "self_play.num_servers=1",
                      "service.num_gpus=1", f"service.token_file={token}", "world_model.num_gpus=1",
                      "ppo.num_env_runners=2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                      f"run_dir={run_dir}"], timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        state = c.ray_state()

    ip_of = {n["node_id"]: n["ip"] for n in state["nodes"]}
    assert set(ip_of.values()) == {head_ip, *worker_ips}
    assert [j["driver_ip"] for j in state["jobs"]][0] == head_ip          # the run's driver: the head's host

    # all metrics in MLflow, one value per lap
    tracker = Tracker.attach(run_dir)
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    for key in REQUIRED:
        assert sorted(s for s, _ in tracker.metric_history(key)) == [0, 1], key

    # one server per lap on a worker host, reached at that host's own address; a runner on each worker host,
    # so one of them steps the server on the other host
    servers = {a["pid"]: ip_of[a["node_id"]] for a in state["actors"] if a["class"] == "SimulatorServerActor"}
    runners = {a["pid"]: ip_of[a["node_id"]] for a in state["actors"] if a["class"] == "FlywheelEnvRunner"}
    assert len(servers) == 2 and set(servers.values()) <= worker_ips
    for lap in (0, 1):
        record = json.loads((run_dir / "laps" / f"lap_{lap:03d}" / "placement.json").read_text())
        (server,) = record["servers"]
        server_ip = server["address"].rsplit(":", 1)[0]
        assert server_ip == servers[server["pid"]] and server_ip in worker_ips          # its host's own IP
        assert len(record["runners"]) == 2 and {runners[r["pid"]] for r in record["runners"]} == worker_ips
        assert {r["address"] for r in record["runners"]} == {server["address"]}          # across hosts too
        assert sorted(r["local"] for r in record["runners"]) == [False, True]
        shards = list((run_dir / "store" / f"lap_{lap:03d}" / "raw").glob("*.npz"))
        assert shards                                                                  # its recordings came back
        sessions = json.loads((run_dir / "laps" / f"lap_{lap:03d}" / "metrics.json").read_text())
        assert sessions["metrics"]["self_play/env_steps"] >= 2048, sessions["metrics"]
    assert done.stdout.count("copied into the store from 1 of 1 server(s) on other nodes") == 2

    # every world-model fit (seed and two retrains) ran on a worker host, where the stand-in GPUs are
    fits = state["tasks"].get("fit_world_model", [])
    assert len(fits) >= 3 and {ip_of[n] for n in fits} <= worker_ips


def test_a_worker_host_that_dies_mid_lap_loses_its_server_and_the_lap_goes_on(tmp_path):
    """``flywheel run preset=cluster`` on the head's host, logging to an MLflow server there (as the cluster
    launcher sets it up), budgets cut to a smoke run. Host 2 loses power during lap 1's self-play (every process
    on it SIGKILLed): its server and its runner (a runner takes a whole host's two CPUs, so there is one on each)
    die; the runner on host 1 samples the rest of the lap's budget from host 1's server; the lap says which
    server and how many runners were lost and counts them in MLflow."""
    token = tmp_path / "token"
    token.write_text("netns-cluster-token\n")
    token.chmod(0o600)
    run_dir = tmp_path / "run"
    with NetnsCluster(tmp_path, workers=2, worker_resources={"num_gpus": 1, "num_cpus": 2}) as c:
        c.start_mlflow(tmp_path)
        argv = ["ip", "netns", "exec", c.names[0], sys.executable, "-m", "flywheel", "run", "preset=cluster",
                f"ray.address={c.address}", f"service.token_file={token}", "laps=2", "reality.seed_steps=800",
                "reality.eval_episodes=8", "simulator.num_envs=8", "self_play.iterations=4", "ppo.num_env_runners=2",
                "ppo.num_cpus_per_runner=2", "ppo.train_batch_size=2048", "ppo.minibatch_size=256",
                "world_model.max_epochs=3", f"run_dir={run_dir}"]
        proc = subprocess.Popen(argv, cwd=ROOT, env=c.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines, killed = [], 0
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not killed and "lap 1 | self_play: iteration 1," in line:
                killed = c.kill_host(2)
        assert proc.wait(timeout=900) == 0, "\n".join(lines[-60:])
        assert killed > 0, "\n".join(lines[-60:])
        state = c.ray_state()

    dead = [n for n in state["nodes"] if not n["alive"]]
    assert [n["ip"] for n in dead] == [c.ips[2]]                                      # Ray saw the host die
    lost = [x for x in lines if "was lost before it could stop" in x]
    assert len(lost) == 1 and lost[0].startswith("  lap 1 | serve: server " + c.ips[2] + ":"), lines[-40:]
    assert any("lap 1 | serve:" in x and "from 1 of 2 server(s) on other nodes" in x for x in lines)
    assert any("lap 1 | self_play: 1 of 2 runner(s) out of service" in x for x in lines)
    info = json.loads((run_dir / "tracking.json").read_text())
    assert info["uri"] == "http://127.0.0.1:5000"                                     # the head's MLflow server
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", info["experiment"], info["run_id"])   # its store, read here
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    assert [v for _, v in sorted(tracker.metric_history("self_play/servers_lost"))] == [0.0, 1.0]
    # host 1's two CPUs hold its own runner, so Ray cannot bring the dead one back there before the lap ends
    assert [v for _, v in sorted(tracker.metric_history("self_play/runners_out_of_service"))] == [0.0, 1.0]
    assert [v for _, v in sorted(tracker.metric_history("self_play/env_steps"))] == [8192.0, 8192.0]
    assert dict(tracker.metric_history("data/stored_transitions"))[1] > 0              # the surviving server's
    placement = json.loads((run_dir / "laps" / "lap_001" / "placement.json").read_text())
    assert sorted(r["address"].rsplit(":", 1)[0] for r in placement["runners"]) == c.ips[1:]   # one died with it
    for key in REQUIRED:
        assert sorted(s for s, _ in tracker.metric_history(key)) == [0, 1], key
