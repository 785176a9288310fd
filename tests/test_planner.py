"""The planning agent in a real served simulator: a world model trained on MuJoCo data, a real gRPC server
on 127.0.0.1, Ray workers planning with CEM; its imagination checked against the server's own recording.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray

import rewards
from policies.checkpoint import CheckpointError
from policies.config import RESTART_SEED_BASE, EnvConfig
from policies.loading import load_policy
from policies.planner import ObservationInverse, PlannerConfig
from policies.planner_agent import PlannerTrainer
from policies.planner_policy import PlannerPolicy
from policies.torch_policy import TorchPolicy
from services.config import ServerConfig
from services.server import ServerProcess
from services.vector_env import RemoteVectorEnv
from simulators import make_task
from simulators.dataset import TransitionDataset
from simulators.reality import Reality
from simulators.world_model import WorldModel, WorldModelConfig

TASK, ENVS, WINDOW, FIDELITY = "pendulum", 8, 5, 1.0
SMALL = WorldModelConfig(ensemble_size=2, hidden_size=32, num_layers=2, max_epochs=10, seed=0)
FAST = PlannerConfig(horizon=10, candidates=48, iterations=3, elites=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner")
    reality = Reality(TASK, engine="mujoco")
    data = reality.collect(None, n_steps=4000, n_envs=16, seed=0)
    wm = WorldModel(TASK, reality.spec.state_size, reality.spec.action_size, SMALL)
    wm.fit(data)
    wm.save(root / "wm.pt")
    config = ServerConfig(task=TASK, engine="mujoco", world_model_path=str(root / "wm.pt"),
                          trajectory_dir=str(root / "shards"), flush_every=200, max_batch=64)
    with ServerProcess(config) as proc:
        yield {"root": root, "address": proc.address, "wm": wm, "wm_path": root / "wm.pt", "reality": reality}
    ray.shutdown()


def env_config(world, seed: int = 3) -> EnvConfig:
    return EnvConfig(task=TASK, addresses=[world["address"]], fidelity=FIDELITY, horizon=WINDOW, seed=seed)


def random_return(world, seed: int = 3) -> float:
    """Mean served return (the same total reward) of uniform random actions over one episode per env."""
    env = RemoteVectorEnv(world["address"], TASK, ENVS, fidelity=FIDELITY, seed=seed, horizon=WINDOW)
    rng = np.random.default_rng(seed)
    try:
        env.reset(seed=seed)
        total = np.zeros(ENVS)
        for _ in range(make_task(TASK).episode_length):
            _, r, *_ = env.step(rng.uniform(-1, 1, size=(ENVS, 1)).astype(np.float32))
            total += r
        return float(total.mean())
    finally:
        env.close()


@pytest.fixture(scope="module")
def served_run(world):
    """One episode per env of the planner in the served simulator, its windows kept."""
    trainer = PlannerTrainer(FAST, env_config(world), ENVS, world["wm_path"], keep_windows=1000)
    try:
        history = trainer.train(env_steps=ENVS * make_task(TASK).episode_length)
        digests = (trainer.weights_digest(), trainer.runner_digests())
        windows = trainer.windows()
        trainer.save(str(world["root"] / "trainer"))
        trainer.policy().save(str(world["root"] / "policy.pt"))
    finally:
        trainer.stop()                            # closes the session: the server writes what it recorded
    shards = sorted((world["root"] / "shards").rglob("*.npz"))
    recorded = TransitionDataset.concat([TransitionDataset.load(p) for p in shards])
    return {"history": history, "digests": digests, "windows": windows, "recorded": recorded}


def test_planner_beats_random_in_the_served_simulator(world, served_run):
    m = served_run["history"][-1]
    assert m["env_steps_this_iter"] >= ENVS * make_task(TASK).episode_length
    assert m["episodes"] == ENVS
    assert m["success_rate"] > 0.0                       # random actions never balance the pole
    assert m["episode_return_mean"] > random_return(world) + 20.0
    learner, workers = served_run["digests"]
    assert [w["digest"] for w in workers] == [learner]


def test_reported_imagination_is_the_world_models_prediction_that_was_graded(world, served_run):
    wm, data, windows = world["wm"], served_run["recorded"], served_run["windows"]
    inverse = ObservationInverse(make_task(TASK), wm.state_size)
    row = {(int(e), int(s)): i for i, (e, s) in enumerate(zip(data.episode_ids, data.steps))}
    assert len(windows) == ENVS * make_task(TASK).episode_length // WINDOW
    graded = 0
    for w in windows:
        rows = [row[(w["episode"], w["episode_step"] + h)] for h in range(WINDOW)]
        start, actions, actual = data.states[rows[0]], data.actions[rows], data.next_states[rows]
        np.testing.assert_allclose(actions, w["actions"], atol=1e-6)              # the plan was executed as is
        np.testing.assert_allclose(inverse.difference(w["start"], start), 0.0, atol=1e-5)
        truth = wm.imagine(start[None], actions[None])[0]
        np.testing.assert_allclose(inverse.difference(w["imagined"], truth) / wm.state_scale, 0.0, atol=1e-4)
        np.testing.assert_allclose(inverse.difference(w["actual"], actual), 0.0, atol=1e-5)
        aligned = w["imagined"] + (start - w["start"])                            # the served angle frame
        accuracy = rewards.imagination_accuracy(aligned[None], actual[None], wm.state_scale)[0]
        assert accuracy == pytest.approx(data.rewards["imagination"][rows[-1]], abs=1e-4)
        graded += 1
    assert graded == len(windows)


def test_saved_planner_acts_in_reality_and_loads_by_header(world, served_run):
    policy = load_policy(world["root"] / "policy.pt")
    assert isinstance(policy, PlannerPolicy)
    assert policy.planner.wm.version == world["wm"].version
    ep = world["reality"].rollout(policy, n_envs=4, seed=11)
    random = world["reality"].rollout(None, n_envs=4, seed=11)
    assert ep.returns.mean() > random.returns.mean() + 20.0
    assert policy.plans == make_task(TASK).episode_length // WINDOW


def test_policy_files_are_verified_and_told_apart(world, served_run, tmp_path):
    ppo = TorchPolicy(3, np.array([-1.0]), np.array([1.0]), [8])
    ppo.save(str(tmp_path / "ppo.pt"))
    assert isinstance(load_policy(tmp_path / "ppo.pt"), TorchPolicy)
    raw = bytearray((world["root"] / "policy.pt").read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="bad.pt.*corrupt"):
        load_policy(tmp_path / "bad.pt")
    (tmp_path / "other.pt").write_bytes(b"not a policy")
    with pytest.raises(CheckpointError, match="not a policy file"):
        load_policy(tmp_path / "other.pt")


def test_a_dead_worker_is_replaced_and_the_budget_still_sampled(world, monkeypatch):
    import policies.planner_agent as agent

    trainer = PlannerTrainer(FAST, env_config(world, seed=9), ENVS, world["wm_path"])
    try:
        dead = trainer.workers[0]
        assert trainer.runner_digests()[0]["seed"] == 9
        ray.kill(dead, no_restart=True)
        [m] = trainer.train(env_steps=ENVS * 20)
        assert m["env_steps_this_iter"] >= ENVS * 20 and m["runner_restarts"] == 1
        assert trainer.workers[0] != dead
        [digest] = trainer.runner_digests()
        assert digest["digest"] == trainer.weights_digest()
        assert digest["seed"] == 9 + RESTART_SEED_BASE      # the replacement plays other episodes than the dead one
        trainer.abort = lambda: "every simulator server is gone for good"
        ray.kill(trainer.workers[0], no_restart=True)
        with pytest.raises(RuntimeError, match="planner worker 0 died and every simulator server is gone for good"):
            trainer.train(env_steps=ENVS * 20)
        trainer.abort = lambda: None
        trainer.workers[0] = trainer._spawn(0, 2)
        monkeypatch.setattr(agent, "MAX_WORKER_RESTARTS", 0)
        ray.kill(trainer.workers[0], no_restart=True)
        with pytest.raises(RuntimeError, match="planner worker 0 died"):
            trainer.train(env_steps=ENVS * 20)
        # a reason to stop that comes while the workers sample (their clients would retry for a minute) kills them
        trainer.workers[0] = live = trainer._spawn(0, 3)
        trainer.abort, trainer.abort_every_s = (lambda: "every simulator server is gone for good"), 0.05
        with pytest.raises(RuntimeError, match=r"gone for good \(sampling stopped, 1 planner worker\(s\) killed\)"):
            trainer.train(env_steps=ENVS * 100_000)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(live.digest.remote(), timeout=60)
    finally:
        trainer.stop()


def test_restore_checks_the_checkpoint_and_the_settings(world, served_run):
    trainer = PlannerTrainer(FAST, env_config(world, seed=5), ENVS, world["wm_path"])
    try:
        trainer.restore(str(world["root"] / "trainer"))
        assert trainer.env_steps == served_run["history"][-1]["env_steps"]
    finally:
        trainer.stop()
    other = PlannerTrainer(PlannerConfig(horizon=12, candidates=48, iterations=3, elites=6), env_config(world, seed=6),
                           ENVS, world["wm_path"])
    try:
        with pytest.raises(ValueError, match="horizon: 10 -> 12"):
            other.restore(str(world["root"] / "trainer"))
    finally:
        other.stop()


def test_warm_start_plans_around_the_policy(world):
    """A policy that always pushes one way: the plan starts from its sequence and keeps it unless it finds better."""
    ppo = TorchPolicy(3, np.array([-1.0]), np.array([1.0]), [4])
    with np.errstate(all="ignore"):
        for p in ppo.parameters():
            p.data.zero_()
    ppo.head.bias.data[0] = 0.5                         # mean action 0.5 everywhere
    from policies.planner import Planner

    cfg = PlannerConfig(horizon=6, candidates=8, iterations=1, elites=2)
    planner = Planner(world["wm"], cfg, [-1.0], [1.0], warm_policy=ppo)
    s0 = np.array([[3.0, 0.0], [0.1, 0.0]])
    np.testing.assert_allclose(planner.policy_sequence(s0, 6), 0.5)
    plan = planner.plan(s0)
    np.testing.assert_allclose(plan.imagined, world["wm"].imagine(s0, plan.actions))
    base = planner.returns(s0, np.full((2, 1, 6, 1), 0.5))[:, 0]
    assert (plan.returns >= base - 1e-9).all()          # the policy's own sequence is a candidate


def test_mppi_does_not_use_elites_so_they_are_not_checked_against_candidates():
    assert PlannerConfig(method="mppi", elites=64, candidates=32).validate().elites == 64


@pytest.mark.parametrize(("change", "message"), [
    ({"method": "ilqr"}, "method is 'ilqr'; allowed: cem, mppi"),
    ({"elites": 64, "candidates": 32}, r"elites \(64\) must be <= candidates \(32\)"),
    ({"horizon": 0}, "horizon must be an integer >= 1"),
    ({"replan": "never"}, "replan is 'never'; allowed: window, step"),
    ({"temperature": 0.0}, "temperature must be > 0"),
])
def test_planner_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        PlannerConfig(**change).validate()


def test_observation_inverse_reads_states_back_or_refuses():
    for task, size in (("pendulum", 2), ("cartpole", 4)):
        t = make_task(task)
        inverse = ObservationInverse(t, size)
        s = np.random.default_rng(0).uniform(-3, 3, size=(16, size))
        np.testing.assert_allclose(inverse.difference(inverse(t.observe(s)), s), 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="'lift': state dimension 2 cannot be read back from the observation"):
        ObservationInverse(make_task("lift"), 14)


def test_replan_every_step_reports_the_imagination_of_the_executed_actions(world):
    from policies.planner import Planner

    cfg = PlannerConfig(replan="step", horizon=4, candidates=16, iterations=1, elites=4)
    policy = PlannerPolicy(Planner(world["wm"], cfg, [-1.0], [1.0], seed=1), WINDOW, 100, keep_windows=10)
    reality = world["reality"]
    s = reality.reset(5, 2)
    for _ in range(2 * WINDOW + 1):                      # the last call observes the 10th step's outcome
        s = reality.step(s, np.asarray(policy(reality.task.observe(s)), np.float64))
    assert policy.plans == 2 * WINDOW + 1                # a plan at every step
    assert len(policy.windows) == 4                      # two windows per env closed
    for w in policy.windows:
        np.testing.assert_allclose(w.imagined, world["wm"].imagine(w.start[None], w.actions[None])[0])
