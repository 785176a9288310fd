"""Faults injected into real runs of the ``flywheel`` command (MuJoCo engine, Ray server actors, RLlib, MLflow).

Each test asserts what a user sees: the exit code and the last line, the MLflow status and error
tag, and that no data was lost or counted twice.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from flywheel.config import load_config
from flywheel.store import TrajectoryStore
from flywheel.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["preset=smoke", "engine.name=mujoco", "reality.engine=mujoco", "reality.seed_steps=400"]

pytestmark = pytest.mark.slow


class Run:
    """A ``flywheel`` command in its own process group, its output read line by line."""

    def __init__(self, *args: str):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "flywheel", *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []

    def wait_for(self, text: str, timeout: float = 420) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if text in line:
                return line
        raise AssertionError(f"{text!r} never appeared:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float = 600) -> tuple[int, list[str]]:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines += out.splitlines()
        return self.proc.returncode, self.lines


def server_pid(address: str) -> int:
    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise AssertionError(f"no process listens on {address}")


def mlflow_run(run_dir: Path):
    tracker = Tracker.attach(run_dir)
    return tracker, tracker.client.get_run(tracker.run_id)


def test_unreachable_tracking_server_is_one_line_within_seconds(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    code, lines = Run("run", *SMOKE, f"tracking.uri=http://127.0.0.1:{port}", "--run-dir", str(tmp_path / "r")).finish()
    assert code == 2 and time.time() - t0 < 60
    assert lines == [f"flywheel: error: tracking server http://127.0.0.1:{port} is unreachable (Connection refused); "
                     f"start it or set tracking.uri (null = the local SQLite store)"]
    assert not (tmp_path / "r").exists()


def test_sigterm_ends_the_run_killed_with_ray_shut_down(tmp_path):
    run_dir = tmp_path / "run"
    run = Run("run", *SMOKE, "laps=1", f"runs_root={tmp_path}", "--run-dir", str(run_dir))
    run.wait_for("| serve:")
    os.kill(run.proc.pid, signal.SIGTERM)                  # as `kill PID` does: the CLI alone
    time.sleep(0.3)
    os.kill(run.proc.pid, signal.SIGTERM)                  # and again, impatient: the status stays 128 + 15
    code, lines = run.finish(timeout=180)
    assert code == 128 + signal.SIGTERM, "\n".join(lines[-30:])
    assert lines[-1] == f"flywheel: stopped by SIGTERM; the run is marked KILLED; continue it with: " \
                        f"flywheel run --resume {run_dir}"
    assert not any("Aborted" in x or "SIGABRT" in x for x in lines)
    tracker, mrun = mlflow_run(run_dir)
    assert mrun.info.status == "KILLED" and mrun.data.tags["flywheel.stopped"] == "stopped by SIGTERM"
    time.sleep(5)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == [], "processes of the stopped run are still alive"


def test_a_store_that_cannot_be_written_fails_the_lap_naming_the_path(tmp_path):
    run_dir = tmp_path / "run"
    run = Run("run", *SMOKE, "laps=1", f"runs_root={tmp_path}", "--run-dir", str(run_dir))
    run.wait_for("| serve:")
    raw = run_dir / "store" / "lap_000" / "raw"
    subprocess.run(["chattr", "+i", str(raw)], check=True)          # read-only even for root
    try:
        code, lines = run.finish()
    finally:
        subprocess.run(["chattr", "-i", str(raw)], check=True)
    assert code == 1, "\n".join(lines[-30:])
    assert lines[-1].startswith("flywheel: error: lap 0 self_play failed: RecordingError: ") and str(raw) in lines[-1]
    assert "Operation not permitted" in lines[-1]
    tracker, mrun = mlflow_run(run_dir)
    assert mrun.info.status == "FAILED" and str(raw) in mrun.data.tags["flywheel.error"]
    assert tracker.metric_history("self_play/env_steps") == []


def test_a_lap_whose_every_server_is_gone_for_good_fails_at_once_naming_them(tmp_path):
    """One server, no restarts allowed, SIGKILLed while the runner samples: the runner's client would retry for a
    minute; the lap's server watch stops sampling and fails self-play naming the server and the key."""
    run_dir = tmp_path / "run"
    run = Run("run", *SMOKE, "laps=1", "self_play.iterations=50", "service.max_restarts=0", f"runs_root={tmp_path}",
              "--run-dir", str(run_dir))
    address = run.wait_for("| serve:").rsplit(" ", 1)[-1].strip()
    run.wait_for("| placement:")
    os.kill(server_pid(address), signal.SIGKILL)
    code, lines = run.finish()
    assert code == 1, "\n".join(lines[-30:])
    assert lines[-1].startswith("flywheel: error: lap 0 self_play failed: SelfPlayError: every simulator server is "
                                f"gone for good ({address}: died after 0 restart(s), service.max_restarts)"), lines[-1]
    assert "sampling stopped, 1 EnvRunner(s) killed" in lines[-1]
    assert not any("self_play: iteration 50," in x for x in lines)
    tracker, mrun = mlflow_run(run_dir)
    assert mrun.info.status == "FAILED" and address in mrun.data.tags["flywheel.error"]


