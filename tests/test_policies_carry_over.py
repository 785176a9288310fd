"""Policy carry-over with real RLlib: restored weights reach every EnvRunner (checked by digest) before it
samples, trainer checkpoints are verified file by file, and ``TorchPolicy`` acts exactly as RLlib does.

One small trainer (2 EnvRunners, in-process simulators, a 16x16 network) is shared by the tests.
"""

import os
import shutil

import gymnasium as gym
import numpy as np
import pytest
import ray
from ray.rllib.utils.spaces.space_utils import unsquash_action

from policies import EnvConfig, ppo_config_for
from policies.checkpoint import CheckpointError
from policies.rllib_adapter import PolicyTrainer
from policies.rllib_runners import FlywheelEnvRunner, WeightSyncError, learner_module_state, make_served_env


@pytest.fixture(scope="module")
def trainer():
    ppo = ppo_config_for("pendulum", num_env_runners=2, num_envs_per_runner=2, train_batch_size=64, minibatch_size=32,
                         num_epochs=1, hidden_sizes=[16, 16], num_cpus_per_runner=0.5, restart_delay_s=0.2)
    t = PolicyTrainer(ppo, EnvConfig(task="pendulum", addresses=["local"]), num_cpus=2)
    yield t
    t.stop()
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(trainer, tmp_path_factory):
    """Three checkpoints with different weights: (path, weights digest, TorchPolicy) each."""
    rng = np.random.default_rng(7)
    out = []
    for k in range(3):
        w = trainer.get_weights()
        trainer.set_weights({n: (v + rng.normal(scale=0.3, size=v.shape)).astype(v.dtype) if v.ndim == 2 else v
                             for n, v in w.items()})
        path = trainer.save(str(tmp_path_factory.mktemp("ckpt") / f"policy_{k}"))
        out.append((path, trainer.weights_digest(), trainer.policy()))
    assert len({d for _, d, _ in out}) == 3
    return out


def test_every_runner_holds_the_learner_weights_from_the_start(trainer):
    digests = trainer.runner_digests()
    assert [d["worker_index"] for d in digests] == [1, 2]
    assert all(d["matches"] and d["synced"] and d["digest"] == trainer.weights_digest() for d in digests), digests
    assert all("vf" not in k and "critic" not in k for d in digests for k in d["keys"])   # inference-only modules


def test_restore_twelve_times_runners_hold_and_sample_with_the_restored_weights(trainer, checkpoints):
    space = trainer.action_space                                 # the task's bounds (the module acts in [-1, 1])
    obs_size = 3
    for i in range(12):
        path, digest, policy = checkpoints[i % 3]
        synced = trainer.restore(path)
        assert trainer.weights_digest() == digest
        assert synced == {1: digest, 2: digest}
        assert all(d["digest"] == digest and d["matches"] for d in trainer.runner_digests())
        m = trainer.train(1)[-1]
        assert m["env_steps_this_iter"] >= 64
        first = sorted(trainer.last_samples(), key=lambda s: s["pid"])
        assert len(first) == 2
        for sample in first:                                     # the first sample after restore
            assert sample["digest"] == digest, (i, sample["digest"][:12], digest[:12])
            obs = sample["obs"].reshape(1, obs_size)
            mean = sample["action_dist_inputs"][: policy.action_size]
            rllib_action = unsquash_action(mean, space)
            np.testing.assert_allclose(policy(obs)[0], rllib_action, rtol=0, atol=1e-6)


def test_a_runner_that_missed_a_push_is_resynced_before_it_samples(trainer):
    module_state, seq_no = learner_module_state(trainer.algo)
    stale = {k: np.zeros_like(v) for k, v in module_state.items()}
    trainer.algo.env_runner_group.foreach_env_runner(lambda r: r.module.set_state(stale), local_env_runner=False,
                                                     remote_worker_ids=[2])
    before = {d["worker_index"]: d["matches"] for d in trainer.runner_digests()}
    assert before == {1: True, 2: False}
    digest = trainer.weights_digest()
    trainer.train(1)
    assert all(s["digest"] == digest for s in trainer.last_samples())


