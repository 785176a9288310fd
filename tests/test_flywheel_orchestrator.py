"""The lap loop and the orchestrator's bookkeeping, with fast fake parts handed in (real seed, select,
retrain, world-model fit, store and MLflow).

The real parts (gRPC servers, RLlib, reality evaluation) and real process kills are in
``tests/test_flywheel_e2e.py`` and ``tests/test_flywheel_faults.py``; here failures, stops and resumes
of the loop itself are exercised in seconds.
"""

import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flywheel.config import ConfigError, load_config
from flywheel.lap import EPISODE_STRIDE, LapParts, Served, StageError
from flywheel.orchestrator import Orchestrator, RunStopped
from flywheel.parts import fit_world_model
from flywheel.tracking import Tracker
from simulators.dataset import SOURCE_SIM

TINY = ["preset=smoke", "engine.name=mujoco", "reality.engine=mujoco", "reality.seed_steps=400",
        "world_model.max_epochs=1", "laps=3"]


def run_files(run_dir):
    """The run directory's own files and their bytes (not ``driver.lock``: it names its latest holder)."""
    return {p: p.read_bytes() for p in run_dir.glob("*.*") if p.is_file() and p.name != "driver.lock"}


class Boom(RuntimeError):
    pass


class FakePolicy:
    def save(self, path):
        open(path, "wb").write(b"policy")


class FakeTrainer:
    """Samples by copying the seed data into the lap's raw recordings, as a server's recorder would."""

    def __init__(self, ctx, calls):
        self.ctx, self.calls, self.digest = ctx, calls, "fresh"

    def restore(self, path):
        self.calls["restored"].append(os.path.basename(path))
        self.digest = open(os.path.join(path, "digest")).read()

    def weights_digest(self):
        return self.digest

    def runner_digests(self):
        digest = self.digest if self.calls["runner_digest"] is None else self.calls["runner_digest"]
        return [{"worker_index": 1, "digest": digest, "expected": self.digest, "matches": digest == self.digest}]

    def train(self, env_steps):
        budget = env_steps
        ctx = self.ctx
        self.calls["self_play"] += 1
        if self.calls.get("train_raises"):
            raise RuntimeError(self.calls["train_raises"])
        if self.calls.get("signal_at_call") == self.calls["self_play"]:    # the n-th self-play of a sweep, say
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        if self.calls.get("swallowed_at") == ctx.lap:          # the signal lands in a GC callback (as JAX's):
            def in_gc(phase, info):                             # Python reports its exception and drops it
                if phase == "start":
                    gc.callbacks.remove(in_gc)
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(2)

            gc.callbacks.append(in_gc)
            gc.collect()
        if self.calls["signal_at"] == ctx.lap:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)                                   # the handler raises before this ends
            except RunStopped:
                if self.calls.get("plain_interrupt"):           # as Ray's ray.get does with a handler's exception
                    raise KeyboardInterrupt() from None
                raise
        data = ctx.store.load(kind="seed")
        data = data.select(np.arange(len(data)))
        data.episode_ids = data.episode_ids + (ctx.lap + 1) * EPISODE_STRIDE
        data.source[:] = SOURCE_SIM
        data.success[:] = data.dones                          # every episode "succeeds"
        n = len(data)
        data.rewards = {"task": np.full(n, 0.5, np.float32), "imagination": np.full(n, 0.8, np.float32),
                        "physics": np.full(n, -0.1, np.float32), "total": np.full(n, 0.9, np.float32)}
        if self.calls.get("write_raw", True):
            data.save(ctx.store.raw_dir(ctx.lap) / "session-0.npz")
        self.calls["served"] = n
        steps = budget if self.calls["short_by"] is None else budget - self.calls["short_by"]
        self.digest = f"lap{ctx.lap}"
        return [{"iteration": 1, "env_steps_this_iter": steps, "episode_return_mean": 1.0}]

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "digest"), "w").write(self.digest)

    def policy(self):
        return FakePolicy()

    def stop(self):
        pass


@pytest.fixture
def fakes():
    """Fake servers, trainer and evaluation; the real world-model fit. ``calls`` steers and records them."""
    calls = {"self_play": 0, "evaluate": 0, "fail_at": None, "signal_at": None, "short_by": None, "stored": None,
             "runner_digest": None, "restored": [], "served": 0, "seed_bonus": 0.0}

    @contextlib.contextmanager
    def serve(ctx):
        served = Served(["127.0.0.1:1"])
        yield served
        n = calls["served"]
        served.report = {"served": n, "stored": n if calls["stored"] is None else calls["stored"], "shards": 1}

    def evaluate(ctx):
        calls["evaluate"] += 1
        if calls["fail_at"] == ctx.lap:
            raise Boom("reality went away")
        bonus = 0.1 * ctx.lap if ctx.cfg.retrain else 0.0           # retraining "helps" by a known amount
        if calls.get("no_value"):                                    # metrics without a value (no windows, no episodes)
            return {"capability/success_rate": np.float32("nan"), "capability/return": float("-inf"),
                    "world_model/one_step_error": 0.1}
        return {"capability/success_rate": 0.1 * ctx.lap + bonus + 0.01 * (ctx.cfg.seed % 7) + calls["seed_bonus"],
                "capability/return": 10.0 * ctx.lap,
                "world_model/one_step_error": 0.1, "world_model/open_loop_error": 0.2,
                "imagination/accuracy": 0.7, "physics/violation_rate": 0.05}

    calls["parts"] = LapParts(start=lambda cfg: None, serve=serve, trainer=lambda ctx, addresses: FakeTrainer(ctx, calls),
                              fit_world_model=fit_world_model, evaluate=evaluate)
    return calls


