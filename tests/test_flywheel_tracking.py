"""MLflow tracking on a real SQLite store, and the report plots and tables."""

import json
import sqlite3

import numpy as np

from flywheel.config import load_config
from flywheel.report import format_sweep_table, format_table, load_history, plot_sweep, sweep_summary, write_run_report
from flywheel.tracking import Tracker, default_uri


def test_run_is_reopened_not_duplicated_and_metrics_are_logged_once(tmp_path):
    cfg = load_config([f"runs_root={tmp_path}"])
    run_dir = tmp_path / "run-a"
    tracker = Tracker.open(cfg, run_dir)
    assert tracker.uri == default_uri(tmp_path) and (tmp_path / "mlflow.db").exists()
    assert tracker.log_metrics({"capability/success_rate": 0.25, "lap/seconds": 3.0}, step=0) == 2
    tracker.finish("FAILED")
    assert tracker.client.get_run(tracker.run_id).info.status == "FAILED"

    again = Tracker.open(cfg, run_dir)                     # resume: the same run, RUNNING again
    assert again.run_id == tracker.run_id
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
    assert again.log_metrics({"capability/success_rate": 0.25}, step=0) == 0   # already there
    again.log_metrics({"capability/success_rate": 0.5}, step=1)
    assert again.metric_history("capability/success_rate") == [(0, 0.25), (1, 0.5)]
    run = again.client.get_run(again.run_id)
    assert run.data.params["simulator.fidelity"] == str(cfg.simulator.fidelity)
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"   # as start_run adds
    assert run.data.tags["mlflow.source.name"]
    assert [a.path for a in again.client.list_artifacts(again.run_id, "config")] == ["config/resolved.yaml"]
    runs = again.client.search_runs([run.info.experiment_id])
    assert len(runs) == 1
    again.log_metrics({"sweep/x": 1.0}, step=0)                 # a summary recomputed later replaces its value
    again.log_metrics({"sweep/x": 2.0}, step=0, replace=True)
    assert again.log_metrics({"sweep/x": 2.0, "capability/success_rate": 0.5}, step=0) == 1   # the same value: skipped
    assert again.replaced == 1                                  # a lap run again: its new value is the latest
    assert again.client.get_run(again.run_id).data.metrics["capability/success_rate"] == 0.5


def test_a_reopened_run_logs_new_keys_and_names_changed_params(tmp_path):
    cfg = load_config([f"runs_root={tmp_path}", "laps=2"])
    run_dir = tmp_path / "run-a"
    tracker = Tracker.open(cfg, run_dir)
    client = tracker.client
    with sqlite3.connect(tmp_path / "mlflow.db") as db:      # a key Flywheel did not have when the run started
        db.execute("DELETE FROM params WHERE run_uuid = ? AND key = 'agent.horizon'", (tracker.run_id,))
    assert "agent.horizon" not in client.get_run(tracker.run_id).data.params
    more = load_config([f"runs_root={tmp_path}", "laps=5", "simulator.fidelity=0.25"])
    again = Tracker.open(more, run_dir)
    run = client.get_run(again.run_id)
    assert run.data.params["laps"] == "2"                                   # MLflow keeps a param's first value
    assert run.data.params["agent.horizon"] == str(more.agent.horizon)      # the missing key is logged now
    changed = run.data.tags["flywheel.params_changed"].split("; ")
    assert sorted(changed) == ["laps: 2 -> 5", f"simulator.fidelity: {cfg.simulator.fidelity} -> 0.25"]
    resolved = client.download_artifacts(again.run_id, "config/resolved.yaml", str(tmp_path))
    assert "laps: 5" in open(resolved).read()
    back = Tracker.open(load_config([f"runs_root={tmp_path}", "laps=2"]), run_dir)   # as first logged again
    assert "flywheel.params_changed" not in client.get_run(back.run_id).data.tags


def test_sweep_children_point_at_parent(tmp_path):
    cfg = load_config([f"runs_root={tmp_path}", "tracking.experiment=sweeps"])
    parent = Tracker.open(cfg, tmp_path / "sweep")
    child = Tracker.open(cfg, tmp_path / "sweep" / "f0", parent_run_id=parent.run_id)
    tags = child.client.get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id
    assert json.loads((tmp_path / "sweep" / "f0" / "tracking.json").read_text())["run_id"] == child.run_id