def test_a_runner_that_ignores_the_weights_is_an_error_naming_it(trainer):
    group = trainer.algo.env_runner_group

    def deaf(runner):
        runner.module.set_state = lambda state: None              # drops every weight update

    def heal(runner):
        del runner.module.set_state

    weights = trainer.get_weights()
    group.foreach_env_runner(deaf, local_env_runner=False, remote_worker_ids=[2])
    try:
        with pytest.raises(WeightSyncError, match=r"EnvRunner 2 \(pid \d+\) holds weights with digest \w+ after an "
                                                  r"explicit sync, the learner's are \w+"):
            trainer.set_weights({k: v + 0.01 for k, v in weights.items()})
    finally:
        group.foreach_env_runner(heal, local_env_runner=False, remote_worker_ids=[2])
    trainer.set_weights(weights)
    assert all(d["matches"] for d in trainer.runner_digests())


@pytest.mark.parametrize("defect", ["flip", "truncate", "delete_file", "delete_dir", "manifest"])
def test_a_damaged_trainer_checkpoint_is_refused_naming_the_file(trainer, tmp_path, defect):
    path = trainer.save(str(tmp_path / "policy_lap000"))
    module_file = next(p for p in sorted(_files(path)) if "learner" in p and p.endswith("module_state.pkl"))
    if defect == "flip":
        raw = bytearray(open(module_file, "rb").read())
        raw[len(raw) // 2: len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 8])
        open(module_file, "wb").write(bytes(raw))
        match = f"{module_file} is corrupt"
    elif defect == "truncate":
        raw = open(module_file, "rb").read()
        open(module_file, "wb").write(raw[: len(raw) // 3])
        match = f"{module_file} is truncated"
    elif defect == "delete_file":
        os.unlink(module_file)
        match = "missing " + module_file[len(path) + 1:]
    elif defect == "delete_dir":
        shutil.rmtree(path)
        match = f"{path} does not exist"
    else:
        manifest = f"{path}/flywheel_policy.json"
        text = open(manifest).read().replace('"iteration": ', '"iteration": 1')
        open(manifest, "w").write(text)
        match = "manifest .* is corrupt"
    digest = trainer.weights_digest()
    with pytest.raises(CheckpointError, match=match):
        trainer.restore(path)
    assert trainer.weights_digest() == digest                    # nothing was loaded


def test_torch_policy_acts_exactly_as_rllib_sends_actions_to_the_env(trainer):
    """An in-process FlywheelEnvRunner (RLlib's module, connectors and action normalisation) steps a
    recording env deterministically; TorchPolicy on the same observations gives the same actions."""
    clipped = {}
    for head_scale in (1.0, 25.0):                                # 25: many means beyond [-1, 1], clipped
        weights = trainer.get_weights()
        weights = {k: v * head_scale if k.startswith("pi.net") else v for k, v in weights.items()}
        trainer.set_weights(weights)
        recorded: list = []
        config = trainer.algo.config.copy(copy_frozen=False)
        config.environment(env=lambda ctx, log=recorded: _Recording(make_served_env(ctx), log))
        config.env_runners(num_envs_per_env_runner=4)
        runner = FlywheelEnvRunner(config=config, worker_index=1, num_workers=1)   # in this process
        try:
            module_state, seq_no = learner_module_state(trainer.algo)
            assert runner.flywheel_load_weights(module_state, seq_no)["synced"]
            runner.sample(num_timesteps=4 * 30, explore=False)
        finally:
            runner.stop()
        policy = trainer.policy()
        assert len(recorded) >= 30
        for obs, actions in recorded:
            ours = policy(obs)
            np.testing.assert_array_equal(ours, np.asarray(actions, np.float32).reshape(ours.shape))
        actions = np.concatenate([a for _, a in recorded])
        clipped[head_scale] = float(np.isin(actions, [-1.0, 1.0]).mean())
    assert clipped[1.0] < 0.5 < clipped[25.0], clipped            # both the interior and the clipped case


class _Recording(gym.vector.VectorWrapper):
    """Records (observations the agent saw, actions the simulator stepped with: after the env's own mapping
    of normalized actions to the task's bounds) for every step."""

    def __init__(self, env, log: list):
        super().__init__(env)
        self.log, self._obs = log, None
        backend = env.unwrapped
        step = backend._step

        def stepped(actions, hold=None):
            self.log.append((self._obs, np.array(actions)))
            return step(actions, hold)

        backend._step = stepped

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._obs = np.array(obs, np.float32)
        return obs, info

    def step(self, actions):
        obs, *rest = self.env.step(actions)
        self._obs = np.array(obs, np.float32)
        return (obs, *rest)


def _files(path: str) -> list[str]:
    return [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
