"""End to end on the real parts (MuJoCo engine, gRPC servers, RLlib PPO, MLflow SQLite) with ``preset=smoke``.

A two-lap run through the CLI, and a run killed with SIGKILL during lap 1 then resumed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["preset=smoke", "laps=2", "engine.name=mujoco", "reality.engine=mujoco"]
REQUIRED = ["capability/success_rate", "capability/return", "world_model/one_step_error",
            "world_model/open_loop_error", "imagination/accuracy", "physics/violation_rate", "reward/task",
            "reward/imagination", "reward/physics", "data/selected_trajectories", "data/total_transitions",
            "lap/seconds", "time/serve", "time/self_play", "time/select", "time/retrain", "time/evaluate",
            "time/seed"]

pytestmark = pytest.mark.slow


def flywheel(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "flywheel", *args], cwd=kw.pop("cwd", ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def steps_of(tracker: Tracker, key: str) -> list[int]:
    return sorted(s for s, _ in tracker.metric_history(key))


def test_two_lap_smoke_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"                      # given relative to the working directory, as users do
    out = finish(flywheel("run", *SMOKE, "runs_root=.", "--run-dir", "run", cwd=tmp_path))
    tracker = Tracker.attach(run_dir)
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    for when in ("[start]", "[end]"):
        line = next(x for x in out.splitlines() if x.startswith(when))
        assert str(run_dir) in line and tracker.uri in line and tracker.run_id in line
    for stage in ("seed", "self_play", "select", "retrain", "evaluate", "log"):
        assert f"lap 0 (1 of 2) | {stage}" in out
    for key in REQUIRED:
        expected = [0] if key == "time/seed" else [0, 1]
        assert steps_of(tracker, key) == expected, key
    for lap in (0, 1):
        for name in (f"wm_lap{lap:03d}.pt", f"policy_lap{lap:03d}.pt", f"policy_lap{lap:03d}"):
            assert (run_dir / "checkpoints" / name).exists(), name
    # lap 1 sampled with lap 0's trained policy: every runner held exactly the weights lap 0 ended with
    carried = [json.loads((run_dir / "laps" / f"lap_{k:03d}" / "policy.json").read_text()) for k in (0, 1)]
    assert carried[1]["restored_from"] == str(run_dir / "checkpoints" / "policy_lap000")
    assert carried[1]["start_digest"] == carried[0]["end_digest"] != carried[0]["start_digest"]
    assert carried[1]["runner_digests"] and set(carried[1]["runner_digests"]) == {carried[0]["end_digest"]}
    for lap in (0, 1):
        stored = steps_of(tracker, "data/stored_transitions")
        assert stored == [0, 1]
        env_steps = dict(tracker.metric_history("self_play/env_steps"))[lap]
        assert env_steps >= 1 and dict(tracker.metric_history("data/stored_transitions"))[lap] >= 1
    assert (run_dir / "report" / "capability.png").exists() and (run_dir / "report" / "trajectory_lap001.png").exists()
    arts = {a.path for a in tracker.client.list_artifacts(tracker.run_id, "report/lap_001")}
    assert {"report/lap_001/capability.png", "report/lap_001/trajectory_lap001.png"} <= arts
    table = out[out.index("lap  success"):].splitlines()
    assert table[2].split()[0] == "0" and table[3].split()[0] == "1"
    report = subprocess.run([sys.executable, "-m", "flywheel", "report", str(run_dir)], cwd=ROOT, text=True,
                            capture_output=True, timeout=300, check=False)
    assert report.returncode == 0 and "capability.png" in report.stdout


def test_killed_during_lap_one_resumes_without_duplicates(tmp_path):
    run_dir = tmp_path / "run"
    proc = flywheel("run", *SMOKE, f"runs_root={tmp_path}", "--run-dir", str(run_dir))
    lap1 = run_dir / "laps" / "lap_001" / "metrics.json"
    deadline = time.time() + 480
    while not lap1.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert lap1.exists(), "lap 1 never finished its first stage"
    os.killpg(proc.pid, signal.SIGKILL)                           # the CLI and everything it started
    proc.communicate(timeout=60)
    done_before = json.loads(lap1.read_text())["stages"]
    assert "self_play" in done_before and "log" not in done_before
    tracker = Tracker.attach(run_dir)
    assert tracker.client.get_run(tracker.run_id).info.status == "RUNNING"    # killed outright
    raw_before = {p.name: p.stat().st_mtime for p in (run_dir / "store" / "lap_001" / "raw").glob("*.npz")}
    seed_mtime = (run_dir / "store" / "lap_000" / "seed.npz").stat().st_mtime
    policy_mtime = (run_dir / "checkpoints" / "policy_lap001.pt").stat().st_mtime

    out = finish(flywheel("run", "--resume", str(run_dir)))
    assert f"lap 1 (2 of 2) | {done_before[-1]}" not in out and "lap 0 (1 of 2)" not in out   # finished stages are not rerun
    assert Tracker.attach(run_dir).run_id == tracker.run_id
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    for key in REQUIRED:
        expected = [0] if key == "time/seed" else [0, 1]
        assert steps_of(tracker, key) == expected, key                      # nothing lost, nothing twice
    raw_after = {p.name: p.stat().st_mtime for p in (run_dir / "store" / "lap_001" / "raw").glob("*.npz")}
    assert raw_after == raw_before and raw_after
    assert (run_dir / "store" / "lap_000" / "seed.npz").stat().st_mtime == seed_mtime
    assert (run_dir / "checkpoints" / "policy_lap001.pt").stat().st_mtime == policy_mtime
    manifest = json.loads((run_dir / "store" / "manifest.json").read_text())["shards"]
    keys = [(s["lap"], s["kind"]) for s in manifest]
    assert len(keys) == len(set(keys)) and (0, "seed") in keys
    runs = tracker.client.search_runs([tracker.client.get_run(tracker.run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [tracker.run_id]
