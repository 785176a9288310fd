"""A real simulator server in a spawned process on 127.0.0.1 and real clients (engine ``mujoco``, tiny WM)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from rewards import RewardConfig, grade_step
from services.client import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, SimulatorClient
from services.codec import encode
from services.config import ServerConfig
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.server import SERVICE_NAME, ServerProcess
from simulators import make_engine, make_task
from simulators.corrected import CorrectedSimulator
from simulators.dataset import TransitionDataset
from simulators.world_model import WorldModel, WorldModelConfig

TASK, B, FIDELITY = "pendulum", 4, 0.5
TINY = WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1, seed=0)


def tiny_wm(seed: int = 0) -> WorldModel:
    engine = make_engine("mujoco", TASK)
    return WorldModel(TASK, engine.spec.state_size, engine.spec.action_size,
                      WorldModelConfig(**{**vars(TINY), "seed": seed}))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    wm = tiny_wm()
    wm.save(root / "wm.pt")
    (root / "models").mkdir()
    other = tiny_wm(seed=1)
    other.save(root / "models" / f"{other.version}.pt")
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(root / "wm.pt"),
                          world_model_dir=str(root / "models"), trajectory_dir=str(root / "shards"),
                          flush_every=40, max_batch=64, workers=4)
    with ServerProcess(config) as proc:
        yield {"address": proc.address, "root": root, "wm_path": root / "wm.pt", "other": other.version,
               "config": config}


def actions_for(t: int, n: int = B) -> np.ndarray:
    rng = np.random.default_rng(1000 + t)
    return rng.uniform(-1, 1, size=(n, 1)).astype(np.float32)


def test_grpc_steps_equal_in_process_corrected_simulator(served):
    wm = WorldModel.load(served["wm_path"])
    engine = make_engine("mujoco", TASK)
    sim = CorrectedSimulator(make_task(TASK), wm, engine, FIDELITY, seed=7, num_envs=B)
    cfg = RewardConfig()
    steps = make_task(TASK).episode_length + 3           # crosses an auto-reset
    with SimulatorClient(served["address"]) as client:
        session = client.create_session(TASK, B, fidelity=FIDELITY, seed=7)
        assert session.info.wm_version == wm.version
        np.testing.assert_array_equal(session.reset(), np.asarray(sim.reset(), np.float32))
        ended = 0
        for t in range(steps):
            a = actions_for(t)
            out = session.step(a)
            ref = sim.step(a.astype(np.float64))
            grades = grade_step(ref, engine, wm.state_scale, cfg)
            np.testing.assert_allclose(out.observations, ref.observations, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(out.final_observations, ref.final_observations, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(out.reward, grades["total"], rtol=1e-5, atol=1e-6)
            for k in ("task", "imagination", "physics"):
                np.testing.assert_allclose(out.reward_terms[k], grades[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(out.truncated, ref.truncated)
            np.testing.assert_array_equal(out.terminated, ref.terminated)
            np.testing.assert_array_equal(out.steps, ref.steps)
            done = out.truncated | out.terminated
            np.testing.assert_array_equal(out.success[done], np.asarray(ref.success)[done])
            ended += int(done.sum())
        assert ended == B                                # every env finished one episode
        assert session.close()["transitions"] == steps * B


def test_bad_inputs_get_status_and_message(served):
    with SimulatorClient(served["address"]) as client:
        session = client.create_session(TASK, B, seed=1)
        session.reset()
        with pytest.raises(InvalidArgument, match=r"shape \(4, 2\) does not match the expected \(4, 1\)"):
            session.step(np.zeros((B, 2), np.float32))
        with pytest.raises(InvalidArgument, match="dtype int32 is not allowed; expected float32 or float64"):
            client.call("Step", pb.StepRequest(session_id=session.id, actions=encode(np.zeros((B, 1), np.int32))))
        bad = np.zeros((B, 1), np.float32)
        bad[2] = np.nan
        with pytest.raises(InvalidArgument, match=r"non-finite values .* row\(s\) \[2\]"):
            session.step(bad)
        with pytest.raises(InvalidArgument, match="bytes do not hold shape"):
            client.call("Step", pb.StepRequest(session_id=session.id,
                                               actions=pb.Tensor(dtype="float32", shape=[B, 1], data=b"\0")))
        with pytest.raises(NotFound, match="unknown session 's-nope'"):
            client.call("Step", pb.StepRequest(session_id="s-nope", actions=encode(np.zeros((B, 1)))))
        with pytest.raises(ResourceExhausted, match="num_envs 65 is over the server's max_batch 64"):
            client.create_session(TASK, 65)
        with pytest.raises(ResourceExhausted, match="Imagine: batch B=65 is over the server's max_batch 64"):
            client.imagine(np.zeros((65, 2)), np.zeros((65, 3, 1)))
        with pytest.raises(InvalidArgument, match="fidelity must be in"):
            client.create_session(TASK, B, fidelity=1.5)
        with pytest.raises(InvalidArgument, match="unknown task 'walker'; valid tasks"):
            client.create_session("walker", B)
        with pytest.raises(FailedPrecondition, match="no world model of task 'cartpole' is loaded .loaded: wm-"):
            client.create_session("cartpole", B)
        with pytest.raises(FailedPrecondition, match="is for task 'pendulum', not 'cartpole'"):
            client.create_session("cartpole", B, world_model_version=WorldModel.load(served["wm_path"]).version)
        with pytest.raises(InvalidArgument, match=r"unknown reward weight\(s\) \['speed'\]"):
            client.create_session(TASK, B, reward_weights={"speed": 1.0})
        with pytest.raises(NotFound, match="unknown world-model version 'wm-missing'"):
            client.create_session(TASK, B, world_model_version="wm-missing")
        with pytest.raises(InvalidArgument, match=r"unknown task 'xxxx+\.\.\. \(100000 characters\)'; valid tasks"):
            client.create_session("x" * 100_000, B)                 # the echo is cut: the answer still arrives
        with pytest.raises(InvalidArgument, match=r"horizon 1001 is out of range; allowed: 1 to 1000 \(0: the server's 5\)"):
            client.create_session(TASK, B, horizon=1001)
        with pytest.raises(InvalidArgument, match=r"reward weights \{'task': 1e\+308\} must be in \[0, 1e\+06\]"):
            client.create_session(TASK, B, reward_weights={"task": 1e308})
        with pytest.raises(InvalidArgument, match="unknown task 'bogus'; valid tasks"):
            client.imagine(np.zeros((1, 2)), np.zeros((1, 3, 1)), task="bogus")
        for states, actions in (((0, 2), (0, 3, 1)), ((2, 2), (2, 0, 1))):
            with pytest.raises(InvalidArgument, match=r"Verify: states \[B, S\] and actions \[B, H, A\] need B >= 1 "
                                                      r"and H >= 1, got states \[\d, 2\] and actions \[\d, \d, 1\]"):
                client.verify(np.zeros(states), np.zeros(actions), np.zeros((*actions[:2], 2)))
        # the session survives all of that and still steps
        assert session.step(actions_for(0)).observations.shape == (B, 3)
        session.close()
        with pytest.raises(NotFound, match="is closed; create a new one"):
            session.step(actions_for(1))


def test_two_clients_one_misbehaving_does_not_disturb_the_other(served):
    def run(seed: int, bad_every: int = 0) -> list[np.ndarray]:
        obs = []
        with SimulatorClient(served["address"]) as client:
            session = client.create_session(TASK, B, fidelity=FIDELITY, seed=seed)
            session.reset()
            for t in range(30):
                if bad_every and t % bad_every == 0:
                    with pytest.raises(InvalidArgument):
                        client.call("Step", pb.StepRequest(session_id=session.id,
                                                           actions=encode(np.full((B, 1), np.inf))))
                obs.append(session.step(actions_for(t)).observations)
            session.close()
        return obs

    reference = run(5)
    results = {}
    threads = [threading.Thread(target=lambda: results.update(good=run(5))),
               threading.Thread(target=lambda: results.update(bad=run(6, bad_every=3)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert set(results) == {"good", "bad"}
    np.testing.assert_array_equal(np.stack(results["good"]), np.stack(reference))


def test_retried_step_is_answered_from_cache(served):
    with SimulatorClient(served["address"]) as client:
        a, b = client.create_session(TASK, B, seed=3), client.create_session(TASK, B, seed=3)
        a.reset(), b.reset()
        first = client.call("Step", pb.StepRequest(session_id=a.id, seq=2, actions=encode(actions_for(0))))
        again = client.call("Step", pb.StepRequest(session_id=a.id, seq=2, actions=encode(actions_for(0))))
        assert first == again
        with pytest.raises(FailedPrecondition, match="already used by a different request"):
            client.call("Step", pb.StepRequest(session_id=a.id, seq=2, actions=encode(actions_for(5))))
        a._seq = 2
        b.step(actions_for(0))
        np.testing.assert_array_equal(a.step(actions_for(1)).observations, b.step(actions_for(1)).observations)
        with pytest.raises(FailedPrecondition, match="sequence number 9 is out of order .* expected 4"):
            client.call("Step", pb.StepRequest(session_id=a.id, seq=9, actions=encode(actions_for(2))))
        a.close(), b.close()


def test_health_and_reflection(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with SimulatorClient(served["address"]) as client:
        assert client.health() == "SERVING"
        assert client.health(SERVICE_NAME) == "SERVING"
    with grpc.insecure_channel(served["address"]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=10))
        names = {s.name for s in reply.list_services_response.service}
    assert "flywheel.simulator.v1.Simulator" in names and "grpc.health.v1.Health" in names


def test_imagine_and_verify(served):
    wm = WorldModel.load(served["wm_path"])
    engine = make_engine("mujoco", TASK)
    rng = np.random.default_rng(0)
    s0 = make_task(TASK).initial_states(rng, 3)
    actions = rng.uniform(-1, 1, (3, 4, 1))
    actual = [s0]
    for h in range(4):
        actual.append(engine.step_vectors(actual[-1], actions[:, h]))
    actual = np.stack(actual[1:], axis=1)
    with SimulatorClient(served["address"]) as client:
        imagined, version = client.imagine(s0, actions, world_model_version=wm.version)
        assert version == wm.version
        np.testing.assert_allclose(imagined, wm.imagine(s0, actions), rtol=1e-5, atol=1e-5)
        real = client.verify(s0, actions, actual)
        teleport = actual.copy()
        teleport[:, 2, 0] += 2.0                         # a jump in angle with no velocity behind it
        fake = client.verify(s0, actions, teleport)
    assert real["per_transition"].shape == (3, 4) and not real["violates"].any()
    assert fake["violates"].all() and (fake["reward"] < real["reward"]).all()


def test_load_world_model_changes_new_sessions_version(served):
    with SimulatorClient(served["address"]) as client:
        before = client.create_session(TASK, 2)
        assert client.load_world_model(version=served["other"]) == served["other"]
        after = client.create_session(TASK, 2)
        assert after.info.wm_version == served["other"] and before.info.wm_version != served["other"]
        before.reset()
        assert client.call("Step", pb.StepRequest(session_id=before.id, actions=encode(np.zeros((2, 1))))
                           ).wm_version == before.info.wm_version
        third = tiny_wm(seed=2)
        third.save(served["root"] / "models" / f"{third.version}.pt")     # a new version lands in the model directory
        assert client.load_world_model(third.version) == third.version
        assert client.create_session(TASK, 2).info.wm_version == third.version
        with pytest.raises(NotFound, match="world-model version 'wm-absent' is neither loaded"):
            client.load_world_model(version="wm-absent")
        named = tiny_wm(seed=3)
        named.save(served["root"] / "models" / "pendulum-best.pt")         # a file name that is not its version
        assert client.load_world_model("pendulum-best") == named.version
        assert client.create_session(TASK, 2, world_model_version="pendulum-best").info.wm_version == named.version
        cart = WorldModel("cartpole", 4, 1, TINY)
        cart.save(served["root"] / "models" / "cartpole.pt")              # another task's model: served beside
        assert client.load_world_model("cartpole") == cart.version
        assert client.create_session(TASK, 2).info.wm_version == named.version   # the server's task is unchanged
        assert client.create_session("cartpole", 2).info.wm_version == cart.version
        client.load_world_model(version=before.info.wm_version)   # back to the first for the other tests
        for s in (before, after):
            s.close()


def test_recorded_shards_hold_exactly_the_served_transitions(served):
    task = make_task(TASK)
    n_steps = 25
    with SimulatorClient(served["address"]) as client:
        session = client.create_session(TASK, B, fidelity=FIDELITY, seed=11)
        session.reset()
        served_steps = [(actions_for(t), session.step(actions_for(t))) for t in range(n_steps)]
        closed = session.close()
    assert closed["transitions"] == n_steps * B
    assert len(closed["shards"]) == 1                    # no episode ended: all of it is written on close
    data = TransitionDataset.concat([TransitionDataset.load(p) for p in closed["shards"]])
    assert len(data) == n_steps * B
    assert data.meta["session_id"] == session.id and data.meta["task"] == TASK
    assert data.meta["wm_version"] == session.info.wm_version
    np.testing.assert_array_equal(data.actions, np.concatenate([a for a, _ in served_steps]))
    np.testing.assert_array_equal(data.episode_ids, np.concatenate([o.episode_ids for _, o in served_steps]))
    np.testing.assert_array_equal(data.steps, np.concatenate([o.steps for _, o in served_steps]))
    for k in ("task", "imagination", "physics"):
        np.testing.assert_array_equal(data.rewards[k], np.concatenate([o.reward_terms[k] for _, o in served_steps]))
    np.testing.assert_array_equal(data.rewards["total"], np.concatenate([o.reward for _, o in served_steps]))
    np.testing.assert_allclose(task.observe(data.next_states.astype(np.float64)),
                               np.concatenate([o.final_observations for _, o in served_steps]), atol=1e-5)
    np.testing.assert_array_equal(data.states[B:], data.next_states[:-B])   # no episode ended in 25 steps
    assert not data.dones.any() and (data.source == 1).all()


def test_shutdown_flushes_the_recorder_and_episode_ids_are_unique(tmp_path):
    config = ServerConfig(task=TASK, engine="mujoco", trajectory_dir=str(tmp_path), flush_every=10_000,
                          episode_offset=1000)
    with ServerProcess(config) as proc, SimulatorClient(proc.address) as client:
        sessions = [client.create_session(TASK, 3, seed=0) for _ in range(2)]
        for s in sessions:
            s.reset()
            for t in range(5):
                s.step(actions_for(t, 3))
    shards = sorted(tmp_path.glob("*.npz"))
    assert len(shards) == 2                               # written when the server stopped
    parts = [TransitionDataset.load(p) for p in shards]
    assert all(len(p) == 15 for p in parts)
    ids = [set(np.unique(p.episode_ids).tolist()) for p in parts]
    assert ids[0].isdisjoint(ids[1]) and min(min(i) for i in ids) >= 1000


def test_an_error_message_is_cut_to_what_grpc_status_details_can_carry():
    from services.servicer import MAX_DETAILS, bounded

    assert bounded("short") == "short"
    cut = bounded("a" * 10 + "b" * 100_000 + "z" * 10)
    assert len(cut) < MAX_DETAILS + 50 and cut.startswith("aaaaaaaaaab") and cut.endswith("bzzzzzzzzzz")
    assert f"...[{100_020 - MAX_DETAILS} characters cut]..." in cut
