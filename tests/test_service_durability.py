"""Recorded data survives a killed server, a failed write is never swallowed, a killed server actor comes back.

Real recorders on disk, a real server process killed with SIGKILL, real restartable Ray actors
(engine ``mujoco``, tiny world model). Waits poll the disk or the service up to a bound; nothing
asserts a duration.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.client import DataLoss, SimulatorClient
from services.config import ServerConfig
from services.recorder import Recorder, RecordingError
from services.server import ServerProcess
from simulators import make_engine, make_task
from simulators.dataset import TransitionDataset
from simulators.world_model import WorldModel, WorldModelConfig

TASK, B = "pendulum", 3
T = make_task(TASK).episode_length
REWARDS = ("task", "imagination", "physics", "total")


@pytest.fixture(scope="module")
def wm_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("durability") / "wm.pt"
    spec = make_engine("mujoco", TASK).spec
    WorldModel(TASK, spec.state_size, spec.action_size,
               WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1)).save(path)
    return path


def wait_for(predicate, what: str, limit: float = 120.0):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``limit`` seconds."""
    end = time.monotonic() + limit
    while not (value := predicate()):
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
    return value


def shards(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.npz") if not p.name.startswith("."))


def stored(directory: Path) -> TransitionDataset | None:
    parts = [TransitionDataset.load(p) for p in shards(directory)]
    return TransitionDataset.concat(parts) if parts else None


def stored_ids(directory: Path) -> set[int]:
    data = stored(directory)
    return set() if data is None else set(np.unique(data.episode_ids).tolist())


def assert_whole_and_unique(directory: Path) -> TransitionDataset:
    """Every shard loads; each episode lies in exactly one shard, its steps 0..n-1 once each, in order."""
    owner: dict[int, str] = {}
    for path in shards(directory):
        data = TransitionDataset.load(path)
        for e in np.unique(data.episode_ids).tolist():
            assert e not in owner, f"episode {e} is in {owner.get(e)} and in {path.name}"
            owner[e] = path.name
            steps = data.steps[data.episode_ids == e]
            np.testing.assert_array_equal(steps, np.arange(len(steps)))
            ends = data.dones[data.episode_ids == e]
            assert not ends[:-1].any()
    return stored(directory)


@contextlib.contextmanager
def read_only(directory: Path):
    """Make ``directory`` unwritable, for root too (mode 0555, plus the immutable flag where mode is not enough)."""
    os.chmod(directory, 0o555)
    immutable = False
    try:
        if _writable(directory) and shutil.which("chattr"):
            immutable = subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
        assert not _writable(directory), f"cannot make {directory} read-only on this machine"
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        os.chmod(directory, 0o755)


def _writable(directory: Path) -> bool:
    try:
        (directory / ".probe").touch()
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


def random_actions(rng: np.random.Generator, n: int = B) -> np.ndarray:
    return rng.uniform(-1, 1, (n, 1)).astype(np.float32)


# -- the recorder alone ------------------------------------------------------------------------
def fake_step(t: int, ids: np.ndarray, steps: np.ndarray, dones: np.ndarray) -> tuple:
    n = len(ids)
    x = np.full((n, 2), float(t), np.float32)
    return (x, np.zeros((n, 1), np.float32), x + 1, ids, steps, dones, dones.copy(),
            {k: np.zeros(n, np.float32) for k in REWARDS})


def test_recorder_writes_completed_episodes_promptly_and_unfinished_ones_on_close(tmp_path):
    rec = Recorder(tmp_path, "s0-unit", {"task": TASK}, flush_every=10**6, flush_seconds=0.1)
    # env 0 runs episodes of 3 steps (ids 0, 1, ...); env 1 one long episode (id 100)
    for t in range(7):
        rec.add(*fake_step(t, np.array([t // 3, 100]), np.array([t % 3, t]), np.array([t % 3 == 2, False])))
    wait_for(lambda: stored_ids(tmp_path) == {0, 1}, "episodes 0 and 1 on disk while the session is open")
    assert rec.totals()["transitions_stored"] == 6 and rec.error is None
    rec.abandon()                                        # a reset: episodes 2 and 100 will not continue
    wait_for(lambda: stored_ids(tmp_path) == {0, 1, 2, 100}, "the abandoned episodes on disk")
    rec.add(*fake_step(7, np.array([3, 101]), np.array([0, 0]), np.array([False, False])))
    rec.close()
    data = assert_whole_and_unique(tmp_path)
    assert len(data) == rec.recorded == rec.stored == 16
    assert set(np.unique(data.episode_ids).tolist()) == {0, 1, 2, 3, 100, 101}
    assert data.dones.sum() == 2 and data.success.sum() == 2     # only episodes 0 and 1 ended


def test_recorder_writes_when_flush_every_transitions_of_ended_episodes_wait(tmp_path):
    rec = Recorder(tmp_path, "s0-size", {}, flush_every=4, flush_seconds=3600)
    for t in range(4):
        rec.add(*fake_step(t, np.array([0]), np.array([t]), np.array([t == 3])))
    wait_for(lambda: stored_ids(tmp_path) == {0}, "a shard once 4 ended transitions wait")
    rec.close()
    assert rec.totals() == {"transitions_served": 4, "transitions_stored": 4, "episodes_stored": 1, "shards": 1,
                            "error": None}


def test_recorder_keeps_its_write_error_and_data(tmp_path):
    rec = Recorder(tmp_path, "s0-ro", {}, flush_every=1, flush_seconds=0.05)
    with read_only(tmp_path):
        rec.add(*fake_step(0, np.array([0, 1]), np.array([0, 0]), np.array([True, False])))
        wait_for(lambda: rec.error, "the failed write")
        with pytest.raises(RecordingError, match=rf"cannot write trajectory shard {tmp_path}/s0-ro-00000\.npz: "
                                                 r"\w+Error: \[Errno \d+\]"):
            rec.check()
        rec.close()
    assert rec.error.path == str(tmp_path / "s0-ro-00000.npz") and "Errno" in rec.error.error
    assert rec.totals()["transitions_served"] == 2 and rec.totals()["transitions_stored"] == 0
    assert shards(tmp_path) == []


def step_until_it_fails(session, rng: np.random.Generator, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        session.step(random_actions(rng))
        time.sleep(0.01)
    raise AssertionError(f"session {session.id} kept serving for {limit:.0f} s after its recorder failed")


def test_episodes_cut_short_by_a_reset_are_written_once_under_ids_never_reused(tmp_path, wm_path):
    from services.local_env import LocalVectorEnv

    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(wm_path), trajectory_dir=str(tmp_path),
                          flush_seconds=0.05)
    env = LocalVectorEnv(TASK, B, config=config)
    rng = np.random.default_rng(0)
    for seed in (None, None, 3):
        env.reset(seed=seed)
        for _ in range(5):
            env.step(random_actions(rng))
    wait_for(lambda: len(stored_ids(tmp_path)) == 2 * B, "the episodes cut short by the two resets on disk")
    env.close()
    data = assert_whole_and_unique(tmp_path)
    assert len(np.unique(data.episode_ids)) == 3 * B and len(data) == 3 * 5 * B and not data.dones.any()



@pytest.mark.parametrize("bad_seed", [-5, 2**63, [1, -1]])
def test_a_refused_reset_changes_nothing_and_its_episodes_stay_whole(tmp_path, wm_path, bad_seed):
    from services.local_env import LocalVectorEnv
    from services.session import ServiceError

    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(wm_path), trajectory_dir=str(tmp_path),
                          flush_seconds=0.05)
    env = LocalVectorEnv(TASK, B, config=config)
    rng = np.random.default_rng(0)
    env.reset(seed=1)
    for _ in range(5):
        env.step(random_actions(rng))
    seed = bad_seed if not isinstance(bad_seed, list) else (bad_seed * B)[:B]
    with pytest.raises(ServiceError, match=r"seeds? must be (an integer|integers) in \[0, 2\*\*63\)"):
        env.session.restart(seed)
    for _ in range(5):
        env.step(random_actions(rng))
    env.close()
    data = assert_whole_and_unique(tmp_path)
    assert len(np.unique(data.episode_ids)) == B and len(data) == 10 * B      # one piece per episode: steps 0-9
    assert sorted(set(data.steps.tolist())) == list(range(10))


def test_resets_go_on_in_the_sessions_own_id_block(tmp_path):
    from services.models import ModelStore
    from services.session import SessionRequest, open_session

    config = ServerConfig(task=TASK, engine="mujoco")
    blocks = []
    session = open_session(config, ModelStore(config), SessionRequest(TASK, B),
                           lambda: blocks.append(len(blocks)) or 2**32 * (len(blocks) - 1))
    seen = []
    for seed in (None, None, 5, list(range(1, B + 1)), None):   # first reset, unseeded, seeded, per-env seeds
        session.restart(seed)
        seen.append(session.start_ids())
        for _ in range(3):
            session.advance(np.zeros((B, 1), np.float32))
    ids = np.concatenate(seen)
    assert blocks == [0] and len(np.unique(ids)) == len(ids) and (np.diff(ids) > 0).all() and ids.max() < 2**32
    session.close()


def test_a_server_outlives_its_episode_id_range_without_reusing_an_id(tmp_path, monkeypatch):
    import services.servicer as servicer

    monkeypatch.setattr(servicer, "SESSIONS_PER_INCARNATION", 3)
    config = ServerConfig(task=TASK, engine="mujoco", trajectory_dir=str(tmp_path))
    first = servicer.SimulatorService(config)
    offsets = [first._episode_offset() for _ in range(7)]     # 3 ranges: 0 (the start), then 1 and 2
    restarted = servicer.SimulatorService(config)              # a restart claims a range no session has used
    offsets += [restarted._episode_offset() for _ in range(2)]
    assert len(set(offsets)) == len(offsets)
    assert [o // (3 * servicer.EPISODE_BLOCK) for o in offsets] == [0, 0, 0, 1, 1, 1, 2, 3, 3]
    for service in (first, restarted):
        service.close_all()

# -- a server process ---------------------------------------------------------------------------
def test_killed_server_loses_only_the_episodes_in_flight(tmp_path, wm_path):
    raw = tmp_path / "raw"
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(wm_path), trajectory_dir=str(raw),
                          flush_seconds=0.2)
    rng = np.random.default_rng(0)
    proc = ServerProcess(config).start()
    try:
        with SimulatorClient(proc.address) as client:
            session = client.create_session(TASK, B, fidelity=0.5, seed=1)
            session.reset()
            ended: set[int] = set()
            for _ in range(2 * T + 5):                   # two episodes per env, then some of a third
                out = session.step(random_actions(rng))
                ended |= set(out.episode_ids[out.terminated | out.truncated].tolist())
            in_flight = set(session.step(random_actions(rng)).episode_ids.tolist())
            assert len(ended) == 2 * B
            wait_for(lambda: stored_ids(raw) == ended, "the ended episodes on disk while the session is open")
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        assert proc.stop() is None                       # killed: no report
    data = assert_whole_and_unique(raw)
    assert set(np.unique(data.episode_ids).tolist()) == ended and not in_flight & ended
    assert len(data) == 2 * B * T and data.dones.sum() == 2 * B


def test_streaming_env_waits_for_a_restarted_server_and_continues_in_a_new_session(tmp_path, wm_path):
    from services.server_actor import free_port
    from services.vector_env import RemoteVectorEnv

    raw = tmp_path / "raw"
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(wm_path), trajectory_dir=str(raw),
                          port=free_port("127.0.0.1"), flush_seconds=0.2)
    rng = np.random.default_rng(0)
    first = ServerProcess(config).start()
    env = RemoteVectorEnv(first.address, TASK, B, seed=4, streaming=True, timeout=120)
    try:
        env.reset()
        for _ in range(5):
            env.step(random_actions(rng))
        os.kill(first.pid, signal.SIGKILL)
        first.stop()
        result: dict = {}
        stepping = threading.Thread(target=lambda: result.update(out=env.step(random_actions(rng))))
        stepping.start()                                 # retries UNAVAILABLE while no server listens
        with ServerProcess(config) as second:
            stepping.join(120)
            obs, reward, terminated, truncated, _ = result["out"]
            assert truncated.all() and not terminated.any() and not reward.any()
            assert env.sessions_recreated == 1 and env.session.id.startswith("s1-")
            for _ in range(T + 1):
                obs, reward, terminated, truncated, _ = env.step(random_actions(rng))
            assert truncated.all()                       # the new episodes ran to their time limit
            env.close()
            report = second.stop()
    finally:
        env.close()
    assert report["incarnation"] == 1 and report["transitions_served"] == report["transitions_stored"] == T * B
    assert len(stored_ids(raw)) == B and len(assert_whole_and_unique(raw)) == T * B


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_lanes_in_flight_when_the_server_dies_continue_in_new_sessions(tmp_path, wm_path, streaming):
    from services.lanes import LanedVectorEnv
    from services.server_actor import free_port
    from services.vector_env import RemoteVectorEnv

    raw = tmp_path / "raw"
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(wm_path), trajectory_dir=str(raw),
                          port=free_port("127.0.0.1"), flush_seconds=0.2)
    rng = np.random.default_rng(0)
    first = ServerProcess(config).start()
    client = SimulatorClient(first.address, timeout=120)
    env = LanedVectorEnv(lambda lane, n, seed: RemoteVectorEnv(first.address, TASK, n, seed=seed, client=client,
                                                               streaming=streaming), 2 * B, lanes=2,
                         on_close=client.close)
    try:
        env.reset(seed=0)
        for _ in range(5):
            last = env.step(np.concatenate([random_actions(rng), random_actions(rng)]))[0]
        os.kill(first.pid, signal.SIGSTOP)                # frozen: neither step can be answered before it dies
        for lane in env.lanes:                           # both lanes' steps on the wire when the server dies
            lane.step_async(random_actions(rng))
        os.kill(first.pid, signal.SIGKILL)
        first.stop()
        result: dict = {}
        waiting = threading.Thread(target=lambda: result.update(out=[lane.step_wait() for lane in env.lanes]))
        waiting.start()                                  # retries UNAVAILABLE while no server listens
        with ServerProcess(config) as second:
            waiting.join(120)
            for k, (obs, reward, terminated, truncated, _) in enumerate(result["out"]):
                assert truncated.all() and not terminated.any() and not reward.any()
                np.testing.assert_array_equal(obs, last[k * B:(k + 1) * B])   # ended at their last observation
            assert env.sessions_recreated == 2 and {lane.session.id[:3] for lane in env.lanes} == {"s1-"}
            for _ in range(T + 1):
                obs, reward, terminated, truncated, _ = env.step(np.concatenate([random_actions(rng)] * 2))
            assert truncated.all()                       # the new episodes ran to their time limit
            env.close()
            report = second.stop()
    finally:
        env.close()
    assert report["transitions_served"] == report["transitions_stored"] == 2 * T * B
    assert len(assert_whole_and_unique(raw)) == 2 * T * B


def test_unwritable_directory_fails_the_session_with_path_and_os_error(tmp_path, wm_path):
    raw = tmp_path / "raw"
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(wm_path), trajectory_dir=str(raw),
                          flush_seconds=0.05)
    rng = np.random.default_rng(0)
    with ServerProcess(config) as proc, SimulatorClient(proc.address) as client:
        session = client.create_session(TASK, B, seed=1)
        session.reset()
        with read_only(raw):
            for _ in range(T):
                session.step(random_actions(rng))
            message = rf"{raw}/s0-\w+-00000\.npz: \w+Error: \[Errno \d+\]"
            with pytest.raises(DataLoss, match=message):
                step_until_it_fails(session, rng)
            with pytest.raises(DataLoss, match=message):
                session.close()
            report = proc.stop()
    assert report["transitions_served"] > report["transitions_stored"] == 0
    assert len(report["errors"]) == 1 and report["errors"][0]["path"].startswith(str(raw))
    assert "Errno" in report["errors"][0]["error"] and shards(raw) == []


# -- restartable server actors (Ray) ------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_started():
    from policies.rllib_adapter import init_ray

    init_ray(2)


def test_killed_server_actor_comes_back_and_the_env_keeps_stepping(tmp_path, wm_path, ray_started):
    import ray

    from services.server_actor import start_server_actors, stop_server_actors
    from services.vector_env import RemoteVectorEnv

    raw = tmp_path / "raw"
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(wm_path), trajectory_dir=str(raw),
                          flush_seconds=0.2, episode_offset=5000, max_restarts=2)
    rng = np.random.default_rng(0)
    actors, (address,) = start_server_actors([config])
    try:
        env = RemoteVectorEnv(address, TASK, B, fidelity=0.5, seed=2, timeout=120)
        env.reset(seed=2)
        ended: set[int] = set()

        def step() -> tuple:
            _, _, terminated, truncated, info = env.step(random_actions(rng))
            done = terminated | truncated
            ended.update(info["episode_id"][done & info["_episode_id"]].tolist())
            return terminated, truncated

        for _ in range(T + 5):
            step()
        before = set(ended)
        assert len(before) == B
        wait_for(lambda: stored_ids(raw) == before, "the first incarnation's ended episodes on disk")
        old_pid = ray.get(actors[0].pid.remote())
        os.kill(old_pid, signal.SIGKILL)

        terminated, truncated = step()                   # waits for the new incarnation, re-creates the session
        assert truncated.all() and not terminated.any() and env.sessions_recreated == 1
        assert ray.get(actors[0].address.remote()) == address and ray.get(actors[0].pid.remote()) != old_pid
        for _ in range(T + 6):       # a held reset step, a whole episode per env, a held reset step, 4 steps more
            step()
        env.close()
    finally:
        reports = stop_server_actors(actors)
    (report,) = reports
    assert report["incarnation"] == 1 and report["errors"] == []
    assert report["transitions_served"] == report["transitions_stored"] == (T + 4) * B
    data = assert_whole_and_unique(raw)
    ids = set(np.unique(data.episode_ids).tolist())
    assert before <= ids and len(ids) == 3 * B          # B before the kill; B whole and B unfinished after it
    assert {p.name[:3] for p in shards(raw)} == {"s0-", "s1-"}
    complete = data.select(np.isin(data.episode_ids, data.episode_ids[data.dones]))
    assert len(complete) == 2 * B * T and complete.dones.sum() == 2 * B