def make(tmp_path, fakes, *overrides, run="run"):
    cfg = load_config([*TINY, f"runs_root={tmp_path}", *overrides])
    return Orchestrator.create(cfg, tmp_path / run, say=lambda m: None, parts=fakes["parts"])


def status(orch):
    run = orch.tracker.client.get_run(orch.tracker.run_id)
    return run.info.status, run.data.tags


def test_a_failure_whose_error_file_cannot_be_written_still_fails_the_mlflow_run(tmp_path, fakes):
    fakes["fail_at"] = 0
    orch = make(tmp_path, fakes)
    (tmp_path / "run" / "error.txt").mkdir()                  # as a full or read-only disk would refuse the file
    lines = []
    orch.say = lines.append
    with pytest.raises(Exception, match="lap 0 evaluate failed: Boom: reality went away"):
        orch.run()
    state, tags = status(orch)
    assert state == "FAILED" and tags["flywheel.error"] == "lap 0 evaluate failed: Boom: reality went away"
    assert orch.failure_recorded and orch.error_file is None
    assert any(line.startswith(f"cannot write {tmp_path / 'run' / 'error.txt'}") for line in lines)


def test_failed_stage_marks_run_failed_with_its_error_and_resume_finishes_it_once(tmp_path, fakes):
    run_dir = tmp_path / "run"
    fakes["fail_at"] = 1
    orch = make(tmp_path, fakes)
    with pytest.raises(Exception, match="lap 1 evaluate failed: Boom: reality went away"):
        orch.run()
    run_id = orch.tracker.run_id
    state, tags = status(orch)
    assert state == "FAILED" and tags["flywheel.error"] == "lap 1 evaluate failed: Boom: reality went away"
    trace = orch.tracker.client.download_artifacts(run_id, "error/traceback.txt", str(tmp_path))
    assert "Boom: reality went away" in open(trace).read() and "Traceback" in open(trace).read()
    assert "reality went away" in (run_dir / "error.txt").read_text()
    lap1 = json.loads((run_dir / "laps/lap_001/metrics.json").read_text())
    assert lap1["stages"] == ["self_play", "select", "retrain"]        # evaluate failed after these
    fakes["fail_at"] = None

    with pytest.raises(ConfigError, match="simulator.fidelity"):
        Orchestrator.resume(run_dir, ["simulator.fidelity=0.0"])
    resumed = Orchestrator.resume(run_dir, say=lambda m: None, parts=fakes["parts"])
    rows = resumed.run()
    assert resumed.tracker.run_id == run_id
    assert resumed.tracker.client.get_run(run_id).info.status == "FINISHED"
    tags = resumed.tracker.client.get_run(run_id).data.tags           # the old failure is history, not the state
    assert "flywheel.error" not in tags and tags["flywheel.resumed_after"] == "lap 1 evaluate failed: Boom: reality went away"
    assert not (run_dir / "error.txt").exists()                        # a finished run holds no current error
    [kept] = run_dir.glob("error.*.txt")
    assert "reality went away" in kept.read_text()
    assert fakes["self_play"] == 3 and fakes["evaluate"] == 1 + 1 + 2   # lap 1's self-play was not redone
    assert fakes["restored"] == ["policy_lap000", "policy_lap001"]      # every lap starts from the last one
    carried = [json.loads((run_dir / f"laps/lap_{k:03d}/policy.json").read_text()) for k in range(3)]
    assert [c["start_digest"] for c in carried] == ["fresh", "lap0", "lap1"]
    assert [r["lap"] for r in rows] == [0, 1, 2]
    tracker = Tracker.attach(run_dir)
    for key in ("capability/success_rate", "data/selected_trajectories", "data/total_transitions", "lap/seconds",
                "reward/imagination", "time/self_play", "time/retrain", "self_play/env_steps",
                "data/stored_transitions", "exploitation/return_gap", "cost/steps_per_selected",
                "reality/transitions_total", "gap/sim_minus_reality_success"):
        assert [s for s, _ in tracker.metric_history(key)] == [0, 1, 2], key
    assert max(abs(v) for _, v in tracker.metric_history("exploitation/return_gap")) < 1e-3   # honest self-play
    entries = [(e.lap, e.kind) for e in resumed.store.entries()]
    assert entries == [(0, "seed"), (0, "selected"), (1, "selected"), (2, "selected")]
    seed = resumed.store.load(kind="seed")
    assert rows[-1]["data/total_transitions"] == 4 * len(seed)
    assert (run_dir / "report/capability.png").exists() and (run_dir / "checkpoints/wm_lap002.pt").exists()
    arts = {a.path for a in tracker.client.list_artifacts(run_id, "checkpoints/lap_002")}
    assert arts == {"checkpoints/lap_002/wm_lap002.pt", "checkpoints/lap_002/policy_lap002.pt"}


