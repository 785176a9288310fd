"""Corrected simulator: fidelity end points, modes, episode bookkeeping, imagination windows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from simulators import CorrectedSimulator, Reality, WorldModel, WorldModelConfig, make_engine, make_task


@pytest.fixture(scope="module")
def wm():
    """A small world model fitted briefly on reality: good enough to differ from the engine a little."""
    data = Reality("pendulum", engine="mujoco").collect(None, 3000, n_envs=30, seed=0)
    model = WorldModel("pendulum", 2, 1, WorldModelConfig(hidden_size=32, num_layers=2, max_epochs=2,
                                                          num_threads=1, ensemble_size=3))
    model.fit(data)
    return model


@pytest.fixture(scope="module")
def engine():
    return make_engine("mujoco", "pendulum")


def run(sim, steps, seed=0):
    rng = np.random.default_rng(seed)
    sim.reset()
    return [sim.step(rng.uniform(-1, 1, (sim.num_envs, 1))) for _ in range(steps)]


@pytest.mark.parametrize("mode", ["blend", "reground"])
def test_fidelity_one_is_the_engine_and_zero_is_the_world_model(wm, engine, mode):
    for r in run(CorrectedSimulator("pendulum", wm, engine, 1.0, mode=mode, num_envs=8), 30):
        np.testing.assert_array_equal(r.next_states, engine.step_vectors(r.states, r.actions))
    for r in run(CorrectedSimulator("pendulum", wm, engine, 0.0, mode=mode, num_envs=8), 30):
        np.testing.assert_array_equal(r.next_states, wm.step(r.states, r.actions))


def test_half_fidelity_lies_between(wm, engine):
    for r in run(CorrectedSimulator("pendulum", wm, engine, 0.5, num_envs=8), 30):
        e, w = engine.step_vectors(r.states, r.actions), wm.step(r.states, r.actions)
        np.testing.assert_allclose(r.next_states, (e + w) / 2, rtol=0, atol=1e-12)
        assert ((r.next_states >= np.minimum(e, w) - 1e-12) & (r.next_states <= np.maximum(e, w) + 1e-12)).all()
        assert np.abs(e - w).max() > 0


def test_reground_every_k_steps(wm, engine):
    sim = CorrectedSimulator("pendulum", wm, engine, 0.25, mode="reground", num_envs=4)
    assert sim.reground_every == 4
    for r in run(sim, 20):
        e, w = engine.step_vectors(r.states, r.actions), wm.step(r.states, r.actions)
        expected = e if (r.steps[0] + 1) % 4 == 0 else w
        np.testing.assert_array_equal(r.next_states, expected)


def test_bad_arguments(wm, engine):
    with pytest.raises(ValueError, match=r"fidelity must be in \[0, 1\]"):
        CorrectedSimulator("pendulum", wm, engine, 1.5)
    with pytest.raises(ValueError, match="valid modes: blend, reground"):
        CorrectedSimulator("pendulum", wm, engine, 0.5, mode="dream")
    other = WorldModel("cartpole", 4, 1, WorldModelConfig(hidden_size=8, num_layers=1))
    with pytest.raises(ValueError, match="state_size 4 vs engine 2"):
        CorrectedSimulator("pendulum", other, engine, 0.5)
    sim = CorrectedSimulator("pendulum", wm, engine, 0.5, num_envs=4)
    with pytest.raises(RuntimeError, match="reset"):
        sim.step(np.zeros((4, 1)))
    sim.reset()
    with pytest.raises(ValueError, match="actions have shape"):
        sim.step(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="non-finite action"):
        sim.step(np.full((4, 1), np.nan))


def test_episodes_truncate_reset_and_report_success(wm, engine):
    sim = CorrectedSimulator("pendulum", wm, engine, 1.0, num_envs=4, episode_offset=100, seed=5)
    T = sim.task.episode_length
    good = []
    results = run(sim, T + 3)
    for t, r in enumerate(results[:T]):
        assert (r.steps == t).all() and (r.episode_ids == np.arange(100, 104)).all()
        good.append(sim.task.is_good(r.next_states))
        np.testing.assert_allclose(r.task_reward, sim.task.reward(r.next_states, r.actions))
        np.testing.assert_allclose(r.final_observations, sim.task.observe(r.next_states))
    last = results[T - 1]
    assert last.truncated.all() and not last.terminated.any()
    assert not any(r.truncated.any() for r in results[: T - 1])
    np.testing.assert_array_equal(last.success, sim.task.episode_success(np.stack(good, axis=1)))
    assert not np.allclose(last.observations, last.final_observations)     # reset inside the step
    after = results[T]
    np.testing.assert_allclose(sim.task.observe(after.states), last.observations)
    assert (after.steps == 0).all() and (after.episode_ids == np.arange(104, 108)).all()


class NaNForFirstEnv:
    """A fake world model whose prediction for env 0 is non-finite (a diverging model)."""

    def __init__(self, wm):
        self.wm, self.task, self.state_size, self.action_size = wm, wm.task, wm.state_size, wm.action_size

    def step(self, states, actions):
        out = self.wm.step(states, actions)
        out[0] = np.nan
        return out


def test_finished_envs_reset_while_others_keep_running(wm, engine):
    sim = CorrectedSimulator("pendulum", NaNForFirstEnv(wm), engine, 0.0, num_envs=3)
    results = run(sim, 5)
    for t, r in enumerate(results):
        assert r.terminated[0] and not r.terminated[1:].any() and not r.truncated.any()
        assert r.task_reward[0] == 0 and not r.success[0]
        assert r.steps[0] == 0 and (r.steps[1:] == t).all()
        assert r.episode_ids[0] == (0 if t == 0 else 2 + t) and (r.episode_ids[1:] == [1, 2]).all()
        np.testing.assert_array_equal(r.observations[1:], r.final_observations[1:])   # kept running
        assert np.isfinite(r.observations).all()
    for prev, cur in itertools.pairwise(results):
        np.testing.assert_array_equal(cur.states[1:], prev.next_states[1:])
        assert np.isfinite(cur.states[0]).all()


def test_imagination_windows(wm, engine):
    H = 7
    sim = CorrectedSimulator("pendulum", wm, engine, 1.0, horizon=H, num_envs=4)
    T = sim.task.episode_length
    results = run(sim, T + 2 * H)
    closed_at = [t for t, r in enumerate(results) if r.window is not None]
    per_episode = T // H
    assert closed_at[:per_episode] == [H * (i + 1) - 1 for i in range(per_episode)]
    assert closed_at[per_episode] == T + H - 1                       # no window straddles the reset
    for t in closed_at:
        w, span = results[t].window, results[t - H + 1 : t + 1]
        assert w.mask.all()
        np.testing.assert_array_equal(w.start, span[0].states)
        np.testing.assert_array_equal(w.actions, np.stack([r.actions for r in span], axis=1))
        np.testing.assert_array_equal(w.actual, np.stack([r.next_states for r in span], axis=1))
        np.testing.assert_allclose(w.imagined, wm.imagine(w.start, w.actions), atol=1e-12)
        assert np.abs(w.imagined - w.actual).max() > 0               # the WM is not the engine


def test_engine_params_give_a_sim_to_real_gap(wm):
    sim = CorrectedSimulator("pendulum", wm, "mujoco", 1.0, num_envs=4, engine_params={"mass_scale": 1.5})
    true = make_engine("mujoco", "pendulum")
    r = run(sim, 3)[-1]
    assert not np.allclose(r.next_states, true.step_vectors(r.states, r.actions))
    np.testing.assert_array_equal(r.next_states, sim.engine.step_vectors(r.states, r.actions))


def test_held_envs_stay_put_while_the_others_step():
    task = make_task("pendulum")
    engine = make_engine("mujoco", task)
    wm = WorldModel(task, engine.spec.state_size, engine.spec.action_size,
                    WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1))
    sim = CorrectedSimulator(task, wm, engine, fidelity=1.0, horizon=3, num_envs=4, seed=0)
    sim.reset()
    before = sim.states.copy()
    hold = np.array([True, False, True, False])
    r = sim.step(np.ones((4, 1)), hold=hold)
    np.testing.assert_array_equal(r.next_states[hold], before[hold])
    np.testing.assert_allclose(r.next_states[~hold], engine.step_vectors(before[~hold], np.ones((2, 1))))
    assert (r.task_reward[hold] == 0).all() and (r.task_reward[~hold] > 0).all()
    np.testing.assert_array_equal(r.steps, [0, 0, 0, 0])
    for _ in range(2):                                # the live envs close their 3-step window first
        r = sim.step(np.zeros((4, 1)))
    assert r.window is not None and r.window.mask.tolist() == [False, True, False, True]
    r = sim.step(np.zeros((4, 1)))
    assert r.window.mask.tolist() == [True, False, True, False] and r.steps.tolist() == [2, 3, 2, 3]
    with pytest.raises(ValueError, match=r"hold has shape \(3,\), expected \(4,\)"):
        sim.step(np.zeros((4, 1)), hold=np.zeros(3, bool))


# world-model rows per step, in units of num_envs, with horizon 3 over 7 steps:
SHARED_ROWS = {
    (0.5, "blend"): [1, 2, 2, 1, 2, 2, 1],       # the imagination has its own rows except where windows start
    (0.0, "blend"): [1, 1, 1, 1, 1, 1, 1],       # the world model alone: it imagines exactly what it simulates
    (0.0, "blend", 1): [2, 2, 2, 2, 2, 2, 2],    # but one env's two rows cost what one row does: not shared
    (0.5, "reground"): [1, 1, 2, 1, 2, 2, 1],    # grounded after steps 1, 3, 5; windows start at 0, 3, 6
}


@pytest.mark.parametrize("fidelity,mode,envs", [(0.5, "blend", 7), (0.0, "blend", 3), (0.0, "blend", 1),
                                               (0.5, "reground", 5)])
@pytest.mark.parametrize("size", ["small", "default"])
def test_rows_shared_by_the_state_and_the_imagination_are_predicted_once_with_the_same_values(wm, engine, fidelity,
                                                                                              mode, envs, size):
    if size == "default":    # the default architecture (untrained: the values do not matter here)
        wm = WorldModel("pendulum", 2, 1, WorldModelConfig())
    H = 3
    sim = CorrectedSimulator("pendulum", wm, engine, fidelity, mode=mode, horizon=H, num_envs=envs)
    sim.reset()
    rng = np.random.default_rng(1)
    sizes = []
    for _ in range(2 * H + 1):
        a = rng.uniform(-1, 1, (envs, 1))
        p = sim.begin(a)
        sizes.append(len(p.wm_states) // envs)
        wm_out, engine_next = sim.compute(p)
        # both sets of rows computed, as if they were not shared: the same bits where the model's rows do not
        # depend on their batch on this machine (WorldModel.rows_independent), else the same to float32 rounding
        full = wm.step(np.concatenate([p.states, sim._imagined_state]), np.concatenate([p.actions, p.actions]))
        s1, imagined = sim.combine(p, wm_out, engine_next)
        same = np.testing.assert_array_equal if wm.rows_independent() else \
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
        same(imagined, full[envs:])
        same(wm_out[:envs], full[:envs])
        sim.finish(p, s1, imagined)
    assert sizes == SHARED_ROWS.get((fidelity, mode, envs), SHARED_ROWS[(fidelity, mode)])
