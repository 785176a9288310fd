"""Stepping without waiting (``step_async``/``step_wait``, ``Session.step_start``) and ``LanedVectorEnv``,
over a real server process: the same data as blocking steps, lanes equal to their sessions alone, lost sessions."""

from __future__ import annotations

import numpy as np
import pytest

from services import RemoteVectorEnv
from services.client import SimulatorClient
from services.lanes import LanedVectorEnv, lane_seed, merge_infos
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from simulators import make_task

TASK = "pendulum"
T = make_task(TASK).episode_length


@pytest.fixture(scope="module")
def address(pendulum_server):
    return pendulum_server["address"]


def actions(t: int, n: int) -> np.ndarray:
    return np.random.default_rng(t).uniform(-1, 1, (n, 1)).astype(np.float32)


def assert_same_steps(a, b) -> None:
    for x, y in zip(a[:4], b[:4], strict=True):
        np.testing.assert_array_equal(x, y)
    assert set(a[4]) == set(b[4])
    for key in (k for k in a[4] if k != "episode_id"):      # ids come from per-session blocks
        np.testing.assert_array_equal(a[4][key], b[4][key])


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_step_async_then_wait_is_step_across_an_episode_end(address, streaming):
    blocking, split = (RemoteVectorEnv(address, TASK, 3, fidelity=0.5, seed=11, streaming=s) for s in (False, streaming))
    np.testing.assert_array_equal(blocking.reset(seed=3)[0], split.reset(seed=3)[0])
    for t in range(T + 2):                                   # through the next-step autoreset
        split.step_async(actions(t, 3))
        assert_same_steps(blocking.step(actions(t, 3)), split.step_wait())
    with pytest.raises(RuntimeError, match="without a step in flight"):
        split.step_wait()
    split.step_async(actions(0, 3))
    with pytest.raises(RuntimeError, match="already in flight"):
        split.step_async(actions(1, 3))
    with pytest.raises(RuntimeError, match="already in flight"):
        split.step(actions(1, 3))
    with pytest.raises(ValueError, match="non-finite action in env"):
        blocking.step_async(np.full((3, 1), np.nan, np.float32))
    obs, _ = split.reset(seed=3)                             # a reset drops the step in flight
    np.testing.assert_array_equal(obs, blocking.reset(seed=3)[0])
    assert_same_steps(blocking.step(actions(5, 3)), split.step(actions(5, 3)))
    blocking.close()
    split.close()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_a_session_takes_one_step_at_a_time(address, streaming):
    with SimulatorClient(address) as client:
        session = client.create_session(TASK, 2, seed=0)
        if streaming:
            session.use_stream()
        session.reset(0)
        pending = session.step_start(actions(0, 2))
        with pytest.raises(RuntimeError, match="has a step in flight"):
            session.step(actions(1, 2))
        first = pending.result()
        np.testing.assert_array_equal(pending.result().observations, first.observations)   # the same answer again
        second = session.step(actions(1, 2))                 # the sequence number moved on by exactly one
        assert (second.steps == first.steps + 1).all()
        session.step_start(actions(2, 2)).cancel()           # given up: it may or may not have run
        with pytest.raises(RuntimeError, match="was cancelled and may or may not have run"):
            session.step(actions(3, 2))
        session.recreate()
        session.reset(0)
        assert (session.step(actions(3, 2)).steps == first.steps).all()   # the first step of fresh episodes
        session.close()


def test_lanes_are_their_sessions_side_by_side(address):
    laned = LanedVectorEnv(lambda lane, n, seed: RemoteVectorEnv(address, TASK, n, fidelity=0.5, seed=seed),
                           num_envs=5, lanes=2, seed=7)
    assert laned.bounds == [(0, 3), (3, 5)] and laned.action_space.shape == (5, 1)
    alone = [RemoteVectorEnv(address, TASK, n, fidelity=0.5, seed=lane_seed(7, k)) for k, n in enumerate((3, 2))]
    obs, info = laned.reset(seed=21)
    parts = [env.reset(seed=lane_seed(21, k)) for k, env in enumerate(alone)]
    np.testing.assert_array_equal(obs, np.concatenate([p[0] for p in parts]))
    assert len(set(info["episode_id"].tolist())) == 5        # lanes are separate sessions: no shared ids
    assert len(set(obs[:, 0].tolist())) == 5                 # and separate seeds: no repeated initial states
    for t in range(T + 2):
        a = actions(t, 5)
        whole = laned.step(a)
        sides = [env.step(a[lo:hi]) for env, (lo, hi) in zip(alone, laned.bounds, strict=True)]
        merged = tuple(np.concatenate([s[i] for s in sides]) for i in range(4)) + (
            merge_infos([s[4] for s in sides], laned.sizes),)
        assert_same_steps(whole, merged)
    per_env, _ = laned.reset(seed=[1, 2, 3, 4, 5])
    np.testing.assert_array_equal(per_env[3:], alone[1].reset(seed=[4, 5])[0])
    laned.close()
    for env in alone:
        env.close()


def test_lanes_share_one_channel_and_close_it(address):
    client = SimulatorClient(address)
    laned = LanedVectorEnv(lambda lane, n, seed: RemoteVectorEnv(address, TASK, n, seed=seed, client=client),
                           num_envs=4, lanes=2, on_close=client.close)
    assert laned.lanes[0].client is laned.lanes[1].client is client is laned.client
    laned.reset(seed=0)
    laned.lanes[0].close()                                   # a lane's close leaves the shared channel open
    assert laned.lanes[1].step(actions(0, 2))[0].shape == (2, 3)
    laned.close()
    with pytest.raises(ValueError, match="closed channel"):
        client.create_session(TASK, 1)


def test_bad_lane_counts_are_refused(address):
    for lanes, num_envs in ((0, 4), (3, 2), (9, 16)):
        with pytest.raises(ValueError, match=r"lanes must be in \[1, min\(8, num_envs"):
            LanedVectorEnv(lambda lane, n, seed: RemoteVectorEnv(address, TASK, n), num_envs=num_envs, lanes=lanes)


def test_a_lane_whose_session_is_lost_truncates_its_episodes_and_goes_on(address):
    laned = LanedVectorEnv(lambda lane, n, seed: RemoteVectorEnv(address, TASK, n, seed=seed), num_envs=4, lanes=2)
    laned.reset(seed=0)
    last, *_ = laned.step(actions(0, 4))
    lost = laned.lanes[1]
    lost.client.call("CloseSession", pb.CloseSessionRequest(session_id=lost.session.id))   # as a restart loses it
    laned.lanes[0].step_async(actions(1, 4)[:2])
    lost.step_async(actions(1, 4)[2:])                      # sent to a session the server no longer has
    obs0, reward0, _, trunc0, _ = laned.lanes[0].step_wait()
    obs1, reward1, term1, trunc1, _ = lost.step_wait()
    assert not trunc0.any() and reward0.any()
    assert trunc1.all() and not term1.any() and (reward1 == 0).all()
    np.testing.assert_array_equal(obs1, last[2:])            # ended at their last observation
    assert laned.sessions_recreated == 1
    obs, reward, *_ = laned.step(actions(2, 4))              # next step: the new session's fresh episodes
    assert (reward[2:] == 0).all() and np.isfinite(obs).all()
    laned.close()