def _fake_run(run_dir, laps=3):
    for lap in range(laps):
        d = run_dir / "laps" / f"lap_{lap:03d}"
        d.mkdir(parents=True)
        metrics = {"capability/success_rate": 0.1 * lap, "capability/return": 10.0 * lap,
                   "world_model/open_loop_error": 1.0 / (lap + 1), "lap/seconds": 12.0}
        (d / "metrics.json").write_text(json.dumps({"lap": lap, "logged": True, "metrics": metrics}))
    t = np.linspace(0, 1, 40)
    real = np.stack([np.sin(t), np.cos(t)], 1)
    np.savez(run_dir / "laps" / f"lap_{laps - 1:03d}" / "trajectory.npz", real=real, imagined=real + 0.05,
             dt=0.05, horizon=5)


def test_run_report_rebuilds_from_the_run_directory(tmp_path):
    _fake_run(tmp_path)
    rows = load_history(tmp_path)
    assert [r["lap"] for r in rows] == [0, 1, 2]
    files = write_run_report(tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["capability.png", "table.txt", "trajectory_lap002.png"]
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")
    table = format_table(rows).splitlines()
    assert len(table) == 2 + 3 and "success" in table[0] and "0.20" in table[-1] and "-" in table[-1]


def test_a_damaged_trajectory_file_costs_its_plot_only_and_is_named(tmp_path, capsys):
    _fake_run(tmp_path)
    traj = tmp_path / "laps" / "lap_002" / "trajectory.npz"
    traj.write_bytes(traj.read_bytes()[:100])                      # truncated
    names = sorted(f.name for f in write_run_report(tmp_path))
    assert names == ["capability.png", "table.txt"]
    assert f"no trajectory plot for lap 2: {traj} cannot be read" in capsys.readouterr().err


def test_rate_panels_span_0_to_1_so_an_all_zero_rate_is_drawn_at_the_bottom(tmp_path, monkeypatch):
    import matplotlib.figure

    from flywheel.report import plot_capability

    limits, save = {}, matplotlib.figure.Figure.savefig

    def saved(fig, *args, **kwargs):
        limits.update({ax.get_title(): ax.get_ylim() for ax in fig.axes})
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", saved)
    plot_capability([{"lap": k, "capability/success_rate": 0.0, "capability/return": 10.0 + k} for k in range(3)],
                    tmp_path / "capability.png")
    assert limits["success rate (reality)"] == (-0.03, 1.03)
    assert limits["return (reality)"] != (-0.03, 1.03)


def test_sweep_summary_has_a_row_per_setting_with_mean_and_spread(tmp_path):
    runs = [{"setting": f"simulator.fidelity={f}", "seed": s,
             "rows": [{"lap": lap, "capability/success_rate": f * lap + 0.1 * s} for lap in range(3)]}
            for f in (0.0, 1.0) for s in range(2)]
    summary = sweep_summary(runs)
    assert [s["setting"] for s in summary] == ["simulator.fidelity=0.0", "simulator.fidelity=1.0"]
    np.testing.assert_allclose(summary[1]["mean"], [0.05, 1.05, 2.05])
    np.testing.assert_allclose(summary[1]["std"], [0.05, 0.05, 0.05])
    np.testing.assert_allclose(summary[1]["lo"], [0.0, 1.0, 2.0])          # two seeds: the CI spans both
    np.testing.assert_allclose(summary[1]["hi"], [0.1, 1.1, 2.1])
    assert summary[1]["by_seed"][2] == {0: 2.0, 1: 2.1}
    text = format_sweep_table(summary, "success rate")
    assert len(text.splitlines()) == 3 + 2 and "2.05 [2, 2.1]" in text
    path = plot_sweep({"capability/success_rate": summary}, tmp_path / "sweep.png")
    assert path.stat().st_size > 1000


def test_runs_started_at_once_on_a_new_sqlite_store_all_open(tmp_path):
    """Three processes open runs on one new SQLite store at the same moment (a user launching seeds in parallel):
    each gets its run; none dies in MLflow's schema migration."""
    import subprocess
    import sys
    import time

    start = time.time() + 3.0
    code = ("import sys, time\n"
            "from flywheel.config import load_config\n"
            "from flywheel.tracking import Tracker\n"
            f"cfg = load_config(['runs_root={tmp_path}', 'seed=' + sys.argv[1]])\n"
            f"time.sleep(max(0.0, {start} - time.time()))\n"
            f"t = Tracker.open(cfg, '{tmp_path}/run-' + sys.argv[1])\n"
            "t.log_metrics({'capability/success_rate': 1.0}, step=0)\n"
            "t.finish('FINISHED')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    trackers = [Tracker.attach(tmp_path / f"run-{i}") for i in range(3)]
    assert len({t.run_id for t in trackers}) == 3
    assert all(t.client.get_run(t.run_id).info.status == "FINISHED" for t in trackers)
