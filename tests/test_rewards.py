"""Grades: config, imagination accuracy, task term, weighting and grading one simulator step."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

import rewards
import simulators
from rewards import RewardConfig, RewardWeights


# -- config -------------------------------------------------------------------------------------
def test_config_defaults_and_omegaconf():
    cfg = RewardConfig()
    assert (cfg.weights.task, cfg.weights.imagination, cfg.weights.physics) == (1.0, 0.5, 0.5)
    assert cfg.horizon == 5
    node = OmegaConf.structured(RewardConfig)
    node.merge_with(OmegaConf.from_dotlist(["weights.physics=2.0", "tolerances.kinematic=0.02"]))
    assert rewards.validate(node) is node and node.weights.physics == 2.0


@pytest.mark.parametrize("kwargs,message", [
    ({"weights": RewardWeights(task=-1.0)}, r"rewards.weights.task must be a finite number >= 0.0, got -1.0"),
    ({"horizon": 0}, r"rewards.horizon must be an integer >= 1 and <= 1000, got 0"),
    ({"accuracy_sharpness": float("nan")}, r"rewards.accuracy_sharpness must be a finite number > 0.0"),
    ({"tolerances": rewards.Tolerances(penetration=0.0)}, r"rewards.tolerances.penetration must be .* > 0.0"),
    ({"nonfinite_score": 0.5}, r"rewards.nonfinite_score must be a finite number > 1.0"),
])
def test_config_out_of_range_is_an_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_validate_names_key_of_an_omegaconf_node():
    node = OmegaConf.structured(RewardConfig)
    node.weights.imagination = -0.5
    with pytest.raises(ValueError, match="rewards.weights.imagination"):
        rewards.validate(node)


# -- imagination ---------------------------------------------------------------------------------
def test_imagination_accuracy_perfect_and_strictly_decreasing():
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(6, 5, 4))
    noise = rng.normal(size=actual.shape)
    scale = np.array([1.0, 2.0, 0.5, 3.0])
    np.testing.assert_allclose(rewards.imagination_accuracy(actual, actual, scale), 1.0)
    levels = [rewards.imagination_accuracy(actual + eps * noise, actual, scale) for eps in (0.0, 0.01, 0.05, 0.1, 0.3, 1.0)]
    levels = np.stack(levels)                                       # [levels, B]
    assert ((levels >= 0) & (levels <= 1)).all()
    assert (np.diff(levels, axis=0) < 0).all()


def test_imagination_accuracy_known_value_and_scale():
    actual = np.zeros((1, 2, 2))
    imagined = np.zeros((1, 2, 2))
    imagined[0, :, 1] = 1.0                                         # error 1 in dim 1 whose scale is 2
    acc = rewards.imagination_accuracy(imagined, actual, np.array([1.0, 2.0]), sharpness=2.0)
    np.testing.assert_allclose(acc, np.exp(-2.0 * 0.125))           # mean((1/2)^2 over half the entries)


def test_imagination_accuracy_nan_is_zero_and_bad_input_errors():
    actual = np.zeros((3, 2, 2))
    imagined = actual.copy()
    imagined[1, 0, 0] = np.nan
    imagined[2, 1, 1] = 1e300
    np.testing.assert_array_equal(rewards.imagination_accuracy(imagined, actual, np.ones(2)), [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="must both be"):
        rewards.imagination_accuracy(imagined[:, :, :1], actual, np.ones(2))
    with pytest.raises(ValueError, match=r"scale has shape \(3,\), expected \(2,\)"):
        rewards.imagination_accuracy(imagined, actual, np.ones(3))
    with pytest.raises(ValueError, match=r"bad dimension\(s\) \[0\]"):
        rewards.imagination_accuracy(imagined, actual, np.array([-1.0, 1.0]))
    with pytest.raises(ValueError, match=r"scale is 0 in dimension\(s\) \[1\]"):
        rewards.imagination_accuracy(imagined, actual, np.array([1.0, 0.0]), scale_floor=0.0)


def test_a_dimension_that_never_moves_does_not_dominate():
    """Scale 0 (std of a constant dimension) is raised to the floor: a 1e-6 error there is negligible."""
    actual = np.zeros((1, 3, 2))
    imagined = actual.copy()
    imagined[..., 1] = 1e-6
    assert rewards.imagination_accuracy(imagined, actual, np.array([1.0, 0.0]))[0] > 0.999
    imagined[..., 1] = 0.05                                         # a real drift of a still thing still counts
    assert rewards.imagination_accuracy(imagined, actual, np.array([1.0, 0.0]))[0] < 0.01


# -- task ----------------------------------------------------------------------------------------
def test_task_grades_from_the_task_definition():
    task = simulators.make_task("pendulum")
    states = np.array([[0.0, 0.0], [np.pi, 0.0], [0.1, 0.0]])       # upright, hanging, near upright
    g = rewards.task_grades(task, states, np.zeros((3, 1)), ended=np.array([True, True, False]),
                            success=np.array([True, False, True]), success_bonus=2.0)
    np.testing.assert_allclose(g["dense"][[0, 2]], 1.0)
    assert g["dense"][1] < 0.2
    assert g["good"].tolist() == [True, False, True]
    assert g["success"].tolist() == [True, False, False]             # success counts only where an episode ended
    np.testing.assert_allclose(g["task"], g["dense"] + [2.0, 0.0, 0.0])
    good = np.zeros((2, task.episode_length), bool)
    good[0, -task.success_steps:] = True
    assert rewards.episode_success(task, good).tolist() == [True, False]


# -- composite -----------------------------------------------------------------------------------
TERMS = {"task": np.array([1.0, 0.5, 0.0]), "imagination": np.array([0.9, 0.1, 0.0]),
         "physics": np.array([0.0, -0.8, -1.0])}


def test_composite_weighted_sum_and_logged_terms():
    total, logged = rewards.composite(TERMS, RewardWeights())
    np.testing.assert_allclose(total, TERMS["task"] + 0.5 * TERMS["imagination"] + 0.5 * TERMS["physics"])
    assert set(logged) == {"reward/task", "reward/imagination", "reward/physics"}
    for k, v in TERMS.items():
        np.testing.assert_array_equal(logged[f"reward/{k}"], v)


def test_weights_change_total_not_terms_and_zero_removes_a_term():
    total_a, logged_a = rewards.composite(TERMS, {"task": 1.0, "imagination": 0.5, "physics": 0.5})
    total_b, logged_b = rewards.composite(TERMS, {"task": 2.0, "imagination": 0.0, "physics": 3.0})
    assert not np.allclose(total_a, total_b)
    for k in logged_a:
        np.testing.assert_array_equal(logged_a[k], logged_b[k])
    np.testing.assert_allclose(total_b, 2.0 * TERMS["task"] + 3.0 * TERMS["physics"])
    huge = {**TERMS, "imagination": np.array([1e9, -1e9, np.nan])}
    total_c, _ = rewards.composite(huge, {"task": 2.0, "imagination": 0.0, "physics": 3.0})
    np.testing.assert_allclose(total_c, total_b)                    # weight 0: no effect at all
    node = OmegaConf.structured(RewardConfig).weights
    np.testing.assert_allclose(rewards.composite(TERMS, node)[0], total_a)


def test_composite_bad_input():
    with pytest.raises(ValueError, match=r"no weight for term\(s\) \['novelty'\]"):
        rewards.composite({**TERMS, "novelty": np.zeros(3)}, RewardWeights())
    with pytest.raises(ValueError, match="weight 'task' must be a finite number >= 0"):
        rewards.composite(TERMS, {"task": -1.0, "imagination": 1.0, "physics": 1.0})
    with pytest.raises(ValueError, match="one size"):
        rewards.composite({"task": np.zeros(3), "physics": np.zeros(2)}, RewardWeights())


# -- grade_step ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cartpole():
    return simulators.make_engine("mujoco", "cartpole")


def fake_step(engine, n=6, horizon=5, closed=(1, 4), seed=0, selected_rows=False):
    """A StepResult-like record whose closed windows hold the engine's own trajectories."""
    spec, task = engine.spec, engine.task
    rng = np.random.default_rng(seed)
    start = engine.to_vector(engine.reset(seed, n))
    actions = rng.uniform(-1, 1, size=(n, horizon, spec.action_size))
    s, actual = start, []
    for h in range(horizon):
        s = engine.step_vectors(s, actions[:, h])
        actual.append(s)
    actual = np.stack(actual, 1)
    mask = np.isin(np.arange(n), closed)
    rows = mask if selected_rows else slice(None)
    window = SimpleNamespace(mask=mask, start=start[rows], actions=actions[rows], imagined=actual[rows].copy(),
                             actual=actual[rows])
    return SimpleNamespace(
        states=start, actions=actions[:, -1], next_states=actual[:, -1],
        task_reward=task.reward(actual[:, -1], actions[:, -1]),
        terminated=np.zeros(n, bool), truncated=np.arange(n) == 2, success=np.arange(n) % 2 == 0,
        window=window)


