"""The model-exploitation guard: did the policy earn its self-play return, or find a hole in the world model?

Each lap, complete self-play episodes are replayed in the simulator's physics engine with their own
actions, in windows of ``window`` steps that each start from the served state (``window=0``: the
whole episode open loop from its first state). The guard compares the task's mean per-step reward
along the served (corrected) trajectory with the same along the engine's replay::

    report = exploitation_gap(raw, task, engine, window=10)   # {"return_gap", "episodes", "replay"}
    flagged = report["return_gap"] > cfg.guard.threshold

At fidelity 1 the served trajectory is the engine's own, so the gap is 0; a world model that hands
out free energy (a pole that rises by itself) shows up as a positive gap within every window. Short
windows matter for a policy that acts by feedback: replayed open loop for a whole episode, a pole it
balanced falls from any small model error, and the gap would measure that divergence, not exploitation. ``replay`` holds the
engine's transitions of the replayed episodes: when a lap is flagged they can train the next world
model where the policy exploited it.
"""

from __future__ import annotations

import numpy as np

from simulators.dataset import SOURCE_SIM, TransitionDataset


def complete_episodes(data: TransitionDataset, max_episodes: int) -> tuple[np.ndarray, int]:
    """Row indices ``[E, T]`` of up to ``max_episodes`` complete episodes of the most common length ``T``."""
    order = np.lexsort((data.steps, data.episode_ids))
    ids, steps = data.episode_ids[order], data.steps[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    lengths = np.diff(np.r_[starts, len(ids)])
    ends = starts + lengths - 1
    whole = (steps[starts] == 0) & (steps[ends] == lengths - 1) & data.dones[order][ends].astype(bool)
    if not whole.any():
        return np.zeros((0, 0), np.int64), 0
    T = int(np.bincount(lengths[whole]).argmax())
    chosen = starts[whole & (lengths == T)][: int(max_episodes)]
    return order[chosen[:, None] + np.arange(T)[None, :]], T


def exploitation_gap(data: TransitionDataset | None, task, engine, max_episodes: int = 64, window: int = 10) -> dict:
    """Mean per-step task reward served minus replayed in ``engine`` (windows of ``window`` steps), over complete episodes."""
    if window < 0:
        raise ValueError(f"guard window must be >= 0 control steps (0 = whole episode), got {window}")
    if data is None or len(data) == 0:
        return {"return_gap": np.nan, "episodes": 0, "replay": None}
    rows, T = complete_episodes(data, max_episodes)
    if len(rows) == 0:
        return {"return_gap": np.nan, "episodes": 0, "replay": None}
    E, S = rows.shape[0], data.states.shape[1]
    actions = data.actions[rows].astype(np.float64)                        # [E, T, A]
    served = data.next_states[rows].astype(np.float64)                     # [E, T, S]
    replayed = np.empty_like(served)
    starts = data.states[rows].astype(np.float64)                          # [E, T, S] served state before each step
    for t in range(T):
        s = starts[:, t] if t == 0 or (window and t % window == 0) else replayed[:, t - 1]
        starts[:, t] = s
        replayed[:, t] = engine.step_vectors(s, actions[:, t])
    reward = lambda states: np.asarray(task.reward(states.reshape(E * T, S), actions.reshape(E * T, -1)),
                                       np.float64).reshape(E, T)
    gap = reward(served).mean(axis=1) - reward(replayed).mean(axis=1)
    flat = rows.reshape(-1)
    replay = TransitionDataset(
        states=starts.reshape(E * T, S).astype(np.float32), actions=data.actions[flat],
        next_states=replayed.reshape(E * T, S).astype(np.float32), episode_ids=data.episode_ids[flat],
        steps=data.steps[flat], dones=data.dones[flat], success=np.zeros(E * T, bool), lap=data.lap[flat],
        source=np.full(E * T, SOURCE_SIM, np.uint8), rewards={}, meta=dict(data.meta))
    return {"return_gap": float(gap.mean()), "episodes": int(E), "replay": replay}