def test_corrupt_policy_checkpoint_is_refused_then_a_killed_server_is_survived(tmp_path):
    run_dir = tmp_path / "run"
    code, lines = Run("run", *SMOKE, "laps=1", f"runs_root={tmp_path}", "--run-dir", str(run_dir)).finish()
    assert code == 0, "\n".join(lines[-30:])

    # 8 flipped bytes in the trainer checkpoint lap 1 must start from: refused, naming the file
    ckpt = run_dir / "checkpoints" / "policy_lap000"
    victim = max((p for p in ckpt.rglob("*") if p.is_file() and p.name != "flywheel_policy.json"),
                 key=lambda p: p.stat().st_size)
    original = victim.read_bytes()
    flipped = bytearray(original)
    for i in range(8):
        flipped[len(flipped) // 2 + i] ^= 0xFF
    victim.write_bytes(bytes(flipped))
    code, lines = Run("run", "--resume", str(run_dir), "laps=2").finish()
    assert code == 1 and lines[-1].startswith("flywheel: error: lap 1 self_play failed: ")
    assert victim.name in lines[-1], lines[-1]
    tracker, mrun = mlflow_run(run_dir)
    assert mrun.info.status == "FAILED" and victim.name in mrun.data.tags["flywheel.error"]

    # the file mended, lap 1 runs; its simulator server is SIGKILLed mid self-play and comes back
    victim.write_bytes(original)
    run = Run("run", "--resume", str(run_dir), "laps=2")
    address = run.wait_for("| serve:").rsplit(" ", 1)[-1]
    time.sleep(3)
    os.kill(server_pid(address), signal.SIGKILL)
    code, lines = run.finish()
    assert code == 0, "\n".join(lines[-40:])
    tracker, mrun = mlflow_run(run_dir)
    assert mrun.info.status == "FINISHED"
    record = json.loads((run_dir / "laps" / "lap_001" / "metrics.json").read_text())["metrics"]
    cfg = load_config(base=run_dir / "config.yaml")
    assert record["self_play/env_steps"] >= cfg.self_play.iterations * cfg.ppo.train_batch_size
    assert record["self_play/server_restarts"] >= 1                # Ray brought the killed server back
    assert any("server restart(s);" in x and "transitions stored for" in x for x in lines), lines[-40:]   # and it is said
    for key in ("self_play/env_steps", "data/stored_transitions", "capability/success_rate"):
        assert sorted(s for s, _ in tracker.metric_history(key)) == [0, 1], key
    raw = TrajectoryStore(run_dir / "store").read_raw(1)
    pairs = raw.episode_ids.astype(np.int64) * 10_000 + raw.steps
    assert len(np.unique(pairs)) == len(pairs)                  # no transition recorded twice