def test_resume_refuses_a_changed_shard_before_any_stage_runs(tmp_path, fakes):
    fakes["fail_at"] = 1
    orch = make(tmp_path, fakes)
    with pytest.raises(Exception, match="lap 1 evaluate failed"):
        orch.run()
    fakes["fail_at"] = None
    seed = tmp_path / "run" / "store" / "lap_000" / "seed.npz"
    data = bytearray(seed.read_bytes())
    data[len(data) // 2] ^= 0x01
    seed.write_bytes(bytes(data))
    before, files = dict(fakes), run_files(tmp_path / "run")
    with pytest.raises(ValueError, match=r"lap_000/seed.npz \(lap 0, seed\) has changed since it was written"):
        Orchestrator.resume(tmp_path / "run", ["laps=3"], say=lambda m: None, parts=fakes["parts"])
    assert fakes["self_play"] == before["self_play"] and fakes["evaluate"] == before["evaluate"]   # nothing ran
    assert {p: p.read_bytes() for p in files} == files      # config.yaml and state.json as they were
    state, tags = status(orch)                               # MLflow keeps the run's last real end
    assert state == "FAILED" and tags["flywheel.error"].startswith("lap 1 evaluate failed")
    assert "flywheel.params_changed" not in tags


def test_lap_records_are_strict_json_and_metrics_without_a_value_read_back_as_nan(tmp_path, fakes):
    fakes["no_value"] = True
    rows = make(tmp_path, fakes, "laps=2").run()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    for lap in (0, 1):
        text = (tmp_path / f"run/laps/lap_{lap:03d}/metrics.json").read_text()
        metrics = json.loads(text, parse_constant=refuse)["metrics"]     # any JSON parser reads it
        assert metrics["capability/success_rate"] is None and metrics["capability/return"] is None
        assert metrics["world_model/one_step_error"] == 0.1
    assert all(np.isnan(r["capability/success_rate"]) and np.isnan(r["capability/return"]) for r in rows)
    resumed = Orchestrator.resume(tmp_path / "run", say=lambda m: None, parts=fakes["parts"], overrides=["laps=3"])
    assert np.isnan(resumed.run()[0]["capability/success_rate"])


def test_a_sigterm_whose_exception_python_dropped_stops_the_run_after_that_stage(tmp_path, fakes):
    fakes["swallowed_at"] = 0
    orch = make(tmp_path, fakes)
    with pytest.raises(RunStopped, match="SIGTERM"):
        orch.run()
    assert status(orch)[0] == "KILLED" and status(orch)[1]["flywheel.stopped"] == "stopped by SIGTERM"
    record = json.loads((tmp_path / "run/laps/lap_000/metrics.json").read_text())
    assert record["stages"] == ["seed", "self_play"]           # the stage it came in finished and was kept
    fakes["swallowed_at"] = None
    resumed = Orchestrator.resume(tmp_path / "run", say=lambda m: None, parts=fakes["parts"])
    assert [r["lap"] for r in resumed.run()] == [0, 1, 2] and fakes["self_play"] == 3


def test_sigterm_turned_into_a_plain_interrupt_by_a_library_is_still_named_sigterm(tmp_path, fakes):
    fakes["signal_at"], fakes["plain_interrupt"] = 0, True
    orch = make(tmp_path, fakes)
    with pytest.raises(RunStopped, match="SIGTERM") as stopped:
        orch.run()
    assert stopped.value.signum == signal.SIGTERM
    state, tags = status(orch)
    assert state == "KILLED" and tags["flywheel.stopped"] == "stopped by SIGTERM"


def test_sigterm_mid_lap_ends_the_run_killed_and_resume_redoes_only_that_stage(tmp_path, fakes):
    fakes["signal_at"] = 1
    orch = make(tmp_path, fakes)
    with pytest.raises(RunStopped, match="SIGTERM"):
        orch.run()
    state, tags = status(orch)
    assert state == "KILLED" and tags["flywheel.stopped"] == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not None and not (tmp_path / "run" / "error.txt").exists()
    assert not (tmp_path / "run/laps/lap_001/metrics.json").exists()      # no stage of lap 1 finished
    fakes["signal_at"] = None
    resumed = Orchestrator.resume(tmp_path / "run", say=lambda m: None, parts=fakes["parts"])
    assert [r["lap"] for r in resumed.run()] == [0, 1, 2]
    assert status(resumed)[0] == "FINISHED"


@pytest.mark.parametrize("fault, message", [
    ("short_by", r"lap 0 self_play failed: LapFailed: self-play sampled \d+ of its \d+ env steps"),
    ("stored", r"lap 0 self_play failed: LapFailed: self-play sampled \d+ env steps but the servers stored none"),
    ("runner_digest", r"lap 0 self_play failed: LapFailed: EnvRunner weights \['stale'\] differ from the learner's"),
])
def test_self_play_that_cannot_be_trusted_fails_the_lap(tmp_path, fakes, fault, message):
    fakes[fault] = {"short_by": 1, "stored": 0, "runner_digest": "stale"}[fault]
    if fault == "stored":
        fakes["write_raw"] = False
    orch = make(tmp_path, fakes)
    with pytest.raises(Exception, match=message):
        orch.run()
    state, tags = status(orch)
    assert state == "FAILED" and "self_play failed" in tags["flywheel.error"]
    assert orch.tracker.metric_history("self_play/env_steps") == []       # the lap is never logged


def test_a_missing_previous_policy_is_an_error_not_a_fresh_start(tmp_path, fakes):
    fakes["fail_at"] = 1
    orch = make(tmp_path, fakes)
    with pytest.raises(Exception, match="Boom"):
        orch.run()
    for name in ("policy_lap001", "policy_lap000"):
        for p in (tmp_path / "run/checkpoints" / name).iterdir():
            p.unlink()
        (tmp_path / "run/checkpoints" / name).rmdir()
    fakes["fail_at"] = None
    resumed = Orchestrator.resume(tmp_path / "run", ["laps=3"], say=lambda m: None, parts=fakes["parts"])
    with pytest.raises(Exception, match=r"lap 2 self_play failed: .*policy_lap001 is missing"):
        resumed.run()
    assert status(resumed)[0] == "FAILED"


def test_unreachable_tracking_server_fails_fast_before_a_run_directory_exists(tmp_path, fakes):
    with socket.socket() as s:                     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"tracking server http://127.0.0.1:{port} is unreachable"):
        make(tmp_path, fakes, f"tracking.uri=http://127.0.0.1:{port}")
    assert not (tmp_path / "run").exists()


