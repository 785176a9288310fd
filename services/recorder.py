"""``Recorder``: every transition a session serves, written as append-only ``TransitionDataset`` shards.

    recorder = Recorder(directory, session_id, meta, flush_every=20_000, flush_seconds=2.0)
    recorder.add(states, actions, next_states, episode_ids, steps, dones, success, rewards)   # per step
    recorder.check()                 # raises the RecordingError of a failed write (sticky)
    recorder.close()                 # writes what is left, unfinished episodes included

Completed episodes are written promptly: a background thread writes every episode that has ended
once ``flush_every`` of their transitions are buffered or the oldest has waited ``flush_seconds``.
An episode is always written whole, in one shard, exactly once, so a server killed at any moment
loses at most the episodes still in flight. Unfinished episodes are written when they can no
longer continue: after ``abandon`` (the envs were reset) and by ``close`` (their last transition
has ``dones == False``; selection rejects them as incomplete). Shards are
``<directory>/<session_id>-<index:05d>.npz``, written atomically (``TransitionDataset.save``).
A failed write is never dropped: it becomes ``error`` (a ``RecordingError`` naming the path and the
OS error), the data stays buffered, and the recorder writes nothing more.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from simulators.dataset import SOURCE_SIM, TransitionDataset, atomic_write

REWARD_KEYS = ("task", "imagination", "physics", "total")


class RecordingError(RuntimeError):
    """A trajectory shard that could not be written: ``path``, the OS ``error`` and optional ``detail``."""

    def __init__(self, path: str, error: str, detail: str = ""):
        super().__init__(f"cannot write trajectory shard {path}: {error}" + (f" ({detail})" if detail else ""))
        self.path, self.error, self.detail = str(path), str(error), str(detail)

    def __reduce__(self):
        return type(self), (self.path, self.error, self.detail)

    def as_dict(self) -> dict:
        return {"path": self.path, "error": self.error}


def claim_incarnation(directory: str | Path | None, key: str, at_least: int = 0) -> int:
    """Count one more start of server ``key`` recording into ``directory``; returns its number (0 first, and at
    least ``at_least``).

    Kept in the hidden file ``<directory>/.incarnation-<key>``, so a server restarted after a crash
    takes a fresh episode-id range and never reuses the one its dead incarnation recorded under.
    """
    if not directory:
        return int(at_least)
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"trajectory directory {directory} is not a directory; give a directory the server can "
                         "write, or a path that does not exist yet")
    path = Path(directory) / f".incarnation-{key}"
    try:
        n = max(int(path.read_text()) + 1 if path.exists() else 0, int(at_least))
        atomic_write(path, lambda f: f.write(str(n).encode()))
    except (OSError, ValueError) as exc:
        raise RecordingError(str(path), f"{type(exc).__name__}: {exc}") from exc
    return n


class Recorder:
    """Buffers one session's transitions and writes its completed episodes as shards; thread-safe."""

    def __init__(self, directory: str | Path | None, session_id: str, meta: dict, flush_every: int = 20_000,
                 lap: int = 0, flush_seconds: float = 2.0):
        self.directory = Path(directory) if directory else None
        self.session_id, self.meta, self.lap = session_id, dict(meta), int(lap)
        self.flush_every, self.flush_seconds = int(flush_every), float(flush_seconds)
        self.shards: list[str] = []
        self.recorded = 0                      # transitions served
        self.stored = 0                        # transitions written
        self.episodes = 0                      # episodes written (whole, complete or not)
        self.error: RecordingError | None = None
        self._parts: list[dict] = []
        self._abandoned = np.zeros(0, np.int64)   # unfinished episodes that will not continue
        self._ready = 0                        # transitions of ended episodes in the buffer
        self._ready_since: float | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- recording -----------------------------------------------------------------------------
    def add(self, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray, episode_ids: np.ndarray,
            steps: np.ndarray, dones: np.ndarray, success: np.ndarray, rewards: dict[str, np.ndarray]) -> None:
        """Append one step of the batch (arrays ``[B, ...]``); ended episodes are written soon after."""
        if self.directory is None:
            self.recorded += len(states)
            return
        part = {"states": np.asarray(states, np.float32), "actions": np.asarray(actions, np.float32),
                "next_states": np.asarray(next_states, np.float32), "episode_ids": np.asarray(episode_ids, np.int64),
                "steps": np.asarray(steps, np.int32), "dones": np.asarray(dones, bool),
                "success": np.asarray(success, bool) & np.asarray(dones, bool),
                "rewards": {k: np.asarray(rewards[k], np.float32) for k in REWARD_KEYS}}
        ended = int((part["steps"][part["dones"]].astype(np.int64) + 1).sum())
        with self._cond:
            if self._closed:
                raise RuntimeError(f"recorder of session {self.session_id} is closed")
            self.recorded += len(states)
            self._parts.append(part)
            if ended:
                self._ready += ended
                if self._ready_since is None:
                    self._ready_since = time.monotonic()
                self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"recorder-{self.session_id}", daemon=True)
                self._thread.start()

    def abandon(self) -> None:
        """The buffered unfinished episodes will not continue (their envs were reset): write them soon, as they are."""
        with self._write_lock, self._cond:
            if not self._parts:
                return
            ids = np.unique(np.concatenate([p["episode_ids"] for p in self._parts]))
            self._abandoned = np.union1d(self._abandoned, ids)
            self._ready += sum(len(p["states"]) for p in self._parts)
            if self._ready_since is None:
                self._ready_since = time.monotonic()
            self._cond.notify()

    def check(self) -> None:
        """Raise the ``RecordingError`` of a failed write, if any."""
        if self.error is not None:
            raise self.error

    def flush(self) -> str | None:
        """Write the completed episodes buffered now; returns the shard's path (None when nothing was written)."""
        return self._write(final=False)

    def close(self) -> str | None:
        """Stop the writer and write everything left, unfinished episodes too; returns the last shard written."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        return self._write(final=True)

    def totals(self) -> dict:
        """Transitions served and stored, episodes and shards written, and the error (None when all went well)."""
        with self._cond:
            return {"transitions_served": self.recorded, "transitions_stored": self.stored,
                    "episodes_stored": self.episodes, "shards": len(self.shards),
                    "error": None if self.error is None else self.error.as_dict()}

    # -- writing -------------------------------------------------------------------------------
    def _due(self) -> bool:
        return bool(self._ready) and (self._ready >= self.flush_every or
                                      time.monotonic() - self._ready_since >= self.flush_seconds)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._due():
                    wait = None if self._ready_since is None else self._ready_since + self.flush_seconds
                    self._cond.wait(None if wait is None else max(wait - time.monotonic(), 0.0))
                if self._closed or self.error is not None:
                    return
            self._write(final=False)
            if self.error is not None:
                return

    def _write(self, final: bool) -> str | None:
        with self._write_lock:
            with self._cond:
                if self.error is not None or self.directory is None or not self._parts:
                    return None
                parts, self._parts = self._parts, []
                abandoned, self._abandoned = self._abandoned, np.zeros(0, np.int64)
                self._ready, self._ready_since = 0, None
            batch = _concat(parts)
            if final:
                mask = np.ones(len(batch["states"]), bool)
            else:
                ended = np.concatenate([batch["episode_ids"][batch["dones"]], abandoned])
                mask = np.isin(batch["episode_ids"], ended)
            if not mask.all():
                with self._cond:
                    self._parts.insert(0, _take(batch, ~mask))
            if not mask.any():
                return None
            path = self.directory / f"{self.session_id}-{len(self.shards):05d}.npz"
            rows = _take(batch, mask)
            n = int(mask.sum())
            data = TransitionDataset(**{k: v for k, v in rows.items() if k != "rewards"},
                                     lap=np.full(n, self.lap, np.int32), source=np.full(n, SOURCE_SIM, np.uint8),
                                     rewards=rows["rewards"], meta={**self.meta, "session_id": self.session_id})
            try:
                data.save(path)
            except Exception as exc:  # noqa: BLE001 - disk full, read-only, ...: kept as the recorder's error
                with self._cond:
                    self._parts.insert(0, rows)
                    self.error = RecordingError(str(path), f"{type(exc).__name__}: {exc}")
                return None
            with self._cond:
                self.shards.append(str(path))
                self.stored += n
                self.episodes += len(np.unique(rows["episode_ids"]))
            return str(path)


def _concat(parts: list[dict]) -> dict:
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "rewards"}
    out["rewards"] = {k: np.concatenate([p["rewards"][k] for p in parts]) for k in REWARD_KEYS}
    return out


def _take(batch: dict, mask: np.ndarray) -> dict:
    out = {k: v[mask] for k, v in batch.items() if k != "rewards"}
    out["rewards"] = {k: v[mask] for k, v in batch["rewards"].items()}
    return out
