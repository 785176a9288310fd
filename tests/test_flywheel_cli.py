"""``flywheel serve``: a standalone simulator server started by the CLI, reached by a real client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from services.client import ResourceExhausted, SimulatorClient


def test_flywheel_serve_prints_its_address_serves_and_stops_on_sigterm():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "serve", "--task", "pendulum", "--engine", "mujoco",
                             "--port", "0", "service.max_sessions=1", "rewards.weights.physics=0.25",
                             "simulator.horizon=3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while not line.startswith("serving "):
            line = proc.stdout.readline()
            assert line, "the server exited before printing its address"
        address = line.split()[-1]
        assert address.startswith("127.0.0.1:")
        with SimulatorClient(address) as client:
            assert client.health() == "SERVING"
            session = client.create_session("pendulum", 2, fidelity=1.0)
            assert session.info.reward_weights["physics"] == 0.25 and session.info.horizon == 3
            session.reset(seed=0)
            reply = session.step(np.zeros((2, 1), np.float32))
            assert reply.observations.shape == (2, 3)
            with pytest.raises(ResourceExhausted, match="maximum of 1 sessions"):   # service.max_sessions=1
                client.create_session("pendulum", 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "service.port must be in [0, 65535], got 99999"),
    (["--task", "nope"], "config key 'task' is 'nope'; allowed:"),
    (["--param", "mass_scale=abc"], "engine.params.mass_scale"),
    (["--param", "speed=2"], "unknown config key 'engine.params.speed'"),
    (["--engine", "nope"], "config key 'engine.name' is 'nope'; allowed:"),
    (["--world-model", "/nonexistent/wm.pt"], "no world-model file at /nonexistent/wm.pt"),
    (["service.max_sessions=0"], "service.max_sessions must be >= 1"),
    (["ppo.lr=0.1"], "config key 'ppo.lr' does not configure a simulator server"),
    (["--host", "0.0.0.0"], "listens beyond loopback, so the server needs a token"),
    (["service.token_file=/nonexistent/token"], "cannot read the token file /nonexistent/token"),
    (["--host", "[::1"], "service.host must be a host name or address"),
])
def test_flywheel_serve_bad_input_exits_2_with_one_line_before_binding(args, message, capsys, monkeypatch):
    from flywheel.cli import main

    for key in ("FLYWHEEL_TOKEN", "FLYWHEEL_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    assert main(["serve", "--engine", "mujoco", *args] if "--engine" not in args else ["serve", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("flywheel serve: error: ") and message in err[0], err


def test_flywheel_serve_refuses_a_world_model_no_session_could_use(tmp_path, capsys):
    from flywheel.cli import main
    from simulators import make_engine
    from simulators.world_model import WorldModel, WorldModelConfig

    spec = make_engine("mujoco", "cartpole").spec
    wm = WorldModel("cartpole", spec.state_size, spec.action_size, WorldModelConfig(ensemble_size=1, hidden_size=8,
                                                                                     num_layers=1))
    wm.save(tmp_path / "cartpole.pt")
    assert main(["serve", "--engine", "mujoco", "--task", "pendulum", "--world-model", str(tmp_path / "cartpole.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"flywheel serve: error: world model {wm.version} is for task 'cartpole', not 'pendulum', the " \
                      "server's task: no session could use it; serve a pendulum model"



@pytest.mark.parametrize("args, message", [
    (["run", "--resume", "/tmp/a-run", "--run-dir", "/tmp/b"], "--run-dir names a new run's directory; --resume"),
    (["run", "tracking.uri=sqlite:////proc/none/mlflow.db"], "its directory /proc/none cannot be made"),
    (["run", "tracking.uri=sqlite://mlflow.db"], "is not a SQLite URI of a file: sqlite:///<path>"),
    (["config", "show", "simulator=3"], "config key 'simulator' (from command line) is a section"),
    (["run", "--run-dir", "/tmp/flywheel-never-made", "simulator=3"], "config key 'simulator' (from command line)"),
    (["sweep", "--grid", "seed=1,2", "--run-dir", "/tmp/flywheel-never-made", "simulator=3"],
     "config key 'simulator' (from command line) is a section"),
    (["run", "--resume", "/nonexistent/run"], "/nonexistent/run does not exist"),
    (["report", "/nonexistent/run"], "/nonexistent/run does not exist (a run directory holds state.json"),
])
def test_flywheel_run_bad_input_exits_2_with_one_line_before_anything_starts(args, message, tmp_path, capsys):
    from flywheel.cli import main

    assert main([*args, f"runs_root={tmp_path}"] if args[0] == "run" and "--resume" not in args else args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []                    # no run directory, no store


def test_resuming_a_sweep_directory_points_at_sweep_run_dir(tmp_path, capsys):
    from flywheel.cli import main

    (tmp_path / "sweep.json").write_text("{}")
    assert main(["run", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a sweep directory; continue a sweep with `flywheel sweep --run-dir {tmp_path}" in err


def test_a_stopped_sweep_says_it_was_marked_and_how_to_continue_it(tmp_path, capsys, monkeypatch):
    from flywheel import sweep as sweeps
    from flywheel.cli import main
    from flywheel.orchestrator import RunStopped

    def stopped(*args, opened, **kw):
        opened(tmp_path / "sw")
        raise RunStopped(signal.SIGINT)

    monkeypatch.setattr(sweeps, "run_sweep", stopped)
    assert main(["sweep", "--grid", "seed=1,2", "--run-dir", str(tmp_path / "sw"), "laps=1"]) == 130
    [line] = capsys.readouterr().err.splitlines()
    assert line == ("flywheel: stopped by SIGINT; the sweep's MLflow run (and the child it was running) is marked "
                    f"KILLED; continue it with: flywheel sweep --grid seed=1,2 laps=1 --run-dir {tmp_path / 'sw'}")


def test_a_run_stopped_before_its_mlflow_run_existed_does_not_claim_it_was_marked(tmp_path, capsys):
    import argparse
    import signal

    from flywheel.cli import _stopped

    assert _stopped(argparse.Namespace(run_dir_used=str(tmp_path)), signal.SIGINT) == 130
    assert "stopped by SIGINT; no MLflow run was made yet; continue it with" in capsys.readouterr().err
    (tmp_path / "tracking.json").write_text("{}")
    assert _stopped(argparse.Namespace(run_dir_used=str(tmp_path)), signal.SIGTERM) == 143
    assert "stopped by SIGTERM; the run is marked KILLED" in capsys.readouterr().err