def test_new_run_refuses_an_existing_run_dir_and_more_laps_resume(tmp_path, fakes):
    orch = make(tmp_path, fakes, "laps=1")
    orch.run()
    with pytest.raises(ConfigError, match="--resume"):
        Orchestrator.create(load_config([*TINY, f"runs_root={tmp_path}"]), tmp_path / "run")
    more = Orchestrator.resume(tmp_path / "run", ["laps=2"], say=lambda m: None, parts=fakes["parts"])
    assert [r["lap"] for r in more.run()] == [0, 1]
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"laps=1 is fewer than the 2 laps .* allowed: laps >= 2"):
        Orchestrator.resume(tmp_path / "run", ["laps=1"], parts=fakes["parts"])
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before      # refused: nothing rewritten
    forced = Orchestrator.resume(tmp_path / "run", ["selection.require_success=false"], force=True,
                                 parts=fakes["parts"])
    assert forced.cfg.selection.require_success is False


def test_sweep_has_a_parent_run_children_and_a_row_per_setting(tmp_path, fakes):
    from flywheel import sweep as sweeps

    lines = []
    sweep_dir = sweeps.run_sweep([*TINY, "laps=2", f"runs_root={tmp_path}"], sweeps.parse_grid(["simulator.fidelity=0,1"]),
                                 seeds=1, sweep_dir=tmp_path / "sweep", say=lines.append, parts=fakes["parts"])
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
    assert "simulator.fidelity=0 [dream]" in table[3]
    assert "[dream]: PPO trained purely in the world model (fidelity 0)" in (sweep_dir / "report" / "sweep_table.txt").read_text()
    with pytest.raises(ConfigError, match="simulator.fidelity"):
        sweeps.run_sweep([*TINY, f"runs_root={tmp_path}"], sweeps.parse_grid(["simulator.fidelity=0,3"]), 1,
                         tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_sweep_stopped_in_its_second_run_is_marked_killed_and_continues_with_its_directory(tmp_path, fakes):
    from flywheel import sweep as sweeps

    fakes["signal_at_call"], opened = 2, []
    args = ([*TINY, "laps=1", f"runs_root={tmp_path}"], sweeps.parse_grid(["simulator.fidelity=1"]), "5,9", tmp_path / "sw")
    with pytest.raises(RunStopped, match="SIGTERM"):
        sweeps.run_sweep(*args, say=lambda m: None, parts=fakes["parts"], opened=opened.append)
    assert opened == [tmp_path / "sw"]
    parent = Tracker.attach(tmp_path / "sw")
    run = parent.client.get_run(parent.run_id)
    assert run.info.status == "KILLED" and run.data.tags["flywheel.stopped"] == "stopped by SIGTERM"
    fakes["signal_at_call"] = None
    sweeps.run_sweep(*args, say=lambda m: None, parts=fakes["parts"])
    run = parent.client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["flywheel.resumed_after"] == "stopped by SIGTERM"
    children = parent.client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted((c.data.params["seed"], c.info.status) for c in children) == [("5", "FINISHED"), ("9", "FINISHED")]
    assert fakes["self_play"] == 3                                # seed 9's self-play again, seed 5 not
    fakes["fail_at"] = 0                                          # a failing run fails the sweep, naming it
    with pytest.raises(StageError, match="reality went away"):
        sweeps.run_sweep(*args[:3], tmp_path / "failed", say=lambda m: None, parts=fakes["parts"])
    failed = Tracker.attach(tmp_path / "failed")
    run = failed.client.get_run(failed.run_id)
    assert run.info.status == "FAILED" and run.data.tags["flywheel.error"].startswith("run 1/2 (simulator.fidelity_1-seed5): ")


def test_sweep_seeds_are_the_users_own(tmp_path, fakes):
    import json as _json

    from flywheel import sweep as sweeps

    assert sweeps.parse_seeds("3") == 3 and sweeps.parse_seeds("1000,2000") == [1000, 2000]
    assert sweeps.parse_seeds([7, 9]) == [7, 9]
    for bad in ("0", "a,b", "5,5", "-1,2"):
        with pytest.raises(ConfigError, match="--seeds"):
            sweeps.parse_seeds(bad)
    with pytest.raises(ConfigError, match=r"--seeds '31337' is a count of seeds .*one seed: seed=31337"):
        sweeps.parse_seeds("31337")                              # one seed without its comma: 31,337 runs
    assert sweeps.parse_seeds("1000") == 1000 and sweeps.parse_seeds("31337,") == [31337]
    with pytest.raises(ConfigError, match=r"--grid setting simulator.fidelity=2: .*'simulator.fidelity'"):
        sweeps.plan_children([*TINY], sweeps.parse_grid(["simulator.fidelity=0.5,2"]), 1)
    with pytest.raises(ConfigError, match="grid key simulator.fidelity repeats the value.s. 0; allowed: distinct"):
        sweeps.parse_grid(["simulator.fidelity=0,0.5,0"])
    with pytest.raises(ConfigError, match="'seed' is a --grid axis and --seeds is given too"):
        sweeps.run_sweep([*TINY, f"runs_root={tmp_path}"], sweeps.parse_grid(["seed=1,2"]), 2, tmp_path / "both")
    sweep_dir = sweeps.run_sweep([*TINY, "laps=1", f"runs_root={tmp_path}"], sweeps.parse_grid(["seed=1000,2000"]),
                                 seeds=1, sweep_dir=tmp_path / "grid", say=lambda m: None, parts=fakes["parts"])
    children = _json.loads((sweep_dir / "sweep.json").read_text())["children"]
    assert [(c["seed"], c["dir"]) for c in children] == [(1000, "base-seed1000"), (2000, "base-seed2000")]
    assert [load_config(base=sweep_dir / c["dir"] / "config.yaml").seed for c in children] == [1000, 2000]
    listed = sweeps.run_sweep([*TINY, "laps=1", f"runs_root={tmp_path}"], sweeps.parse_grid(["simulator.fidelity=1"]),
                              seeds="5,9", sweep_dir=tmp_path / "list", say=lambda m: None, parts=fakes["parts"])
    children = _json.loads((listed / "sweep.json").read_text())["children"]
    assert [c["dir"] for c in children] == ["simulator.fidelity_1-seed5", "simulator.fidelity_1-seed9"]


def test_sweep_ablations_report_compounding_with_intervals(tmp_path, fakes):
    from flywheel import sweep as sweeps

    overrides = [*TINY, "laps=2", f"runs_root={tmp_path}", "reality.params.gain_scale=0.7"]
    sweep_dir = sweeps.run_sweep(overrides, sweeps.parse_grid(["simulator.fidelity=1"]), seeds="3,4,5",
                                 sweep_dir=tmp_path / "abl", say=lambda m: None, parts=fakes["parts"], ablations=True)
    children = json.loads((sweep_dir / "sweep.json").read_text())["children"]
    assert [(c["setting"], c["variant"]) for c in children[::3]] == [
        ("simulator.fidelity=1", "flywheel"), ("simulator.fidelity=1 | no retrain", "no_retrain"),
        ("PPO in reality", "ppo_in_reality")]
    real = load_config(base=sweep_dir / children[-1]["dir"] / "config.yaml")
    assert real.simulator.fidelity == 1 and real.retrain is False and real.engine.params.gain_scale == 0.7
    assert load_config(base=sweep_dir / children[3]["dir"] / "config.yaml").retrain is False
    text = (sweep_dir / "report" / "sweep_table.txt").read_text()
    assert "compounding: success gain since lap 0 with world-model retraining minus without" in text
    assert "simulator.fidelity=1: lap 1: +0.1 [+0.1, +0.1] *" in text        # the fakes' known +0.1
    assert ("lap 1, capability/success_rate: simulator.fidelity=1 is higher by 0.1 (95% CI of simulator.fidelity=1 "
            "- simulator.fidelity=1 | no retrain: [0.1, 0.1], 3 seeds): significant at 95%.") in text
    assert "mean [95% bootstrap CI] over seeds [3, 4, 5]" in text
    parent = Tracker.attach(sweep_dir)
    assert [s for s, _ in parent.metric_history("sweep/simulator.fidelity_1/compounding")] == [1]


def test_a_run_from_before_a_config_key_existed_resumes_and_an_edited_one_does_not(tmp_path, fakes):
    import hashlib

    from flywheel.config import _HASH_EXCLUDED, to_container

    orch = make(tmp_path, fakes, "laps=1")
    orch.run()
    run, lines = tmp_path / "run", []
    # the run as an older Flywheel wrote it: no world_model.base in its config file nor in its fingerprint
    text = (run / "config.yaml").read_text()
    assert "  base: none\n" in text
    (run / "config.yaml").write_text(text.replace("  base: none\n", "", 1))
    old = to_container(orch.cfg)
    del old["world_model"]["base"]
    old = {k: v for k, v in old.items() if k not in _HASH_EXCLUDED}
    state = json.loads((run / "state.json").read_text())
    state["config_hash"] = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
    (run / "state.json").write_text(json.dumps(state))
    more = Orchestrator.resume(run, ["laps=2"], say=lines.append, parts=fakes["parts"])
    assert any("added since the run started take their defaults: world_model.base" in m for m in lines)
    assert [r["lap"] for r in more.run()] == [0, 1]
    # a value edited in the file is still refused, naming nothing it cannot know
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("  base: none\n", "", 1)
                                     .replace("require_success: true", "require_success: false"))
    with pytest.raises(ConfigError, match="edited after the run started"):
        Orchestrator.resume(run, ["laps=3"], say=lines.append, parts=fakes["parts"])