def test_stop_server_actors_raises_the_recording_error(tmp_path, wm_path, ray_started):
    from services.server_actor import start_server_actors, stop_server_actors

    raw = tmp_path / "raw"
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(wm_path), trajectory_dir=str(raw),
                          flush_seconds=0.05, max_restarts=0)
    rng = np.random.default_rng(0)
    actors, (address,) = start_server_actors([config])
    try:
        with read_only(raw), SimulatorClient(address) as client:
            session = client.create_session(TASK, B, seed=1)
            session.reset()
            for _ in range(T):
                session.step(random_actions(rng))
            with pytest.raises(DataLoss, match=rf"{raw}/s0-\w+-00000\.npz: \w+Error: \[Errno \d+\]"):
                step_until_it_fails(session, rng)
            with pytest.raises(RecordingError, match=rf"cannot write trajectory shard {raw}/s0-\w+-00000\.npz: "
                                                     rf"\w+Error: \[Errno \d+\].*\(server {address}\)") as failed:
                stop_server_actors(actors)
    finally:
        stop_server_actors(actors)
    (report,) = failed.value.reports
    assert report["transitions_served"] >= T * B and report["transitions_stored"] == 0
    assert failed.value.path.startswith(str(raw)) and "Errno" in failed.value.error


def test_a_server_actor_that_dies_starting_is_named_by_its_cause_in_one_line(tmp_path, wm_path, ray_started):
    from flywheel.lap import StageError
    from flywheel.orchestrator import one_line
    from services.server_actor import start_server_actors

    bad = tmp_path / "wm.pt"
    data = bytearray(wm_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(bad), max_restarts=0)
    with pytest.raises(Exception) as died:               # Ray's wrapper: its own first line names only the actor
        start_server_actors([config])
    expected = f"world-model checkpoint {bad} is truncated or corrupt (checksum mismatch)"
    assert str(StageError(1, "self_play", died.value)) == f"lap 1 self_play failed: ValueError: {expected}"
    assert one_line(died.value) == f"ValueError: {expected}" and "\x1b" not in one_line(died.value)
