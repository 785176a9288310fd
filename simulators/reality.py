"""Reality: the ground truth capability is measured in, and the source of seed data.

The task run in a physics engine with the task's true parameters (or given ones), batched::

    reality = Reality("pendulum", engine="mjx")
    s = reality.reset(seed=0, n=16)                      # [n, S]
    s = reality.step(s, actions)                         # [n, S]
    data = reality.collect(policy, n_steps=50_000)       # full episodes as a TransitionDataset
    eps = reality.rollout(policy, n_envs=32, seed=1)     # Episodes: states, actions, rewards, success

A policy is a callable ``observations [B, O] -> actions [B, A]``, or ``None`` for uniform random
actions within the engine's bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simulators.dataset import SOURCE_REALITY, TransitionDataset
from simulators.physics import PhysicsEngine, make_engine
from simulators.tasks import Task, make_task

Policy = Callable[[np.ndarray], np.ndarray]
EPISODE_ID_STRIDE = 1_000_000  # default episode ids of lap k start at k * stride


@dataclass
class Episodes:
    """A batch of complete episodes."""

    states: np.ndarray      # [B, T+1, S]
    actions: np.ndarray     # [B, T, A]
    rewards: np.ndarray     # [B, T] task reward of arriving in states[:, t+1]
    good: np.ndarray        # [B, T] per-step success predicate of states[:, t+1]
    success: np.ndarray     # [B] episode success

    @property
    def returns(self) -> np.ndarray:
        return self.rewards.sum(axis=1)


class Reality:
    """Batched reset/step/collect/rollout of a task in a physics engine."""

    def __init__(self, task: str | Task, engine: str | PhysicsEngine = "mjx", params: dict | None = None):
        self.task = make_task(task)
        if isinstance(engine, str):
            engine = make_engine(engine, self.task, params)
        elif params is not None:
            raise ValueError("params are only used when the engine is given by name; the engine object has its own")
        self.engine = engine
        self.spec = engine.spec

    def reset(self, seed: int, n: int) -> np.ndarray:
        """``n`` initial states ``[n, S]`` from the task's initial distribution."""
        return self.engine.to_vector(self.engine.reset(int(seed), int(n)))

    def step(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return self.engine.step_vectors(states, actions)

    def actions(self, policy: Policy | None, states: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The policy's actions for ``states`` (uniform random in the bounds when ``policy`` is None)."""
        if policy is None:
            return rng.uniform(self.spec.action_low, self.spec.action_high, size=(len(states), self.spec.action_size))
        a = np.asarray(policy(self.task.observe(states)), dtype=np.float64)
        return a.reshape(len(states), self.spec.action_size)

    def rollout(self, policy: Policy | None, n_envs: int, seed: int = 0) -> Episodes:
        """Run ``n_envs`` full episodes of ``task.episode_length`` steps."""
        rng = np.random.default_rng(seed)
        T, S, A = self.task.episode_length, self.spec.state_size, self.spec.action_size
        states = np.empty((n_envs, T + 1, S))
        actions = np.empty((n_envs, T, A))
        states[:, 0] = self.reset(int(rng.integers(2**31)), n_envs)
        for t in range(T):
            a = self.engine.check_actions(self.actions(policy, states[:, t], rng), n_envs)
            actions[:, t] = a
            states[:, t + 1] = self.step(states[:, t], a)
        flat_next = states[:, 1:].reshape(-1, S)
        rewards = self.task.reward(flat_next, actions.reshape(-1, A)).reshape(n_envs, T)
        good = np.asarray(self.task.is_good(flat_next)).reshape(n_envs, T)
        return Episodes(states, actions, rewards.astype(np.float32), good, self.task.episode_success(good))

    def collect(self, policy: Policy | None, n_steps: int, n_envs: int = 64, seed: int = 0, lap: int = 0,
                episode_offset: int | None = None) -> TransitionDataset:
        """Collect at least ``n_steps`` transitions as whole episodes (``ceil(n_steps / T)`` of them).

        Episodes run ``n_envs`` at a time. Episode ids are ``episode_offset + i`` (default
        ``lap * 1_000_000``); ``dones`` and ``success`` are set on each episode's final transition.
        """
        if n_steps < 1 or n_envs < 1:
            raise ValueError(f"collect needs n_steps >= 1 and n_envs >= 1, got n_steps={n_steps}, n_envs={n_envs}")
        T = self.task.episode_length
        n_episodes = math.ceil(n_steps / T)
        offset = lap * EPISODE_ID_STRIDE if episode_offset is None else int(episode_offset)
        rng = np.random.default_rng(seed)
        parts, done = [], 0
        while done < n_episodes:
            b = min(n_envs, n_episodes - done)
            ep = self.rollout(policy, b, seed=int(rng.integers(2**31)))
            parts.append(episodes_to_dataset(ep, offset + done, lap, SOURCE_REALITY, self.task.name))
            done += b
        return TransitionDataset.concat(parts)


class RandomPolicy:
    """Uniform random actions in a fraction ``scale`` of the action bounds around their middle.

    ``scale=1`` is the usual random seed policy; a smaller scale is a cautious one whose data
    leaves the rest of the action space unseen (the world model must extrapolate there).
    """

    def __init__(self, spec, scale: float = 1.0, seed: int = 0):
        if not 0.0 < float(scale) <= 1.0:
            raise ValueError(f"random policy scale must be in (0, 1], got {scale!r}")
        mid, half = (spec.action_high + spec.action_low) / 2, (spec.action_high - spec.action_low) / 2
        self.low, self.high = mid - scale * half, mid + scale * half
        self._rng = np.random.default_rng(seed)

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        return self._rng.uniform(self.low, self.high, size=(len(observations), len(self.low)))


def episodes_to_dataset(ep: Episodes, first_id: int, lap: int, source: int, task: str) -> TransitionDataset:
    """Flatten ``Episodes`` into a dataset (one row per transition, episode-major)."""
    B, T = ep.actions.shape[:2]
    S = ep.states.shape[2]
    last = np.zeros((B, T), bool)
    last[:, -1] = True
    return TransitionDataset(
        states=ep.states[:, :-1].reshape(-1, S).astype(np.float32),
        actions=ep.actions.reshape(B * T, -1).astype(np.float32),
        next_states=ep.states[:, 1:].reshape(-1, S).astype(np.float32),
        episode_ids=np.repeat(np.arange(first_id, first_id + B, dtype=np.int64), T),
        steps=np.tile(np.arange(T, dtype=np.int32), B),
        dones=last.ravel(),
        success=(last & ep.success[:, None]).ravel(),
        lap=np.full(B * T, lap, np.int32),
        source=np.full(B * T, source, np.uint8),
        rewards={"task": ep.rewards.ravel().astype(np.float32)},
        meta={"task": task},
    )