def test_a_refused_resume_leaves_the_run_directory_as_it_was(tmp_path, fakes):
    make(tmp_path, fakes, "laps=1").run()
    run_dir = tmp_path / "run"
    files = [run_dir / name for name in ("config.yaml", "state.json", "tracking.json")]
    before = [f.read_bytes() for f in files]
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(ConfigError, match=r"is tracked at sqlite:///.*/mlflow\.db, not sqlite:///.*/other\.db; resume "
                                          r"with the same tracking\.uri"):
        Orchestrator.resume(run_dir, [f"tracking.uri={other}", "laps=2"], say=lambda m: None, parts=fakes["parts"])
    assert [f.read_bytes() for f in files] == before and not (tmp_path / "other.db").exists()
    resumed = Orchestrator.resume(run_dir, ["laps=2"], say=lambda m: None, parts=fakes["parts"])
    assert [r["lap"] for r in resumed.run()] == [0, 1]


@pytest.mark.parametrize("name", ["state.json", "tracking.json", "laps/lap_000/metrics.json"])
def test_a_damaged_run_file_is_named_when_the_run_is_resumed(tmp_path, fakes, name):
    make(tmp_path, fakes, "laps=1").run()
    path = tmp_path / "run" / name
    path.write_bytes(path.read_bytes()[:5])
    expected = rf"{path} cannot be read \(JSONDecodeError: "
    if name == "laps/lap_000/metrics.json":                 # the run directory is fine; lap 0's record is not
        with pytest.raises(ValueError, match=rf"lap 0's record {expected}"):
            Orchestrator.resume(tmp_path / "run", ["laps=2"], say=lambda m: None, parts=fakes["parts"])
    else:
        with pytest.raises(ConfigError, match=expected):
            Orchestrator.resume(tmp_path / "run", ["laps=2"], say=lambda m: None, parts=fakes["parts"])