def test_grade_step_pays_at_closed_windows(cartpole):
    step = fake_step(cartpole)
    scale = np.array([1.0, 2.0, 1.0, 3.0])
    g = rewards.grade_step(step, cartpole, scale, RewardConfig())
    assert set(g) == {"task", "imagination", "physics", "total"}
    assert all(v.shape == (6,) for v in g.values())
    np.testing.assert_allclose(g["imagination"], [0, 1, 0, 0, 1, 0])
    np.testing.assert_allclose(g["physics"], 0.0, atol=1e-6)
    np.testing.assert_allclose(g["task"], step.task_reward + 1.0 * (np.arange(6) == 2))   # env 2 ended, succeeded
    np.testing.assert_allclose(g["total"], g["task"] + 0.5 * g["imagination"] + 0.5 * g["physics"])


def test_grade_step_scores_a_bad_imagination(cartpole):
    step = fake_step(cartpole)
    step.window.imagined[4, 2:, 0] += 0.3                           # the cart jumps 30 cm
    g = rewards.grade_step(step, cartpole, np.ones(4), RewardConfig())
    assert 0 < g["imagination"][4] < g["imagination"][1] == 1.0
    assert g["physics"][4] < -0.9 and g["physics"][1] > -1e-6
    same = rewards.grade_step(fake_step(cartpole, selected_rows=True), cartpole, np.ones(4))
    np.testing.assert_allclose(same["imagination"], [0, 1, 0, 0, 1, 0])


