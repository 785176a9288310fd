"""StepBatcher: sessions stepped together (one world-model call, one engine call) get exactly what they get
stepped alone: step results, grades and recorded shards, bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import threading
import time

import numpy as np
import pytest

from services.batcher import StepBatcher
from services.config import ServerConfig
from services.models import ModelStore
from services.session import SessionRequest, open_session
from simulators import WorldModel, WorldModelConfig
from simulators.dataset import TransitionDataset

CASES = [(1, 0.5, "blend"), (7, 0.5, "blend"), (64, 0.2, "reground"), (16, 1.0, "blend"), (5, 0.0, "blend")]
STEPS = 105   # past the pendulum's and cartpole's episode length: auto-resets included


def open_all(tmp_path, task: str, world_model=None):
    config = ServerConfig(task=task, engine="mujoco", trajectory_dir=str(tmp_path), flush_every=50)
    models = ModelStore(config, world_model)
    offsets = itertools.count()
    sessions = [open_session(config, models, SessionRequest(task, n, f, mode, seed=i), lambda: next(offsets) * 2**32)
                for i, (n, f, mode) in enumerate(CASES)]
    for s in sessions:
        s.restart()
    return sessions, models.get()


def inputs(sessions) -> list[list[tuple[np.ndarray, np.ndarray | None]]]:
    """Per step, per session: actions (some out of bounds, clipped) and a hold mask on some steps."""
    rng = np.random.default_rng(7)
    out = []
    for t in range(STEPS):
        row = []
        for s in sessions:
            a = rng.uniform(-1.5, 1.5, (s.num_envs, len(s.info.action_low)))
            hold = rng.random(s.num_envs) < 0.2 if t % 4 == 3 else None
            row.append((a, hold))
        out.append(row)
    return out


def run_alone(sessions, steps):
    return [[s.advance(a, hold) for s, (a, hold) in zip(sessions, row, strict=True)] for row in steps]


def in_threads(n: int, body, barrier: threading.Barrier) -> None:
    """``body(i)`` in ``n`` threads at once; the first error is raised here (and breaks ``barrier`` for the rest)."""
    errors = []

    def worker(i: int) -> None:
        try:
            body(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def run_coalesced(sessions, steps, batcher: StepBatcher):
    results = [[None] * len(sessions) for _ in steps]
    barrier = threading.Barrier(len(sessions))

    def body(i: int) -> None:
        sessions[i].batcher = batcher
        for t, row in enumerate(steps):
            barrier.wait()
            results[t][i] = sessions[i].advance(*row[i])

    in_threads(len(sessions), body, barrier)
    return results


def assert_same(x, y, where: str) -> None:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        assert np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True), where
        assert np.asarray(x).dtype == np.asarray(y).dtype, where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_same(x[k], y[k], f"{where}.{k}")
    elif hasattr(x, "__dict__"):
        for k in vars(x):
            assert_same(getattr(x, k), getattr(y, k), f"{where}.{k}")
    else:
        assert x == y, where


def recorded(session) -> TransitionDataset:
    """A session's recorded transitions in episode and step order: which shard holds an episode depends on when
    the recorder's timed flush ran, not on what was served."""
    session.close()
    data = TransitionDataset.concat([TransitionDataset.load(p) for p in session.recorder.shards])
    order = np.lexsort((data.steps, data.episode_ids))
    keys = np.stack([data.episode_ids[order], data.steps[order]], axis=1)
    assert len(np.unique(keys, axis=0)) == len(data), "a transition was recorded twice"
    return data.select(order)


@pytest.mark.parametrize("task,dtype", [("pendulum", "float32"), ("cartpole", "float32"), ("pendulum", "bfloat16")])
def test_coalesced_steps_equal_steps_alone(tmp_path, task, dtype):
    alone, wm = open_all(tmp_path / "alone", task)
    if dtype != wm.config.inference_dtype:   # the world model's hidden products in bfloat16
        wm = copy.copy(wm)
        wm.config = dataclasses.replace(wm.config, inference_dtype=dtype)
        for s in alone:
            s.close()
        alone, _ = open_all(tmp_path / f"alone-{dtype}", task, world_model=wm)
    together, _ = open_all(tmp_path / "together", task, world_model=wm)
    steps = inputs(alone)
    batcher = StepBatcher(max_wait_s=1.0)
    want = run_alone(alone, steps)
    got = run_coalesced(together, steps, batcher)
    for t in range(STEPS):
        for i in range(len(CASES)):
            (r0, g0), (r1, g1) = want[t][i], got[t][i]
            assert_same(r0, r1, f"step {t} session {i} result")
            assert_same(g0, g1, f"step {t} session {i} grades")
    assert any(r.window is not None for row in got for r, _ in row)
    for a, b in zip(alone, together, strict=True):
        da, db = recorded(a), recorded(b)
        assert len(da) == len(db) > 0
        assert_same({k: v for k, v in vars(da).items() if k != "meta"}, {k: v for k, v in vars(db).items() if k != "meta"},
                    "recorded")
    # sessions were computed together: fewer engine calls than steps, and fewer world-model calls where this
    # machine's matrix library keeps the model's rows independent of their batch (else one per session, exact)
    assert batcher.stats.steps == STEPS * len(CASES)
    if wm.rows_independent():
        assert batcher.stats.wm_calls < batcher.stats.steps
    else:
        assert batcher.stats.wm_calls == batcher.stats.steps
    assert batcher.stats.batches < batcher.stats.steps


