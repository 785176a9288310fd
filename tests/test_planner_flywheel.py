"""The planner in the flywheel: ``agent`` config errors, and a two-lap run on the real parts through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flywheel.config import ConfigError, load_config
from flywheel.tracking import Tracker
from policies.loading import load_policy
from policies.planner_policy import PlannerPolicy

ROOT = Path(__file__).resolve().parent.parent
PLANNER = ["agent.kind=planner", "agent.horizon=8", "agent.candidates=32", "agent.iterations=2", "agent.elites=4"]
SMALL = ["preset=smoke", "laps=2", "engine.name=mujoco", "reality.engine=mujoco", "ppo.train_batch_size=512",
         "ppo.minibatch_size=128", "reality.eval_episodes=4"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["agent.kind=dreamer"], "config key 'agent.kind' is 'dreamer'; allowed: ppo, planner"),
    (["agent.kind=planner", "agent.horizon=3"],
     r"'agent.horizon' \(3\) is shorter than the imagination window 'simulator.horizon' \(5\)"),
    (["agent.elites=200"], r"section 'agent': agent.elites \(200\) must be <= candidates \(64\)"),
    (["agent.method=ilqr"], "agent.method is 'ilqr'; allowed: cem, mppi"),
    (["agent.success_bonus=-1"], "agent.success_bonus must be a number >= 0, got -1.0"),
    (["agent.kind=planner", "agent.warm_start=/nonexistent/policy.pt"], "'agent.warm_start' .* is not a file"),
    (["agent.kind=planner", "task=lift"], "cannot plan task 'lift'.*allowed: agent.kind=ppo"),
    (["agent.kind=planner", "self_play.num_servers=2"],
     r"'self_play.num_servers' \(2\) is above .*\(agent.num_workers = 1\)"),
])
def test_agent_config_errors_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_agent_defaults_and_a_valid_planner_config():
    assert load_config([]).agent.kind == "ppo"
    cfg = load_config(["agent.kind=planner", "agent.replan=step", "agent.horizon=3", "task=cartpole"])
    assert (cfg.agent.kind, cfg.agent.replan, cfg.agent.horizon) == ("planner", "step", 3)
    assert load_config(["task=cartpole"]).agent.horizon == 40          # configs/task/cartpole.yaml


@pytest.mark.slow
def test_two_lap_planner_run_end_to_end(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local"}  # its own Ray
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "flywheel", "run", *SMALL, *PLANNER, f"run_dir={run_dir}",
                           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    tracker = Tracker.attach(run_dir)
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    for lap in (0, 1):
        policy = load_policy(run_dir / "checkpoints" / f"policy_lap{lap:03d}.pt")
        assert isinstance(policy, PlannerPolicy) and policy.window == 5
        assert policy.planner.cfg.horizon == 8 and policy.planner.cfg.candidates == 32
        served = json.loads((run_dir / "laps" / f"lap_{lap:03d}" / "metrics.json").read_text())["metrics"]
        assert served["self_play/env_steps"] >= 512 and served["data/stored_transitions"] >= 512
        assert 0.0 <= served["capability/success_rate"] <= 1.0
        assert served["planner/plan_ms_per_step"] > 0 and served["planner/imagination_error"] >= 0   # the planner's own
    # each lap plans with the world model its servers serve: lap 1's planner holds lap 0's retrained model
    from simulators.world_model import WorldModel

    lap1 = load_policy(run_dir / "checkpoints" / "policy_lap001.pt")
    assert lap1.planner.wm.version == WorldModel.load(run_dir / "checkpoints" / "wm_lap000.pt").version
    carried = [json.loads((run_dir / "laps" / f"lap_{k:03d}" / "policy.json").read_text()) for k in (0, 1)]
    assert carried[1]["restored_from"] == str(run_dir / "checkpoints" / "policy_lap000")
    for c in carried:
        assert c["runner_digests"] == [c["start_digest"]] and c["end_digest"] == c["start_digest"]
    assert carried[1]["start_digest"] != carried[0]["start_digest"]     # another world model


def test_a_warm_start_that_is_not_this_tasks_ppo_policy_is_refused_up_front(tmp_path):
    from policies.torch_policy import TorchPolicy

    cartpole = tmp_path / "cartpole_policy.pt"               # another task's policy: 5 observations, not 3
    TorchPolicy(5, np.array([-1.0]), np.array([1.0]), [8]).save(str(cartpole))
    with pytest.raises(ConfigError, match=r"policy of 5 observations; task pendulum has 3, so it is another task's"):
        load_config(["agent.kind=planner", f"agent.warm_start={cartpole}"])
    junk = tmp_path / "notes.pt"
    junk.write_bytes(b"not a policy")
    with pytest.raises(ConfigError, match=r"'agent.warm_start' .*notes.pt.* is not a PPO policy file"):
        load_config(["agent.kind=planner", f"agent.warm_start={junk}"])
    pendulum = tmp_path / "pendulum_policy.pt"
    TorchPolicy(3, np.array([-2.0]), np.array([2.0]), [8]).save(str(pendulum))
    assert load_config(["agent.kind=planner", f"agent.warm_start={pendulum}"]).agent.warm_start == str(pendulum)