def test_grade_step_without_window(cartpole):
    step = fake_step(cartpole)
    step.window = None
    g = rewards.grade_step(step, cartpole, np.ones(4))
    np.testing.assert_array_equal(g["imagination"], 0.0)
    np.testing.assert_array_equal(g["physics"], 0.0)
    step = fake_step(cartpole, closed=())
    g0 = rewards.grade_step(step, cartpole, np.ones(4), RewardConfig(weights=RewardWeights(task=0.0)))
    np.testing.assert_array_equal(g0["total"], 0.0)


def test_importing_rewards_does_not_import_jax():
    code = "import sys, rewards; rewards.RewardConfig(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_grade_step_on_the_corrected_simulator(cartpole):
    """Windows close every H steps; grades there equal the grading functions applied to the window."""
    from simulators.corrected import CorrectedSimulator
    from simulators.world_model import WorldModel, WorldModelConfig

    wm = WorldModel("cartpole", 4, 1, WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1))
    sim = CorrectedSimulator("cartpole", wm, cartpole, 1.0, horizon=5, seed=0, num_envs=8)
    cfg, scale = RewardConfig(), np.array([1.0, 2.0, 1.0, 3.0])
    rng = np.random.default_rng(0)
    sim.reset()
    for t in range(10):
        r = sim.step(rng.uniform(-1, 1, size=(8, 1)))
        g = rewards.grade_step(r, cartpole, scale, cfg)
        np.testing.assert_allclose(g["task"], r.task_reward)       # no episode ends in 10 steps
        if (t + 1) % 5:
            assert r.window is None or not np.asarray(r.window.mask).any()
            np.testing.assert_array_equal(g["imagination"], 0.0)
            np.testing.assert_array_equal(g["physics"], 0.0)
            continue
        w = r.window
        assert np.asarray(w.mask).all()
        acc = rewards.imagination_accuracy(w.imagined, w.actual, scale, cfg.accuracy_sharpness)
        rep = rewards.physics_violation(cartpole, w.start, w.actions, w.imagined, cfg, scale=scale)
        np.testing.assert_allclose(g["imagination"], acc)
        np.testing.assert_allclose(g["physics"], rep.reward)
        assert (acc < 1).all() and (rep.reward < 0).all()            # an untrained model's imagination
        real = rewards.physics_violation(cartpole, w.start, w.actions, w.actual, cfg, scale=scale)
        assert not real.violates.any() and real.per_window.max() < 0.1   # fidelity 1: what happened is physics
