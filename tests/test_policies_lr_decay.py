"""A decaying learning rate with real RLlib: it falls linearly with lifetime env steps, and a trainer restored
from a checkpoint (the next lap) goes on from the restored step count instead of starting over."""

import pytest
import ray

from policies import EnvConfig, ppo_config_for
from policies.rllib_adapter import PolicyTrainer

BATCH = 64
LR, LR_FINAL, DECAY = 1e-2, 1e-3, 4 * BATCH


def expected_lr(steps: int) -> float:
    """RLlib sets the rate for the update from the steps sampled before it."""
    frac = min(1.0, steps / DECAY)
    return LR + frac * (LR_FINAL - LR)


@pytest.fixture(scope="module")
def ppo():
    return ppo_config_for("pendulum", num_env_runners=0, num_envs_per_runner=2, train_batch_size=BATCH,
                          minibatch_size=32, num_epochs=1, hidden_sizes=[8], lr=LR, lr_final=LR_FINAL,
                          lr_decay_steps=DECAY)


def test_lr_falls_with_steps_and_goes_on_after_a_restore(ppo, tmp_path):
    env = EnvConfig(task="pendulum", addresses=["local"])
    trainer = PolicyTrainer(ppo, env, num_cpus=1)
    try:
        first = trainer.train(3)
        path = trainer.save(str(tmp_path / "policy"))
        steps_at_save = trainer.env_steps
    finally:
        trainer.stop()
    lrs = [m["lr"] for m in first]
    assert lrs[0] < LR and lrs == sorted(lrs, reverse=True), lrs          # falling from the first update on
    assert lrs[-1] == pytest.approx(expected_lr(first[-1]["env_steps"]), rel=0.05)

    again = PolicyTrainer(ppo, env, num_cpus=1)
    try:
        again.restore(path)
        assert again.env_steps == steps_at_save
        later = again.train(3)
    finally:
        again.stop()
        ray.shutdown()
    assert later[0]["lr"] < lrs[-1]                                        # not back at LR: the decay carried on
    assert later[-1]["lr"] == pytest.approx(LR_FINAL, rel=1e-6)            # and holds at lr_final past DECAY


@pytest.mark.parametrize("over, message", [
    ({"lr_final": 1e-4}, "go together"),
    ({"lr_decay_steps": 1000}, "go together"),
    ({"lr_final": -1e-4, "lr_decay_steps": 1000}, "go together"),
])
def test_an_incomplete_decay_is_refused_by_name(over, message):
    with pytest.raises(ValueError, match=message):
        ppo_config_for("pendulum", **over).validate()


def test_a_constant_lr_is_passed_as_a_number_and_a_decay_as_rllibs_schedule():
    assert ppo_config_for("pendulum", lr=1e-3).lr_schedule() == 1e-3
    assert ppo_config_for("pendulum", lr=1e-3, lr_final=1e-4, lr_decay_steps=500).lr_schedule() == [[0, 1e-3], [500, 1e-4]]
