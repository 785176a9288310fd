"""The model-exploitation guard on real MuJoCo physics: silent on honest data, firing on a world model that
hands out free energy, and its replay is what the engine really does."""

import numpy as np
import pytest

from flywheel.config import GuardSection
from flywheel.guard import complete_episodes, exploitation_gap
from simulators.dataset import TransitionDataset
from simulators.physics import make_engine
from simulators.reality import RandomPolicy, Reality
from simulators.tasks import make_task, wrap_angle


@pytest.fixture(scope="module")
def pendulum():
    reality = Reality("pendulum", engine="mujoco")
    data = reality.collect(RandomPolicy(reality.spec, 1.0, seed=3), n_steps=1600, n_envs=8, seed=3)
    return make_task("pendulum"), make_engine("mujoco", "pendulum"), data


def free_energy(task, engine, data: TransitionDataset) -> TransitionDataset:
    """The same episodes served by a world model that lifts the pole halfway to upright every step."""
    rows, T = complete_episodes(data, 10_000)
    out = data.select(np.arange(len(data)))
    s = data.states[rows[:, 0]].astype(np.float64)
    for t in range(T):
        out.states[rows[:, t]] = s
        s = engine.step_vectors(s, data.actions[rows[:, t]].astype(np.float64))
        s[:, 0] = 0.5 * wrap_angle(s[:, 0])                         # free energy: the pole rises by itself
        out.next_states[rows[:, t]] = s
    return out


def test_honest_episodes_show_no_gap(pendulum):
    task, engine, data = pendulum
    report = exploitation_gap(data, task, engine, max_episodes=16)
    assert report["episodes"] == 16 and abs(report["return_gap"]) < 1e-3
    replay = report["replay"]
    np.testing.assert_allclose(replay.next_states, data.select(complete_episodes(data, 16)[0].reshape(-1)).next_states,
                               atol=1e-3)


def test_a_world_model_with_free_energy_is_caught(pendulum):
    task, engine, data = pendulum
    exploited = free_energy(task, engine, data)
    report = exploitation_gap(exploited, task, engine, max_episodes=16, window=GuardSection.window)
    assert report["return_gap"] > 2 * GuardSection.threshold
    replay = report["replay"]
    first = complete_episodes(exploited, 16)[0][:, 0]
    expected = engine.step_vectors(exploited.states[first].astype(np.float64), exploited.actions[first].astype(np.float64))
    np.testing.assert_allclose(replay.next_states[:: 100], expected, atol=1e-5)   # the replay is the engine's


def test_incomplete_or_empty_data_gives_no_verdict(pendulum):
    task, engine, data = pendulum
    partial = data.select(data.steps > 0)                           # no episode starts at step 0
    assert exploitation_gap(partial, task, engine)["episodes"] == 0
    assert np.isnan(exploitation_gap(None, task, engine)["return_gap"])


def balanced_with_model_error(task, engine, noise: float, episodes: int = 16, seed: int = 0) -> TransitionDataset:
    """Episodes of a PD controller holding the pole upright, served by a world model with honest errors
    (zero-mean noise of ``noise`` on every predicted state): no free energy anywhere."""
    rng = np.random.default_rng(seed)
    T = task.episode_length
    s = np.stack([rng.uniform(-0.3, 0.3, episodes), rng.uniform(-0.5, 0.5, episodes)], 1)
    states, actions, nexts = [], [], []
    for _ in range(T):
        a = np.clip(-(20 * wrap_angle(s[:, 0]) + 3 * s[:, 1]) / 6, -1, 1)[:, None]     # feedback
        n = engine.step_vectors(s, a) + rng.normal(0, noise, s.shape)
        states.append(s), actions.append(a), nexts.append(n)
        s = n
    flat = lambda x: np.stack(x, 1).reshape(episodes * T, -1).astype(np.float32)
    steps = np.tile(np.arange(T), episodes)
    n_rows = episodes * T
    return TransitionDataset(states=flat(states), actions=flat(actions), next_states=flat(nexts),
                             episode_ids=np.repeat(np.arange(episodes), T), steps=steps, dones=steps == T - 1,
                             success=np.zeros(n_rows, bool), lap=np.zeros(n_rows, np.int32),
                             source=np.zeros(n_rows, np.uint8), rewards={}, meta={})


def test_a_pole_balanced_by_feedback_is_not_mistaken_for_exploitation(pendulum):
    """Open loop over a whole episode, the balanced pole falls from a 0.01 rad model error and the gap is large;
    replayed in windows from the served states (the default) the honest model shows no gap."""
    task, engine, _ = pendulum
    data = balanced_with_model_error(task, engine, noise=0.01)
    windowed = exploitation_gap(data, task, engine, max_episodes=16, window=GuardSection.window)
    open_loop = exploitation_gap(data, task, engine, max_episodes=16, window=0)
    assert abs(windowed["return_gap"]) < GuardSection.threshold / 2
    assert open_loop["return_gap"] > 2 * GuardSection.threshold
    replay = windowed["replay"]                                         # every replayed transition is the engine's
    np.testing.assert_allclose(engine.step_vectors(replay.states.astype(np.float64), replay.actions.astype(np.float64)),
                               replay.next_states, atol=1e-5)


def test_a_negative_window_is_refused(pendulum):
    task, engine, data = pendulum
    with pytest.raises(ValueError, match="window must be >= 0"):
        exploitation_gap(data, task, engine, window=-1)


def test_a_flagged_lap_stores_its_replay_and_counts_it(pendulum, tmp_path):
    """The guard stage: a flagged lap's engine replay joins the training data as a ``replay`` shard, and
    ``data/replay_transitions`` says how much (the table's transitions grow by it, with nothing selected)."""
    from flywheel import stages
    from flywheel.config import load_config
    from flywheel.lap import LapContext
    from flywheel.store import TrajectoryStore

    task, engine, data = pendulum
    cfg = load_config(["engine.name=mujoco", f"runs_root={tmp_path}"])
    lines = []
    ctx = LapContext(cfg, tmp_path, TrajectoryStore(tmp_path / "store"), lap=1, say=lines.append)
    out = stages.guard(ctx, free_energy(task, engine, data))
    replay = ctx.store.load(lap=1, kind="replay")
    assert out["exploitation/flagged"] == 1.0 and out["data/replay_transitions"] == len(replay) > 0
    assert any(line.startswith(f"guard: {len(replay)} engine-replayed transitions") for line in lines)
    honest = stages.guard(LapContext(cfg, tmp_path, TrajectoryStore(tmp_path / "honest"), lap=1), data)
    assert honest["exploitation/flagged"] == 0.0 and honest["data/replay_transitions"] == 0.0