def test_a_corrupt_world_model_is_named_before_any_server_starts(tmp_path, monkeypatch):
    from flywheel import parts
    from flywheel.lap import LapContext
    from flywheel.store import TrajectoryStore

    monkeypatch.setattr(parts, "init_ray", lambda cfg: pytest.fail("Ray was started before the checkpoint was checked"))

    cfg = load_config([*TINY, f"runs_root={tmp_path}"])
    ctx = LapContext(cfg, tmp_path, TrajectoryStore(tmp_path / "store"), 1, say=lambda m: None)
    path = ctx.wm_path(0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"{path} is not a world-model checkpoint \(bad header\)"):
        with parts.ray_servers(ctx):
            pass


def test_reality_spent_counts_the_seed_transitions_collected_not_the_ones_asked_for(tmp_path, fakes):
    make(tmp_path, fakes, "laps=1", "reality.seed_steps=450").run()    # whole episodes: more than asked
    lap0 = json.loads((tmp_path / "run/laps/lap_000/metrics.json").read_text())["metrics"]
    assert lap0["data/seed_transitions"] > 450
    assert lap0["reality/transitions_total"] == lap0["data/seed_transitions"] + lap0.get("data/reality_transitions", 0)


def test_a_lost_store_manifest_stops_the_resumed_run_before_any_stage(tmp_path, fakes):
    fakes["fail_at"] = 1
    with pytest.raises(Exception, match="lap 1 evaluate failed"):
        make(tmp_path, fakes).run()
    fakes["fail_at"] = None
    (tmp_path / "run" / "store" / "manifest.json").unlink()
    before = dict(fakes)
    with pytest.raises(ValueError, match=r"lap 0's seed shard is not in the manifest .*/store/manifest.json although "
                                         r"lap 0's seed stage finished .*lap 1's select stage stored episodes"):
        Orchestrator.resume(tmp_path / "run", say=lambda m: None, parts=fakes["parts"])
    assert fakes["self_play"] == before["self_play"] and fakes["evaluate"] == before["evaluate"]


