"""Orchestrator bookkeeping on fast fakes for serve/self-play/evaluate (real seed, select, retrain, MLflow).

The real end-to-end path (gRPC servers, RLlib, reality evaluation, a process kill) is in
``tests/test_flywheel_e2e.py``; here a failing stage and a resume are exercised in seconds.
"""

import contextlib
import json

import numpy as np
import pytest

from flywheel import lap as laps
from flywheel.config import ConfigError, load_config
from flywheel.orchestrator import Orchestrator
from flywheel.tracking import Tracker
from simulators.dataset import SOURCE_SIM

TINY = ["preset=smoke", "engine.name=mujoco", "reality.engine=mujoco", "reality.seed_steps=400",
        "world_model.max_epochs=1", "laps=3"]


class Boom(RuntimeError):
    pass


@pytest.fixture
def fakes(monkeypatch):
    """Replace the RLlib/gRPC stages: self-play writes a raw shard like the server's recorder would."""
    calls = {"self_play": 0, "evaluate": 0, "fail_at": None}

    @contextlib.contextmanager
    def serve(ctx):
        ctx.store.clear_raw(ctx.lap)
        yield ["127.0.0.1:1"]

    def self_play(ctx, addresses):
        calls["self_play"] += 1
        data = ctx.store.load(kind="seed")
        data = data.select(np.arange(len(data)))
        data.episode_ids = data.episode_ids + (ctx.lap + 1) * laps.EPISODE_STRIDE
        data.source[:] = SOURCE_SIM
        data.success[:] = data.dones                          # every episode "succeeds"
        n = len(data)
        data.rewards = {"task": np.full(n, 0.5, np.float32), "imagination": np.full(n, 0.8, np.float32),
                        "physics": np.full(n, -0.1, np.float32), "total": np.full(n, 0.9, np.float32)}
        data.save(ctx.store.raw_dir(ctx.lap) / "session-0.npz")
        ctx.policy_path(ctx.lap).parent.mkdir(parents=True, exist_ok=True)
        ctx.policy_path(ctx.lap).write_bytes(b"policy")
        return {"self_play/env_steps": float(n)}

    def evaluate(ctx):
        calls["evaluate"] += 1
        if calls["fail_at"] == ctx.lap:
            raise Boom("reality went away")
        return {"capability/success_rate": 0.1 * ctx.lap, "capability/return": 10.0 * ctx.lap,
                "world_model/one_step_error": 0.1, "world_model/open_loop_error": 0.2,
                "imagination/accuracy": 0.7, "physics/violation_rate": 0.05}

    monkeypatch.setattr(laps, "serve", serve)
    monkeypatch.setattr(laps, "self_play", self_play)
    monkeypatch.setattr(laps, "evaluate", evaluate)
    monkeypatch.setattr("flywheel.orchestrator.init_ray", lambda cfg: None)
    return calls


def test_failed_stage_marks_run_failed_and_resume_finishes_it_once(tmp_path, fakes):
    cfg = load_config([*TINY, f"runs_root={tmp_path}"])
    run_dir = tmp_path / "run"
    fakes["fail_at"] = 1
    orch = Orchestrator.create(cfg, run_dir, say=lambda m: None)
    with pytest.raises(Boom):
        orch.run()
    run_id = orch.tracker.run_id
    assert orch.tracker.client.get_run(run_id).info.status == "FAILED"
    lap1 = json.loads((run_dir / "laps/lap_001/metrics.json").read_text())
    assert lap1["stages"] == ["self_play", "select", "retrain"]        # evaluate failed after these
    fakes["fail_at"] = None

    with pytest.raises(ConfigError, match="simulator.fidelity"):
        Orchestrator.resume(run_dir, ["simulator.fidelity=0.0"])
    resumed = Orchestrator.resume(run_dir, say=lambda m: None)
    rows = resumed.run()
    assert resumed.tracker.run_id == run_id
    assert resumed.tracker.client.get_run(run_id).info.status == "FINISHED"
    assert fakes["self_play"] == 3 and fakes["evaluate"] == 1 + 1 + 2   # lap 1's self-play was not redone
    assert [r["lap"] for r in rows] == [0, 1, 2]
    tracker = Tracker.attach(run_dir)
    for key in ("capability/success_rate", "data/selected_trajectories", "data/total_transitions", "lap/seconds",
                "reward/imagination", "time/self_play", "time/retrain"):
        assert [s for s, _ in tracker.metric_history(key)] == [0, 1, 2], key
    entries = [(e.lap, e.kind) for e in resumed.store.entries()]
    assert entries == [(0, "seed"), (0, "selected"), (1, "selected"), (2, "selected")]
    seed = resumed.store.load(kind="seed")
    assert rows[-1]["data/total_transitions"] == 4 * len(seed)
    assert (run_dir / "report/capability.png").exists() and (run_dir / "checkpoints/wm_lap002.pt").exists()
    arts = {a.path for a in tracker.client.list_artifacts(run_id, "checkpoints/lap_002")}
    assert arts == {"checkpoints/lap_002/wm_lap002.pt", "checkpoints/lap_002/policy_lap002.pt"}


def test_new_run_refuses_an_existing_run_dir_and_more_laps_resume(tmp_path, fakes):
    cfg = load_config([*TINY, "laps=1", f"runs_root={tmp_path}"])
    orch = Orchestrator.create(cfg, tmp_path / "run", say=lambda m: None)
    orch.run()
    with pytest.raises(ConfigError, match="--resume"):
        Orchestrator.create(load_config([*TINY, f"runs_root={tmp_path}"]), tmp_path / "run")
    more = Orchestrator.resume(tmp_path / "run", ["laps=2"], say=lambda m: None)   # the lap count may grow
    assert [r["lap"] for r in more.run()] == [0, 1]
    forced = Orchestrator.resume(tmp_path / "run", ["selection.require_success=false"], force=True)
    assert forced.cfg.selection.require_success is False


def test_sweep_has_a_parent_run_children_and_a_row_per_setting(tmp_path, fakes):
    from flywheel.sweep import parse_grid, run_sweep

    lines = []
    sweep_dir = run_sweep([*TINY, "laps=2", f"runs_root={tmp_path}"], parse_grid(["simulator.fidelity=0,1"]), seeds=1,
                          sweep_dir=tmp_path / "sweep", say=lines.append)
    parent = Tracker.attach(sweep_dir)
    client = parent.client
    run = client.get_run(parent.run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(c.data.params["simulator.fidelity"] for c in children) == ["0.0", "1.0"]
    assert all(c.info.status == "FINISHED" for c in children) and run.info.status == "FINISHED"
    table = (sweep_dir / "report" / "sweep_table.txt").read_text().split("\n\n")[0].splitlines()
    assert [row.split()[0] for row in table[3:]] == ["simulator.fidelity=0", "simulator.fidelity=1"]
    assert (sweep_dir / "report" / "compounding.png").stat().st_size > 1000
    assert {a.path for a in client.list_artifacts(parent.run_id, "report")} == {
        "report/sweep_table.txt", "report/compounding.png"}
    assert [s for s, _ in parent.metric_history("sweep/simulator.fidelity_1/success_rate")] == [0, 1]
    with pytest.raises(ConfigError, match="simulator.fidelity"):
        run_sweep([*TINY, f"runs_root={tmp_path}"], parse_grid(["simulator.fidelity=0,3"]), 1, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
