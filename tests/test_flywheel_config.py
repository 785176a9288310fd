"""Config composition, validation errors, saving and the resume fingerprint."""

import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import ConfigError, config_diff, config_hash, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_is_pendulum_local():
    cfg = load_config()
    assert cfg.task == "pendulum"
    assert cfg.engine.name == "auto" and cfg.tracking.uri is None and cfg.ray.address is None
    assert cfg.service.host == "127.0.0.1"
    assert 0.0 <= cfg.simulator.fidelity <= 1.0


def test_layers_apply_in_order(tmp_path):
    cfg = load_config(["task=cartpole", "simulator.fidelity=0.25", "laps=6"])
    assert (cfg.task, cfg.simulator.fidelity, cfg.laps) == ("cartpole", 0.25, 6)
    smoke = load_config(["preset=smoke"])
    assert smoke.preset == "smoke" and smoke.reality.seed_steps < load_config().reality.seed_steps
    # the command line beats the preset
    assert load_config(["preset=smoke", "reality.seed_steps=123"]).reality.seed_steps == 123


@pytest.mark.parametrize("override, words", [
    (["simulator.fidelty=0.5"], ["simulator.fidelty", "fidelity", "horizon"]),
    (["simulator.fidelity=1.5"], ["simulator.fidelity", "[0.0, 1.0]"]),
    (["task=walker"], ["task", "pendulum", "cartpole"]),
    (["laps=many"], ["laps"]),
    (["laps=0"], ["laps", ">= 1"]),
    (["engine.name=physx"], ["engine.name", "mujoco", "mjx"]),
    (["engine.params.mass=2"], ["engine.params.mass", "mass_scale"]),
    (["reality.params.damping_scale=-1"], ["reality.params.damping_scale", ">= 0.0"]),
    (["simulator.mode=dream"], ["simulator.mode", "blend", "reground"]),
    (["selection.max_physics_violation=2"], ["selection.max_physics_violation"]),
    (["preset=huge"], ["preset", "smoke"]),
    (["bogus=1"], ["bogus", "simulator", "tracking"]),
    (["fidelity"], ["key=value"]),
])
def test_bad_override_names_key_and_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(override)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_subsection_checks_surface_as_config_errors():
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(["world_model.hidden_size=0"])


def test_saved_config_round_trips_with_same_hash(tmp_path):
    cfg = load_config(["task=reacher", "simulator.fidelity=0.75"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(base=path)
    assert config_hash(again) == config_hash(cfg)
    assert config_diff(cfg, again) == []


def test_hash_ignores_location_and_lap_count_but_not_physics():
    base = load_config()
    assert config_hash(load_config(["laps=9", "run_dir=/tmp/x", "runs_root=/tmp/r"])) == config_hash(base)
    changed = load_config(["simulator.fidelity=0.0"])
    assert config_hash(changed) != config_hash(base)
    assert any(d.startswith("simulator.fidelity") for d in config_diff(base, changed))


def test_cli_bad_override_fails_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flywheel", "run", "simulator.fidelity=7",
                           f"runs_root={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "simulator.fidelity" in proc.stderr and "[0.0, 1.0]" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no tracking store