@pytest.mark.parametrize("shape", ["forced", "hidden 32"])
def test_a_world_model_whose_rows_depend_on_their_batch_is_computed_per_session(tmp_path, shape, monkeypatch):
    """Where a model's rows are not batch-independent (forced here, or a layer shape that picks other kernels
    by batch size on this machine), each session's world-model rows get a call of their own: still bit for bit."""
    probe, default = open_all(tmp_path / "probe", "pendulum")
    for s in probe:
        s.close()
    if shape == "forced":
        wm = copy.copy(default)
        monkeypatch.setattr(wm, "rows_independent", lambda: False)
    else:
        wm = WorldModel("pendulum", default.state_size, default.action_size,
                        WorldModelConfig(hidden_size=32, num_layers=2, ensemble_size=3))
    alone, _ = open_all(tmp_path / "alone", "pendulum", world_model=wm)
    together, _ = open_all(tmp_path / "together", "pendulum", world_model=wm)
    steps = inputs(alone)[:20]
    batcher = StepBatcher(max_wait_s=1.0)
    want, got = run_alone(alone, steps), run_coalesced(together, steps, batcher)
    for t in range(len(steps)):
        for i in range(len(CASES)):
            assert_same(want[t][i][0], got[t][i][0], f"step {t} session {i} result")
    if not wm.rows_independent():
        assert batcher.stats.wm_calls == batcher.stats.steps           # one world-model call per session step
    assert batcher.stats.engine_calls < batcher.stats.steps           # the engine's rows still merge
    for s in alone + together:
        s.close()


def test_bad_actions_fail_only_their_caller(tmp_path):
    sessions, _ = open_all(tmp_path, "pendulum")
    batcher = StepBatcher(max_wait_s=0.05)
    bad = np.full((sessions[1].num_envs, 1), np.nan)
    with pytest.raises(ValueError, match="non-finite action"):
        sessions[1].batcher = batcher
        sessions[1].advance(bad)
    sessions[0].batcher = batcher
    r, grades = sessions[0].advance(np.zeros((sessions[0].num_envs, 1)))
    assert np.isfinite(r.next_states).all() and np.isfinite(grades["total"]).all()
    for s in sessions:
        s.close()


def test_max_wait_is_checked():
    with pytest.raises(ValueError, match="max_wait_s"):
        StepBatcher(max_wait_s=-1)
    with pytest.raises(ValueError, match="coalesce_wait_ms"):
        ServerConfig(coalesce_wait_ms=500)


def test_one_caller_stepping_sessions_in_turn_waits_at_most_once_per_session(tmp_path):
    sessions, _ = open_all(tmp_path, "pendulum")
    a, b = sessions[:2]
    batcher = StepBatcher(max_wait_s=0.05)
    for s in (a, b):
        s.batcher = batcher
    for _ in range(20):
        for s in (a, b):                                     # never two steps at once: no batch can form
            s.advance(np.zeros((s.num_envs, 1)))
    assert batcher.stats.steps == 40 and batcher.stats.timeouts <= 2
    for s in sessions:
        s.close()


def test_sessions_a_batch_once_missed_are_merged_again(tmp_path):
    """Sessions stepping freely in their own threads (as RLlib's runners do) that each once came late (a pause
    longer than the wait: a slow policy step, a garbage collection) are merged again afterwards, not each
    computed alone from then on."""
    sessions, _ = open_all(tmp_path, "pendulum")
    batcher = StepBatcher(max_wait_s=0.02)
    barrier = threading.Barrier(len(sessions), action=lambda: before.update(vars(copy.copy(batcher.stats))))
    before = {}

    def body(i: int) -> None:
        s = sessions[i]
        s.batcher = batcher
        for t in range(60):
            if t == 10:
                time.sleep(0.03 * i)                     # each late in turn: the others' batches give up on it
            if t == 20:
                barrier.wait()
            s.advance(np.zeros((s.num_envs, 1)))

    in_threads(len(sessions), body, barrier)
    steps, batches = batcher.stats.steps - before["steps"], batcher.stats.batches - before["batches"]
    assert steps == 40 * len(sessions)
    assert batches <= 0.5 * steps, (before, batcher.stats)   # most batches hold more than one session's step
    for s in sessions:
        s.close()


def test_a_late_session_is_waited_for_again_when_it_comes_during_a_batch_or_after_its_time(tmp_path):
    """The rule itself, step by step: sessions stepped in turn by one client become late (no batch waits for
    them); a late session whose step arrives while another batch computes is in time again, and any late mark
    runs out after ``LATE_WAITS`` waits (without either, free-running clients could all stay late for good)."""
    sessions, _ = open_all(tmp_path, "pendulum")
    a, b = sessions[:2]
    batcher = StepBatcher(max_wait_s=0.005)
    zeros = {s: np.zeros((s.num_envs, 1)) for s in (a, b)}
    for s in (a, b):
        s.batcher = batcher
    for _ in range(2):
        for s in (a, b):                                     # in turn: each batch gives up on the other session
            s.advance(zeros[s])
    late = lambda s: id(s.sim) in batcher._late             # noqa: E731
    assert late(a) and late(b)
    batcher._busy.add(id(a.sim))                             # a's batch is being computed when b's step arrives
    b.advance(zeros[b])
    batcher._busy.clear()
    assert not late(b) and late(a)
    time.sleep(batcher._late_s + 0.01)                       # a's mark runs out: the next batch waits for a again
    timeouts = batcher.stats.timeouts
    b.advance(zeros[b])
    assert batcher.stats.timeouts == timeouts + 1 and late(a)
    for s in sessions:
        s.close()