def test_a_hole_in_the_lap_history_is_refused_and_a_lap_run_again_replaces_its_mlflow_values(tmp_path, fakes):
    orch = make(tmp_path, fakes, "laps=3")
    orch.run()
    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir / "laps" / "lap_001")
    with pytest.raises(ConfigError, match=r"lap 1's record laps/lap_001/metrics.json is missing while lap 2's exists"):
        Orchestrator.resume(run_dir, say=lambda m: None, parts=fakes["parts"])
    shutil.rmtree(run_dir / "laps" / "lap_002")              # the last lap lost: it runs again
    fakes["seed_bonus"] = 0.5
    lines = []
    resumed = Orchestrator.resume(run_dir, say=lines.append, parts=fakes["parts"])
    assert resumed.run()
    assert any("log:" in x and "over other values an earlier attempt logged" in x for x in lines), lines
    history = dict(resumed.tracker.metric_history("capability/success_rate"))
    assert history[2] == pytest.approx(json.loads((run_dir / "laps/lap_002/metrics.json").read_text())
                                       ["metrics"]["capability/success_rate"])


def test_a_self_play_failure_says_how_far_the_lap_had_sampled(tmp_path, fakes):
    fakes["train_raises"] = "every EnvRunner is dead for good"
    orch = make(tmp_path, fakes, "laps=1")
    budget = orch.cfg.self_play.iterations * orch.cfg.ppo.train_batch_size
    with pytest.raises(StageError, match=rf"lap 0 self_play failed: RuntimeError: every EnvRunner is dead for good "
                                         rf"\(the lap had sampled 0 of its {budget} env steps"):
        orch.run()
    assert status(orch)[1]["flywheel.error"].endswith("(self_play.iterations x ppo.train_batch_size))")
    fakes["train_raises"], lines = None, []
    Orchestrator.resume(tmp_path / "run", say=lines.append, parts=fakes["parts"]).run()
    assert "resume: lap 0 continues after seed" in lines
    lines.clear()
    Orchestrator.resume(tmp_path / "run", ["laps=3"], say=lines.append, parts=fakes["parts"]).run()
    assert "resume: lap 1 (2 of 3) starts" in lines


