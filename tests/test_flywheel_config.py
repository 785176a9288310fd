"""Config composition, validation errors, saving and the resume fingerprint."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.cli import main
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
    (["reality.params.damping_scale=-1"], ["reality.params.damping_scale", "(0.0, 100.0]"]),
    (["simulator.mode=dream"], ["simulator.mode", "blend", "reground"]),
    (["selection.max_physics_violation=2"], ["selection.max_physics_violation"]),
    (["preset=huge"], ["preset", "smoke"]),
    (["bogus=1"], ["bogus", "simulator", "tracking"]),
    (["fidelity"], ["key=value"]),
    (["self_play.lanes=0"], ["self_play.lanes", "[1, 8]"]),
    (["seed=4294967295"], ["seed", "[0, 2147483647]"]),
    (["agent.warm_start="], ["agent.warm_start", "was given no value", "agent.warm_start='\"\"'"]),
    (["ppo.clip_param=0.3"], ["ppo.clip_param", "RLlib's clip_param is 'ppo.clip' here", "entropy_coeff"]),
    (["ppo.num_envs_per_env_runner=4"], ["RLlib's num_envs_per_env_runner is 'ppo.num_envs_per_runner' here"]),
    (["ray.address=10.0.0.1:6379", "ray.num_cpus=8"], ["ray.num_cpus", "ray.address", "running cluster"]),
    (["ray.address=auto", "ray.include_dashboard=true"], ["ray.include_dashboard", "leave it unset"]),
    (["ray.address=ray://10.0.0.1:10001"], ["ray.address", "Ray Client", "ray.address=auto"]),
    (["service.num_cpus=-1"], ["service.num_cpus", "[0, 1024]"]),
    (["world_model.holdout=2"], ["world_model.holdout must be in [0, 1)"]),
    (["self_play.lanes=4", "simulator.num_envs=3"], ["self_play.lanes", "simulator.num_envs", "1 to 3"]),
    (["self_play.lanes=2", "ppo.num_env_runners=2", "service.max_sessions=3"],
     ["service.max_sessions", "2 lane(s)", ">= 4"]),
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


# -- one source of truth -------------------------------------------------------------------------
@pytest.fixture
def config_dir(tmp_path):
    """A copy of configs/ to edit."""
    return Path(shutil.copytree(ROOT / "configs", tmp_path / "configs"))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def test_an_explicit_yaml_value_beats_every_built_in_default(config_dir):
    _edit(config_dir / "default.yaml", "world_model:\n", "ppo:\n  lr: 0.123\n  clip: 0.3\nworld_model:\n")
    _edit(config_dir / "task" / "pendulum.yaml", "  lr: 1.0e-3\n", "")
    cfg = load_config(config_dir=config_dir)
    assert cfg.ppo.lr == 0.123 and cfg.ppo.clip == 0.3          # default.yaml over the schema's defaults
    assert cfg.ppo.gamma == 0.97                                 # the task's file, where default.yaml is silent
    assert load_config(["ppo.lr=0.5"], config_dir=config_dir).ppo.lr == 0.5
    # a key set in default.yaml and in the task's file: the task's file is more specific
    assert load_config(["task=cartpole"], config_dir=config_dir).ppo.lr == 1e-3
    assert load_config(["task=cartpole", "ppo.lr=0.5"], config_dir=config_dir).ppo.lr == 0.5
    assert load_config(["task=cartpole", "preset=cluster"], config_dir=config_dir).ppo.train_batch_size == 65536


def test_task_files_hold_the_tuned_ppo_settings_that_library_users_get():
    from policies.config import ppo_config_for

    for task in ("pendulum", "cartpole", "reacher"):
        cfg = load_config([f"task={task}"])
        assert cfg.ppo == ppo_config_for(task), task
    assert load_config(["ppo.lr=0.123"]).ppo.lr == 0.123


def test_one_setting_has_one_key():
    cfg = load_config(["simulator.horizon=7", "simulator.num_envs=8", "seed=3"])
    assert cfg.rewards.horizon == 7
    assert cfg.ppo.num_envs_per_runner == 8
    assert cfg.ppo.seed == cfg.world_model.seed == cfg.service.seed == 3
    assert (cfg.service.task, cfg.service.engine) == (cfg.task, cfg.engine.name)
    assert load_config(["task=cartpole", "engine.name=mujoco"]).service.engine == "mujoco"
    assert load_config(["preset=smoke"]).ppo.num_envs_per_runner == 8   # the preset's simulator.num_envs


@pytest.mark.parametrize("override, words", [
    ("rewards.horizon=6", ["rewards.horizon", "simulator.horizon"]),
    ("ppo.num_envs_per_runner=8", ["ppo.num_envs_per_runner", "simulator.num_envs"]),
    ("world_model.seed=1", ["world_model.seed", "'seed'"]),
    ("service.task=cartpole", ["service.task", "'task'"]),
    ("service.lap=2", ["service.lap", "leave it out"]),
    ("service.reward.horizon=3", ["service.reward.horizon", "rewards"]),
])
def test_a_second_key_for_one_setting_is_refused(override, words):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_a_yaml_layer_that_sets_a_following_key_is_refused(config_dir):
    _edit(config_dir / "preset" / "smoke.yaml", "laps: 2\n", "laps: 2\nrewards:\n  horizon: 3\n")
    with pytest.raises(ConfigError, match=r"'rewards.horizon' \(from configs/preset/smoke.yaml\) follows 'simulator.horizon'"):
        load_config(["preset=smoke"], config_dir=config_dir)
    _edit(config_dir / "task" / "pendulum.yaml", "reality:\n", "task: cartpole\nreality:\n")
    with pytest.raises(ConfigError, match=r"'task' cannot be set in configs/task/pendulum.yaml"):
        load_config(config_dir=config_dir)


def test_saved_config_resolves_and_follows_again_on_resume(tmp_path):
    cfg = load_config(["simulator.horizon=7", "simulator.num_envs=8"])
    path = save_config(cfg, tmp_path / "config.yaml")
    text = path.read_text()
    assert "${" not in text and "horizon: 7" in text                 # written resolved
    again = load_config(base=path)
    assert (again.rewards.horizon, again.ppo.num_envs_per_runner) == (7, 8)
    assert config_hash(again) == config_hash(cfg)
    moved = load_config(["simulator.horizon=9", "simulator.num_envs=4"], base=path)
    assert (moved.rewards.horizon, moved.ppo.num_envs_per_runner) == (9, 4)


@pytest.mark.parametrize("override, words", [
    (["service.max_batch=4"], ["service.max_batch", "simulator.num_envs", ">= 16"]),
    (["self_play.num_servers=2"], ["self_play.num_servers", "ppo.num_env_runners", "at most 1"]),
    (["ppo.num_env_runners=4", "service.max_sessions=1"], ["service.max_sessions", ">= 4"]),
    (["ppo.num_env_runners=2", "self_play.num_servers=2", "service.port=5000"], ["service.port", "num_servers"]),
    (["simulator.horizon=101"], ["simulator.horizon", "pendulum", "1 to 100"]),
    (["ppo.train_batch_size=256", "ppo.minibatch_size=64", "ppo.num_env_runners=32"], ["train_batch_size", "512"]),
    (["ppo.rollout_fragment_length=100"], ["rollout_fragment_length", "3200", "2048"]),
])
def test_options_that_cannot_work_together_are_refused(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(override)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert load_config(["ppo.rollout_fragment_length=128"]).ppo.rollout_fragment_length == 128   # 128 x 16 = 2048


@pytest.mark.parametrize("value", ["0", "0.0", "-0.5", "inf", "nan", "101"])
def test_physics_scales_that_break_physics_are_refused(value, tmp_path, monkeypatch):
    from simulators.physics import build_model
    from simulators.tasks import make_task

    for section in ("reality", "engine"):
        with pytest.raises(ConfigError, match=rf"{section}.params.mass_scale.*\(0.0, 100.0\]"):
            load_config([f"{section}.params.mass_scale={value}"])
    monkeypatch.chdir(tmp_path)                                       # library users get the error too
    with pytest.raises(ValueError, match=r"mass_scale=.* is out of range; allowed: a number > 0 and <= 100"):
        build_model(make_task("pendulum"), {"mass_scale": float(value)})
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert build_model(make_task("pendulum"), {"mass_scale": 100.0}).body_mass.sum() > 0


def test_config_show_prints_each_value_with_its_origin(capsys):
    assert main(["config", "show", "ppo.lr=0.5", "simulator.horizon=7"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0]: line for line in out.splitlines() if not line.startswith("#")}
    assert lines["ppo.lr"].split("#")[0].strip() == "ppo.lr: 0.5" and lines["ppo.lr"].endswith("# command line")
    assert lines["ppo.gamma"].endswith("# configs/task/pendulum.yaml")
    assert lines["laps"].endswith("# configs/default.yaml")
    assert lines["ppo.clip"].endswith("# schema default")
    assert "rewards.horizon: 7" in lines["rewards.horizon"]
    assert lines["rewards.horizon"].endswith("# follows simulator.horizon (command line)")
    assert "ppo.hidden_sizes: [64, 64]" in lines["ppo.hidden_sizes"]
    assert "service.lap" not in lines and "service.lap" in out      # filled in per lap, named once
    assert main(["config", "show", "preset=smoke"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("task: pendulum")


def test_config_show_bad_key_exits_2_with_one_line(capsys):
    assert main(["config", "show", "ppo.lrr=0.5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "ppo.lrr" in captured.err and "lr" in captured.err
