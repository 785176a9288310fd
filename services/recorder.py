"""``Recorder``: every transition a session serves, written as append-only ``TransitionDataset`` shards.

One shard file per flush, ``<trajectory_dir>/<session_id>-<index:05d>.npz``, written atomically
(``TransitionDataset.save``), so a reader never sees half a shard. A session flushes every
``flush_every`` transitions, when it is closed, and when the server shuts down.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from simulators.dataset import SOURCE_SIM, TransitionDataset

REWARD_KEYS = ("task", "imagination", "physics", "total")


class Recorder:
    """Buffers one session's transitions and writes them as shards; thread-safe."""

    def __init__(self, directory: str | Path | None, session_id: str, meta: dict, flush_every: int = 20_000,
                 lap: int = 0):
        self.directory = Path(directory) if directory else None
        self.session_id, self.meta, self.flush_every, self.lap = session_id, dict(meta), int(flush_every), int(lap)
        self.shards: list[str] = []
        self.recorded = 0
        self._parts: list[dict] = []
        self._buffered = 0
        self._lock = threading.Lock()

    def add(self, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray, episode_ids: np.ndarray,
            steps: np.ndarray, dones: np.ndarray, success: np.ndarray, rewards: dict[str, np.ndarray]) -> None:
        """Append one step of the batch (arrays ``[B, ...]``); flushes when the buffer is full."""
        self.recorded += len(states)
        if self.directory is None:
            return
        part = {"states": np.asarray(states, np.float32), "actions": np.asarray(actions, np.float32),
                "next_states": np.asarray(next_states, np.float32), "episode_ids": np.asarray(episode_ids, np.int64),
                "steps": np.asarray(steps, np.int32), "dones": np.asarray(dones, bool),
                "success": np.asarray(success, bool) & np.asarray(dones, bool),
                "rewards": {k: np.asarray(rewards[k], np.float32) for k in REWARD_KEYS}}
        with self._lock:
            self._parts.append(part)
            self._buffered += len(states)
            full = self._buffered >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered transitions as one shard; returns its path (None when nothing was buffered)."""
        with self._lock:
            parts, self._parts, self._buffered = self._parts, [], 0
            if not parts or self.directory is None:
                return None
            path = self.directory / f"{self.session_id}-{len(self.shards):05d}.npz"
            self.shards.append(str(path))
        n = sum(len(p["states"]) for p in parts)
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "rewards"}
        data = TransitionDataset(**cols, lap=np.full(n, self.lap, np.int32), source=np.full(n, SOURCE_SIM, np.uint8),
                                 rewards={k: np.concatenate([p["rewards"][k] for p in parts]) for k in REWARD_KEYS},
                                 meta={**self.meta, "session_id": self.session_id})
        data.save(path)
        return str(path)
