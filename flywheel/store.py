"""The trajectory store: append-only shards per lap with an atomically written manifest.

Layout under ``<run_dir>/store``::

    manifest.json                 every shard the store vouches for (lap, kind, source, counts, metrics)
    lap_000/seed.npz              reality seed data (lap 0)
    lap_NNN/raw/*.npz             what the lap's simulator server recorded (the server writes here)
    lap_NNN/selected.npz          the lap's selected self-play trajectories
    lap_NNN/reality.npz           reality transitions the lap spent with its policy (``reality.steps_per_lap``)
    lap_NNN/replay.npz            the engine's replay of self-play a flagged lap exploited (``flywheel.guard``)

Writes go shard first, manifest second, both atomic (temp file, fsync, ``os.replace``). A reader
trusts only the manifest, so a crash between the two leaves an orphan file that is never read and
is overwritten when the stage runs again; a (lap, kind) entry is replaced, never duplicated.
The manifest holds each shard's sha256: a shard that changed after its lap wrote it (a flipped byte,
a truncation, another run's file copied over it) is refused when read, and ``verify`` checks every
shard before a run starts its first stage, so a resumed run does not find out a lap later.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from simulators.dataset import SOURCE_REALITY, SOURCE_SIM, TransitionDataset, atomic_write

KINDS = {"seed": SOURCE_REALITY, "selected": SOURCE_SIM, "reality": SOURCE_REALITY, "replay": SOURCE_SIM,
         "eval": SOURCE_REALITY}


@dataclass
class ShardEntry:
    """One manifest row."""

    lap: int
    kind: str
    source: str
    path: str                       # relative to the store root
    transitions: int
    episodes: int
    successes: int
    metrics: dict = field(default_factory=dict)
    created: float = 0.0
    sha256: str = ""                # of the shard file; "" in manifests written before digests were kept


class TrajectoryStore:
    """Append-only per-lap shards plus a manifest; ``training_data(lap)`` is what the world model learns from."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"

    # -- manifest ------------------------------------------------------------------------------
    def entries(self, lap: int | None = None, kind: str | None = None) -> list[ShardEntry]:
        if not self.manifest_path.exists():
            return []
        try:
            rows = [ShardEntry(**r) for r in json.loads(self.manifest_path.read_text())["shards"]]
        except (ValueError, KeyError, TypeError) as exc:   # not JSON, no "shards", rows of another layout
            raise ValueError(f"trajectory store manifest {self.manifest_path} cannot be read "
                             f"({type(exc).__name__}: {exc}); it was not written by this store") from exc
        return [r for r in rows if (lap is None or r.lap == lap) and (kind is None or r.kind == kind)]

    def _write_manifest(self, rows: list[ShardEntry]) -> None:
        rows = sorted(rows, key=lambda r: (r.lap, r.kind))
        text = json.dumps(strict_json({"version": 1, "shards": [asdict(r) for r in rows]}), indent=1,
                          allow_nan=False).encode()
        atomic_write(self.manifest_path, lambda f: f.write(text))

    # -- shards --------------------------------------------------------------------------------
    def lap_dir(self, lap: int) -> Path:
        return self.root / f"lap_{lap:03d}"

    def add(self, lap: int, kind: str, dataset: TransitionDataset, metrics: dict | None = None) -> ShardEntry:
        """Write the (lap, kind) shard atomically and record it, replacing an earlier entry of the same (lap, kind)."""
        if kind not in KINDS:
            raise ValueError(f"unknown shard kind {kind!r}; allowed: {', '.join(KINDS)}")
        rel = f"{self.lap_dir(lap).name}/{kind}.npz"
        dataset.save(self.root / rel)
        ends = dataset.dones.astype(bool)
        entry = ShardEntry(lap=lap, kind=kind, source="reality" if KINDS[kind] == SOURCE_REALITY else "sim", path=rel,
                           transitions=len(dataset), episodes=len(np.unique(dataset.episode_ids)),
                           successes=int((dataset.success.astype(bool) & ends).sum()),
                           metrics={k: float(v) for k, v in (metrics or {}).items()}, created=time.time(),
                           sha256=file_sha256(self.root / rel))
        rows = [r for r in self.entries() if not (r.lap == lap and r.kind == kind)]
        self._write_manifest([*rows, entry])
        return entry

    def load(self, lap: int | None = None, kind: str | None = None, upto: int | None = None) -> TransitionDataset | None:
        """Concatenate the manifest's shards matching ``lap``/``kind`` (and ``lap <= upto``); None if there are none."""
        rows = [r for r in self.entries(lap, kind) if upto is None or r.lap <= upto]
        for r in rows:
            problem = self._problem(r)
            if problem:
                raise ValueError(f"trajectory store {self.root}: {problem}")
        parts = [TransitionDataset.load(self.root / r.path) for r in rows]
        return TransitionDataset.concat(parts) if parts else None

    def verify(self, expected: dict[tuple[int, str], str] | None = None) -> None:
        """Check every shard the manifest vouches for: present, and the bytes its lap wrote (sha256); and that
        each ``expected`` (lap, kind) is listed (the value says why it must be: a finished stage).

        Raises ``ValueError`` naming each bad shard, its lap and kind, and what is wrong with it.
        """
        entries = self.entries()
        listed = {(r.lap, r.kind) for r in entries}
        problems = [f"lap {lap}'s {kind} shard is not in the manifest {self.manifest_path} although {why}"
                    for (lap, kind), why in sorted((expected or {}).items()) if (lap, kind) not in listed]
        problems += [p for p in map(self._problem, entries) if p]
        if problems:
            raise ValueError(f"trajectory store {self.root}: {len(problems)} shard(s) are not what their lap wrote: "
                             + "; ".join(problems))

    def _problem(self, r: ShardEntry) -> str:
        path = self.root / r.path
        where = f"{r.path} (lap {r.lap}, {r.kind})"
        if not path.is_file():
            return f"{where} is missing"
        if r.sha256:
            if file_sha256(path) != r.sha256:
                return f"{where} has changed since it was written (its sha256 differs from the manifest's)"
            return ""
        try:                                            # no digest kept: the zip's own CRCs at least
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{where} cannot be read: {exc}"
        return f"{where} is corrupt (CRC error in {bad})" if bad else ""

    def training_data(self, upto: int) -> TransitionDataset:
        """Seed data, every selected trajectory, per-lap reality batch and guard replay of laps ``<= upto``."""
        seed = self.load(kind="seed")
        if seed is None:
            raise FileNotFoundError(f"no seed shard in the trajectory store {self.root}; lap 0 must run first")
        more = [self.load(kind=k, upto=upto) for k in ("selected", "reality", "replay")]
        return TransitionDataset.concat([seed, *(d for d in more if d is not None and len(d))])

    # -- the server's raw recordings -----------------------------------------------------------
    def raw_dir(self, lap: int) -> Path:
        path = self.lap_dir(lap) / "raw"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_raw(self, lap: int) -> None:
        """Drop a lap's raw recordings (a self-play stage that restarts records afresh)."""
        shutil.rmtree(self.lap_dir(lap) / "raw", ignore_errors=True)

    def raw_shards(self, lap: int) -> list[Path]:
        """Completed raw shard files (temp files of an unfinished write start with '.' and are skipped)."""
        path = self.lap_dir(lap) / "raw"
        return sorted(p for p in path.glob("*.npz") if not p.name.startswith(".")) if path.exists() else []

    def read_raw(self, lap: int) -> TransitionDataset | None:
        parts = [TransitionDataset.load(p) for p in self.raw_shards(lap)]
        return TransitionDataset.concat(parts) if parts else None

    def summary(self) -> dict:
        rows = self.entries()
        return {"shards": len(rows), "transitions": sum(r.transitions for r in rows),
                "selected_episodes": sum(r.episodes for r in rows if r.kind == "selected")}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def strict_json(value):
    """``value`` with every non-finite float (numpy's too) replaced by ``None``."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return float(value) if math.isfinite(value) else None
    return value
