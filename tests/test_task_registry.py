"""Adding a task is one module and one registry line: a task written to a temporary module and registered
at run time is seen by every consumer, passes the engine contract and RLPF checks, and runs a smoke lap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import rewards
import simulators
from rewards.corruptions import KINDS, corrupt, true_windows
from simulators.physics import ENGINES, compliance
from simulators.tasks import ENV_VAR, TASKS, register_task, unregister_task

ROOT = Path(__file__).resolve().parent.parent
SLIDER = textwrap.dedent('''
    """A block on a rail (soft limits at +-1 m), pushed to x = 0.5 m and held there."""
    from dataclasses import dataclass

    import numpy as np

    from simulators.tasks import Task, tolerance

    XML = """
    <mujoco model="slider">
      <option timestep="0.01"/>
      <worldbody>
        <body name="block">
          <joint name="x" type="slide" axis="1 0 0" limited="true" range="-1 1" damping="0.5"/>
          <geom type="box" size="0.05 0.05 0.05" mass="1" contype="0" conaffinity="0"/>
        </body>
      </worldbody>
      <actuator>
        <motor joint="x" gear="5" ctrlrange="-1 1" ctrllimited="true"/>
      </actuator>
    </mujoco>
    """


    @dataclass(frozen=True)
    class Slider(Task):
        name: str = "slider"
        xml: str = XML
        n_substeps: int = 2
        episode_length: int = 50
        success_steps: int = 10
        observation_size: int = 2

        def initial_states(self, rng, n):
            return np.stack([rng.uniform(-0.5, 0.0, n), np.zeros(n)], axis=1)

        def observe(self, states):
            return states[:, :2] * 1.0

        def reward(self, states, actions):
            return tolerance(np.abs(states[:, 0] - 0.5), (0.0, 0.05), margin=1.0)

        def is_good(self, states):
            return (np.abs(states[:, 0] - 0.5) < 0.05) & (np.abs(states[:, 1]) < 0.2)
''')


@pytest.fixture
def slider(tmp_path, monkeypatch):
    """The slider task in a module of its own under ``tmp_path``, registered for this test only."""
    (tmp_path / "slider_task.py").write_text(SLIDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ENV_VAR, os.environ.get(ENV_VAR, ""))   # restored afterwards
    register_task("slider", "slider_task:Slider")
    yield tmp_path
    unregister_task("slider")
    sys.modules.pop("slider_task", None)


def test_every_consumer_sees_a_task_registered_later(slider):
    import flywheel.config
    from flywheel.config import load_config

    assert flywheel.config.TASKS is TASKS is simulators.TASKS
    assert "slider" in flywheel.config.TASKS and "slider" in ", ".join(TASKS) and TASKS[-1] == "slider"
    assert load_config(["task=slider"]).task == "slider"
    assert os.environ[ENV_VAR].endswith("slider=slider_task:Slider")
    code = "import simulators; print(list(simulators.TASKS))"               # a process started afterwards
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(slider), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "'slider'" in out.stdout
    unregister_task("slider")
    assert "slider" not in flywheel.config.TASKS and "slider" not in os.environ.get(ENV_VAR, "")
    with pytest.raises(flywheel.config.ConfigError, match=f"allowed: {', '.join(TASKS)}$"):
        load_config(["task=slider"])
    register_task("slider", "slider_task:Slider")


def test_a_task_added_at_run_time_passes_the_engine_contract(slider):
    for name in (e for e in ENGINES if e != "auto"):
        engine = compliance.engine_or_refusal(name, "slider")
        if engine is not None:
            compliance.check_engine(engine)


def test_a_task_added_at_run_time_gets_precise_rlpf(slider):
    engine = simulators.make_engine("mujoco", "slider")
    for bang in (False, True):
        start, actions, nxt = true_windows(engine, 16, 5, seed=2, bang=bang)
        assert not rewards.physics_violation(engine, start, actions, nxt).violates.any()
    prev = np.concatenate([start[:, None], nxt[:, :-1]], 1).reshape(-1, 2)
    acts, nxt = actions.reshape(-1, 1), nxt.reshape(-1, 2)
    for kind in KINDS:
        bad, applicable = corrupt(kind, engine, prev, nxt, 2.0)
        rep = rewards.physics_violation(engine, prev, acts[:, None], bad[:, None])
        assert applicable.all() == (kind != "penetration") and rep.violates[applicable].all(), kind


def test_config_and_corrected_simulator_of_a_runtime_task(slider):
    from flywheel.config import load_config
    from simulators.corrected import CorrectedSimulator
    from simulators.world_model import WorldModel, WorldModelConfig

    cfg = load_config(["task=slider", "preset=smoke", "engine.name=mujoco"])
    wm = WorldModel("slider", 2, 1, WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1))
    sim = CorrectedSimulator("slider", wm, cfg.engine.name, 0.5, seed=0, num_envs=cfg.simulator.num_envs)
    obs = sim.reset()
    assert obs.shape == (cfg.simulator.num_envs, 2)
    for _ in range(3):
        r = sim.step(np.ones((cfg.simulator.num_envs, 1)))
    assert np.isfinite(r.task_reward).all()


def test_bad_registrations_say_what_is_wrong(slider):
    with pytest.raises(ValueError, match="task name 'Bad Name' is not allowed"):
        register_task("Bad Name", "slider_task:Slider")
    with pytest.raises(ValueError, match="not of the form 'package.module:ClassName'"):
        register_task("other", "slider_task.Slider")
    register_task("ghost", "no_such_module:Ghost", export=False)
    try:
        with pytest.raises(ValueError, match="cannot be loaded.*PYTHONPATH"):
            simulators.make_task("ghost")
    finally:
        unregister_task("ghost")
    (slider / "misnamed_task.py").write_text(SLIDER.replace('name: str = "slider"', 'name: str = "task"')
                                             .replace("observation_size: int = 2", "observation_size: int = 0"))
    register_task("misnamed", "misnamed_task:Slider", export=False)
    try:
        with pytest.raises(ValueError, match="has name 'task'; set its name field to 'misnamed'"):
            simulators.make_task("misnamed")
    finally:
        unregister_task("misnamed")
    with pytest.raises(ValueError, match="built in and cannot be removed"):
        unregister_task("pendulum")


def test_ppo_acts_within_a_runtime_tasks_own_action_bounds(slider):
    """An actuator range other than [-1, 1]: RLlib's module acts in [-1, 1], the served env maps what it samples
    to the task's bounds exactly as RLlib's per-env unsquash would, and the exported policy acts in them too."""
    import gymnasium as gym
    import ray
    import torch
    from ray.rllib.utils.spaces.space_utils import unsquash_action

    from policies import EnvConfig, PolicyTrainer, ppo_config_for

    (slider / "wide_task.py").write_text(SLIDER.replace('ctrlrange="-1 1"', 'ctrlrange="-3 2"')
                                         .replace('name: str = "slider"', 'name: str = "wide"'))
    register_task("wide", "wide_task:Slider")
    ppo = ppo_config_for("pendulum", num_env_runners=0, num_envs_per_runner=4, train_batch_size=200, minibatch_size=100,
                         num_epochs=1)
    trainer = PolicyTrainer(ppo, EnvConfig(task="wide", addresses=["local"], local_engine="mujoco"), num_cpus=2)
    try:
        assert trainer.action_space.low.tolist() == [-3.0] and trainer.action_space.high.tolist() == [2.0]
        runner = trainer.algo.env_runner_group.local_env_runner
        env = runner.env.unwrapped
        assert env.single_action_space == gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        assert env.physical_action_space == trainer.action_space
        stepped = []
        step = env._step
        env._step = lambda actions, hold=None: (stepped.append(actions.copy()), step(actions, hold))[1]
        episodes = runner.sample(num_timesteps=120)
        raw = np.concatenate([e.get_actions() for e in episodes])
        on_wire = {tuple(row) for batch in stepped for row in batch}
        assert all(tuple(unsquash_action(a, trainer.action_space)) in on_wire for a in raw)
        assert np.concatenate(stepped).min() >= -3.0 and np.concatenate(stepped).max() <= 2.0
        policy = trainer.policy()
        obs = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
        mean = policy.head(policy.encoder(torch.from_numpy(obs)))[:, :1].detach().numpy()
        np.testing.assert_array_equal(policy(obs), np.stack([unsquash_action(m, trainer.action_space) for m in mean]))
    finally:
        trainer.stop()
        ray.shutdown()
        unregister_task("wide")
        sys.modules.pop("wide_task", None)


@pytest.mark.slow
def test_one_smoke_lap_on_a_runtime_task(slider, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(slider), str(ROOT)]), "JAX_PLATFORMS": "cpu"}
    args = ["task=slider", "preset=smoke", "laps=1", "engine.name=mujoco", "reality.engine=mujoco",
            f"runs_root={tmp_path}", "--run-dir", str(tmp_path / "run")]
    out = subprocess.run([sys.executable, "-m", "flywheel", "run", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for stage in ("seed", "self_play", "select", "retrain", "evaluate", "log"):
        assert f"lap 0 (1 of 1) | {stage}" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "wm_lap000.pt").exists()
