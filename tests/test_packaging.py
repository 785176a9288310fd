"""The project as a user who runs ``pip install .`` (not editable) gets it: the configs ship in the wheel, and
the CLI reads them from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flywheel.layers import ConfigError
from flywheel.sweep import load_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (without dependencies) into a fresh directory."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(out / "dist"), str(ROOT)], check=True, cwd=out, capture_output=True)
    wheel = next((out / "dist").glob("flywheel-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"configs/default.yaml", "configs/preset/smoke.yaml", "configs/task/pendulum.yaml",
            "configs/sweep/fidelity.yaml", "services/proto/flywheel/simulator/v1/simulator.proto"} <= names
    target = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return target


def test_an_installed_wheel_reads_its_configs_from_any_directory(installed, tmp_path):
    code = ("import flywheel, flywheel.config as c, policies.config as p; from flywheel.sweep import load_spec;"
            "print(flywheel.__file__); print(c.CONFIG_DIR);"
            "cfg = c.load_config(['preset=smoke', 'task=cartpole']); print(cfg.task, cfg.reality.seed_steps);"
            "print(p.ppo_config_for('cartpole').lr); print(load_spec('configs/sweep/fidelity.yaml')[1])")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(installed)) and lines[1] == str(installed / "configs")   # not this checkout's
    assert lines[2].startswith("cartpole ") and "simulator.fidelity" in lines[-1]
    show = subprocess.run([sys.executable, "-m", "flywheel", "config", "show", "preset=smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0 and "preset" in show.stdout, show.stderr[-3000:]


def test_a_sweep_file_that_is_missing_or_not_a_sweep_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep file .*nope.yaml does not exist; the shipped ones: configs/sweep/fidelity.yaml"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed\n")
    with pytest.raises(ConfigError, match=r"sweep file .*bad.yaml cannot be read"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="is not a mapping"):
        load_spec(bad)
