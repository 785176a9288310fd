"""Transition datasets: what reality collection, the simulator service and the trajectory store share.

One transition per row. Saved as an ``.npz`` file written atomically (temp file, fsync,
``os.replace``), so a crash never leaves a half-written shard that a reader would accept.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SOURCE_REALITY, SOURCE_SIM = 0, 1
_COLUMNS = ("states", "actions", "next_states", "episode_ids", "steps", "dones", "success", "lap", "source")


@dataclass
class TransitionDataset:
    """Batched transitions ``(s, a, s')`` with episode bookkeeping, per-term rewards and metadata."""

    states: np.ndarray                  # [N, S] float32
    actions: np.ndarray                 # [N, A] float32
    next_states: np.ndarray             # [N, S] float32
    episode_ids: np.ndarray             # [N] int64, unique per episode across a run
    steps: np.ndarray                   # [N] int32, index of the transition within its episode
    dones: np.ndarray                   # [N] bool, the episode ended with this transition
    success: np.ndarray                 # [N] bool, episode success (set on the final transition)
    lap: np.ndarray                     # [N] int32, the lap that produced it
    source: np.ndarray                  # [N] uint8, SOURCE_REALITY or SOURCE_SIM
    rewards: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N] float32
    meta: dict = field(default_factory=dict)                      # task, wm_version, ...

    def __post_init__(self) -> None:
        n = len(self.states)
        for name in _COLUMNS[1:]:
            if len(getattr(self, name)) != n:
                raise ValueError(f"dataset column {name!r} has {len(getattr(self, name))} rows, states has {n}")
        for name, col in self.rewards.items():
            if len(col) != n:
                raise ValueError(f"reward column {name!r} has {len(col)} rows, states has {n}")

    def __len__(self) -> int:
        return len(self.states)

    @classmethod
    def empty(cls, state_size: int, action_size: int, **meta) -> TransitionDataset:
        z = np.zeros
        return cls(z((0, state_size), np.float32), z((0, action_size), np.float32), z((0, state_size), np.float32),
                   z(0, np.int64), z(0, np.int32), z(0, bool), z(0, bool), z(0, np.int32), z(0, np.uint8), {}, dict(meta))

    @classmethod
    def concat(cls, parts: list[TransitionDataset]) -> TransitionDataset:
        """Concatenate datasets; reward columns missing from some parts are filled with NaN."""
        parts = [p for p in parts if p is not None]
        if not parts:
            raise ValueError("concat needs at least one dataset")
        names = sorted({k for p in parts for k in p.rewards})
        rewards = {k: np.concatenate([p.rewards.get(k, np.full(len(p), np.nan, np.float32)) for p in parts]) for k in names}
        cols = {c: np.concatenate([getattr(p, c) for p in parts]) for c in _COLUMNS}
        return cls(**cols, rewards=rewards, meta=dict(parts[0].meta))

    def select(self, mask_or_index: np.ndarray) -> TransitionDataset:
        idx = np.asarray(mask_or_index)
        return TransitionDataset(**{c: getattr(self, c)[idx] for c in _COLUMNS},
                                 rewards={k: v[idx] for k, v in self.rewards.items()}, meta=dict(self.meta))

    def split_episodes(self, holdout: float, seed: int = 0) -> tuple[TransitionDataset, TransitionDataset]:
        """Split by whole episodes into (train, held-out)."""
        episodes = np.unique(self.episode_ids)
        rng = np.random.default_rng(seed)
        n_hold = int(round(len(episodes) * holdout))
        if len(episodes) > 1:
            n_hold = min(max(n_hold, 1 if holdout > 0 else 0), len(episodes) - 1)
        held = rng.choice(episodes, size=n_hold, replace=False)
        mask = np.isin(self.episode_ids, held)
        return self.select(~mask), self.select(mask)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (``.npz``)."""
        path = Path(path)
        arrays = {c: getattr(self, c) for c in _COLUMNS}
        arrays.update({f"reward__{k}": v for k, v in self.rewards.items()})
        arrays["meta_json"] = np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TransitionDataset:
        """Read a dataset; a truncated or foreign file raises ``ValueError`` naming the path."""
        try:
            with np.load(Path(path)) as z:
                cols = {c: z[c] for c in _COLUMNS}
                rewards = {k[len("reward__"):]: z[k] for k in z.files if k.startswith("reward__")}
                meta = json.loads(bytes(z["meta_json"]).decode()) if "meta_json" in z.files else {}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"cannot read transition dataset {path}: {exc}") from exc
        return cls(**cols, rewards=rewards, meta=meta)


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, then ``os.replace`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
