"""The grades measure what they claim: a trained world model imagines better and violates physics less."""

from __future__ import annotations

import numpy as np
import pytest

import rewards
from simulators.reality import Reality
from simulators.world_model import WorldModel, WorldModelConfig

H = 5


@pytest.fixture(scope="module")
def setup():
    reality = Reality("pendulum", engine="mujoco")
    data = reality.collect(None, n_steps=4_000, n_envs=40, seed=0)
    cfg = WorldModelConfig(ensemble_size=2, hidden_size=64, num_layers=2, max_epochs=10, patience=3, seed=0)
    trained = WorldModel("pendulum", reality.spec.state_size, reality.spec.action_size, cfg)
    trained.fit(data)
    untrained = WorldModel("pendulum", reality.spec.state_size, reality.spec.action_size, cfg)
    ep = reality.rollout(None, n_envs=16, seed=123)              # held-out reality trajectories
    t0 = np.arange(0, ep.actions.shape[1] - H + 1, H)
    start = ep.states[:, t0].reshape(-1, reality.spec.state_size)
    actions = np.stack([ep.actions[:, t0 + k] for k in range(H)], 2).reshape(len(start), H, -1)
    actual = np.stack([ep.states[:, t0 + k + 1] for k in range(H)], 2).reshape(len(start), H, -1)
    return reality.engine, trained, untrained, start, actions, actual


def test_trained_world_model_grades_better(setup):
    engine, trained, untrained, start, actions, actual = setup
    scale = trained.state_scale                                  # one yardstick for both
    cfg = rewards.RewardConfig()
    grades = {}
    for name, wm in (("trained", trained), ("untrained", untrained)):
        imagined = wm.imagine(start, actions)
        acc = rewards.imagination_accuracy(imagined, actual, scale, cfg.accuracy_sharpness)
        rep = rewards.physics_violation(engine, start, actions, imagined, cfg, scale=scale)
        grades[name] = (acc, rep)
    acc_t, rep_t = grades["trained"]
    acc_u, rep_u = grades["untrained"]
    assert acc_t.mean() > 0.8 and acc_t.mean() > acc_u.mean() + 0.3
    assert (acc_t > acc_u).mean() > 0.9                          # per window, not just on average
    assert rep_t.per_window.mean() < 0.5 * rep_u.per_window.mean()
    assert rep_t.violates.mean() < rep_u.violates.mean()
    assert rep_t.reward.mean() > rep_u.reward.mean()
    assert rep_u.fired()["residual"].mean() > 0.5                # an untrained model's steps disagree with physics
