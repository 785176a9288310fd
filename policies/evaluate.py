"""Capability in reality: run a policy deterministically on ``simulators.Reality``, batched, no RLlib.

    reality = Reality("pendulum", engine="mujoco")
    metrics = evaluate(trainer.policy(), reality, episodes=64, seed=0)
    # {"success_rate", "return_mean", "return_std", "episode_length", "episodes"}
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def evaluate(policy: Callable[[np.ndarray], np.ndarray] | None, reality, episodes: int = 64, seed: int = 0,
             batch_size: int = 256) -> dict[str, float]:
    """Roll out ``episodes`` full episodes in ``reality`` (``batch_size`` at a time) and summarise them.

    ``policy`` maps observations ``[B, O]`` to actions ``[B, A]`` (a ``TorchPolicy`` does, deterministically);
    ``None`` evaluates uniform random actions, the baseline a trained policy is compared with.
    """
    if int(episodes) < 1 or int(batch_size) < 1:
        raise ValueError(f"evaluate needs episodes >= 1 and batch_size >= 1, got {episodes}, {batch_size}")
    rng = np.random.default_rng(seed)
    returns, successes, lengths = [], [], []
    left = int(episodes)
    while left > 0:
        n = min(left, int(batch_size))
        ep = reality.rollout(policy, n_envs=n, seed=int(rng.integers(2**31)))
        returns.append(np.asarray(ep.rewards, np.float64).sum(axis=1))
        successes.append(np.asarray(ep.success, bool))
        lengths.append(np.full(n, ep.rewards.shape[1], np.float64))
        left -= n
    r, s, n_steps = np.concatenate(returns), np.concatenate(successes), np.concatenate(lengths)
    return {
        "success_rate": float(s.mean()),
        "return_mean": float(r.mean()),
        "return_std": float(r.std()),
        "episode_length": float(n_steps.mean()),
        "episodes": len(r),
    }