def test_a_driver_killed_while_its_mlflow_run_is_made_is_resumed_into_that_run(tmp_path, fakes, monkeypatch):
    from flywheel import tracking

    cfg = load_config([*TINY, f"runs_root={tmp_path}", "laps=1"])
    orch = Orchestrator.create(cfg, tmp_path / "run", say=lambda m: None, parts=fakes["parts"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt                              # as if the driver died logging the params
    monkeypatch.setattr(tracking.Tracker, "log_params", killed)
    with pytest.raises(KeyboardInterrupt):
        orch.run()
    monkeypatch.undo()
    resumed = Orchestrator.resume(tmp_path / "run", say=lambda m: None, parts=fakes["parts"])
    resumed.run()
    runs = resumed.tracker.client.search_runs([resumed.tracker.client.get_run(resumed.tracker.run_id).info.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"          # no orphan RUNNING run beside it
    assert runs[0].data.params["simulator.fidelity"] == str(cfg.simulator.fidelity)   # the params it missed
    assert runs[0].data.tags["flywheel.resumed_after"].startswith("its driver ended without marking the run")


HOLD = """import fcntl, sys, time
f = open(sys.argv[1], "a+"); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write("pid 4242 on elsewhere: flywheel run"); f.flush()
print("held", flush=True); time.sleep(600)"""


def test_one_driver_per_run_directory_while_it_lives(tmp_path, fakes):
    orch = make(tmp_path, fakes, "laps=1")
    orch.run()
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir / "driver.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"    # another driver holds it (the lock ``run`` held is free)
        state = (run_dir / "state.json").read_bytes()
        with pytest.raises(ConfigError, match=r"is in use by another flywheel process \(pid 4242 on elsewhere: "
                                              r"flywheel run\); wait for it to end"):
            Orchestrator.resume(run_dir, say=lambda m: None, parts=fakes["parts"], overrides=["laps=2"])
        assert (run_dir / "state.json").read_bytes() == state
        sweep_dir = tmp_path / "sweep"
        sweep_dir.mkdir()
        holder2 = subprocess.Popen([sys.executable, "-c", HOLD, str(sweep_dir / "driver.lock")], stdout=subprocess.PIPE,
                                   text=True)
        try:
            assert holder2.stdout.readline().strip() == "held"
            from flywheel import sweep as sweeps
            with pytest.raises(ConfigError, match="is in use by another flywheel process"):
                sweeps.run_sweep([*TINY, "laps=1", f"runs_root={tmp_path}"], sweeps.parse_grid(["seed=1,2"]), 1, sweep_dir,
                                 say=lambda m: None, parts=fakes["parts"])
        finally:
            holder2.kill()
    finally:
        holder.kill()                                          # SIGKILL: the OS frees its lock
        holder.wait()
    resumed = Orchestrator.resume(run_dir, say=lambda m: None, parts=fakes["parts"], overrides=["laps=2"])
    assert [r["lap"] for r in resumed.run()] == [0, 1]


def test_a_damaged_mlflow_store_is_named_before_the_run_directory_is_touched(tmp_path, fakes):
    make(tmp_path, fakes, "laps=1").run()
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    files = run_files(run_dir)
    db.write_bytes(db.read_bytes()[:50000])
    with pytest.raises(ConfigError, match=rf"the MLflow tracking store {db} is damaged \(SQLite: .*restore it"):
        Orchestrator.resume(run_dir, ["laps=2"], say=lambda m: None, parts=fakes["parts"])
    assert {p: p.read_bytes() for p in files} == files


def test_a_budget_under_one_episode_per_env_is_said_and_tagged(tmp_path, fakes):
    said = []
    cfg = load_config([*TINY, f"runs_root={tmp_path}", "laps=1", "simulator.num_envs=64"])
    orch = Orchestrator.create(cfg, tmp_path / "run", say=said.append, parts=fakes["parts"])
    orch.run()
    warning = [m for m in said if m.startswith("WARNING self-play samples")]
    assert len(warning) == 1 and "under one pendulum episode (100 steps)" in warning[0]
    assert status(orch)[1]["flywheel.warnings"] == warning[0].removeprefix("WARNING ")


def test_a_run_folder_that_cannot_be_written_is_named_before_a_lap_runs(tmp_path, fakes):
    make(tmp_path, fakes, "laps=1").run()
    checkpoints = tmp_path / "run" / "checkpoints"
    subprocess.run(["chattr", "+i", str(checkpoints)], check=True)          # read-only even for root
    try:
        before = dict(fakes)
        with pytest.raises(ConfigError, match=rf"{checkpoints} cannot be written \(Operation not permitted\)"):
            Orchestrator.resume(tmp_path / "run", ["laps=2"], say=lambda m: None, parts=fakes["parts"])
        assert fakes["self_play"] == before["self_play"]
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], check=True)


def test_a_copied_run_directory_cannot_continue_the_originals_mlflow_run_and_a_moved_one_does(tmp_path, fakes):
    make(tmp_path, fakes, "laps=1").run()
    run_dir, copy, moved = tmp_path / "run", tmp_path / "run-copy", tmp_path / "run-moved"
    shutil.copytree(run_dir, copy)
    with pytest.raises(ConfigError, match=rf"{copy} is a copy of the run directory {run_dir}, whose MLflow run"):
        Orchestrator.resume(copy, ["laps=2"], say=lambda m: None, parts=fakes["parts"])
    shutil.rmtree(copy)
    run_dir.rename(moved)
    resumed = Orchestrator.resume(moved, ["laps=2"], say=lambda m: None, parts=fakes["parts"])
    assert [r["lap"] for r in resumed.run()] == [0, 1]
    state, tags = status(resumed)
    assert state == "FINISHED" and tags["flywheel.run_dir"] == str(moved) and tags["flywheel.moved_from"] == str(run_dir)
