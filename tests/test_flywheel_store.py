"""Trajectory store (atomic shards + manifest) and trajectory selection."""

import zipfile

import numpy as np
import pytest

from flywheel.config import SelectionSection
from flywheel.selection import REASONS, select_episodes
from flywheel.store import TrajectoryStore
from simulators.dataset import SOURCE_SIM, TransitionDataset


def episodes(n_eps, length, success, first_id=0, lap=1, imagination=1.0, physics=0.0, complete=True):
    """``n_eps`` episodes of ``length`` steps; per-episode success / imagination / physics values."""
    rows = n_eps * length
    ids = np.repeat(np.arange(first_id, first_id + n_eps), length)
    steps = np.tile(np.arange(length), n_eps).astype(np.int32)
    dones = (steps == length - 1) if complete else np.zeros(rows, bool)
    succ = np.repeat(np.broadcast_to(success, n_eps), length) & dones
    rng = np.random.default_rng(first_id)
    rewards = {"task": np.full(rows, 0.5, np.float32),
               "imagination": np.repeat(np.broadcast_to(imagination, n_eps), length).astype(np.float32),
               "physics": np.repeat(np.broadcast_to(physics, n_eps), length).astype(np.float32)}
    return TransitionDataset(rng.normal(size=(rows, 2)).astype(np.float32), rng.normal(size=(rows, 1)).astype(np.float32),
                             rng.normal(size=(rows, 2)).astype(np.float32), ids.astype(np.int64), steps, dones,
                             succ, np.full(rows, lap, np.int32), np.full(rows, SOURCE_SIM, np.uint8), rewards)


def test_add_replaces_instead_of_duplicating(tmp_path):
    store = TrajectoryStore(tmp_path)
    store.add(0, "seed", episodes(3, 10, True, lap=0))
    store.add(1, "selected", episodes(2, 10, True, first_id=100))
    store.add(1, "selected", episodes(4, 10, True, first_id=100))   # the stage ran again
    assert [(e.lap, e.kind, e.episodes) for e in store.entries()] == [(0, "seed", 3), (1, "selected", 4)]
    assert len(store.training_data(1)) == 70
    assert len(store.training_data(0)) == 30
    with pytest.raises(ValueError, match="seed, selected"):
        store.add(1, "bogus", episodes(1, 10, True))


def test_a_crash_between_shard_and_manifest_is_never_read(tmp_path):
    store = TrajectoryStore(tmp_path)
    store.add(0, "seed", episodes(3, 10, True, lap=0))
    # an orphan shard written but never recorded in the manifest, plus a half-written temp file
    episodes(5, 10, True).save(tmp_path / "lap_001" / "selected.npz")
    (tmp_path / "lap_001" / ".selected.npz.abc.tmp").write_bytes(b"PK\x03\x04 half")
    assert store.load(kind="selected") is None
    assert len(store.training_data(1)) == 30


def test_raw_shards_skip_temp_files_and_clear(tmp_path):
    store = TrajectoryStore(tmp_path)
    raw = store.raw_dir(1)
    episodes(2, 10, True).save(raw / "s1-000.npz")
    (raw / ".s1-001.npz.x.tmp").write_bytes(b"partial")
    assert [p.name for p in store.raw_shards(1)] == ["s1-000.npz"]
    assert len(store.read_raw(1)) == 20
    store.clear_raw(1)
    assert store.read_raw(1) is None


def test_selection_keeps_successful_accurate_plausible_episodes():
    data = TransitionDataset.concat([
        episodes(2, 10, True, first_id=0),                       # kept
        episodes(2, 10, False, first_id=10),                     # not successful
        episodes(2, 10, True, first_id=20, imagination=0.2),     # inaccurate imagination
        episodes(2, 10, True, first_id=30, physics=-0.9),        # implausible physics
        episodes(1, 10, True, first_id=40, complete=False),      # cut off by the end of training
    ])
    cfg = SelectionSection(require_success=True, min_imagination_accuracy=0.5, max_physics_violation=0.5)
    chosen, stats = select_episodes(data, cfg, horizon=5)
    assert set(np.unique(chosen.episode_ids)) == {0, 1}
    assert stats["selected_episodes"] == 2 and stats["selected_transitions"] == 20 and stats["episodes"] == 9
    assert stats["rejected/not_successful"] == 2
    assert stats["rejected/low_imagination_accuracy"] == 2
    assert stats["rejected/high_physics_violation"] == 2
    assert stats["rejected/incomplete"] == 1


def test_each_rejected_episode_is_counted_once_under_its_first_reason():
    data = TransitionDataset.concat([
        episodes(2, 10, True, first_id=0),                                    # kept
        episodes(3, 10, False, first_id=10, imagination=0.2, physics=-0.9),   # fails three checks
        episodes(1, 10, False, first_id=20, complete=False),                  # incomplete (so not successful either)
    ])
    cfg = SelectionSection(require_success=True, min_imagination_accuracy=0.5, max_physics_violation=0.5)
    _, stats = select_episodes(data, cfg, horizon=5)
    rejected = {r: stats[f"rejected/{r}"] for r in REASONS}
    assert rejected == {"incomplete": 1, "not_successful": 3, "low_imagination_accuracy": 0,
                        "high_physics_violation": 0, "over_cap": 0}
    assert sum(rejected.values()) == stats["episodes"] - stats["selected_episodes"] == 4
    assert stats["failed/low_imagination_accuracy"] == 3 and stats["failed/high_physics_violation"] == 3


def test_selection_only_counts_closed_windows_and_caps(tmp_path):
    data = episodes(4, 10, True)
    closed = (data.steps + 1) % 5 == 0
    data.rewards["imagination"] = np.where(closed, 0.9, 0.0).astype(np.float32)  # 0 where no window closed
    _, stats = select_episodes(data, SelectionSection(min_imagination_accuracy=0.8, max_episodes=3), horizon=5)
    assert stats["selected_episodes"] == 3 and stats["rejected/over_cap"] == 1
    assert stats["mean_imagination_accuracy"] == pytest.approx(0.9)
    short = episodes(2, 3, True)                                  # 3-step episodes: no window of 5 ever closes
    _, none_closed = select_episodes(short, SelectionSection(require_success=False), horizon=5)
    assert np.isnan(none_closed["mean_imagination_accuracy"]) and np.isnan(none_closed["mean_physics_violation"])
    store = TrajectoryStore(tmp_path)                             # the manifest stays strict JSON: null, not NaN
    store.add(0, "selected", short, none_closed)
    assert '"mean_imagination_accuracy": null' in store.manifest_path.read_text()
    assert select_episodes(None, SelectionSection(), 5) == (None, select_episodes(None, SelectionSection(), 5)[1])


def test_a_shard_changed_after_its_lap_is_refused_naming_it(tmp_path):
    store = TrajectoryStore(tmp_path)
    store.add(0, "seed", episodes(3, 10, True, lap=0))
    store.add(1, "selected", episodes(2, 10, True, first_id=100))
    store.verify()                                                     # untouched: nothing to say
    seed = tmp_path / "lap_000" / "seed.npz"
    good = seed.read_bytes()

    # another run's valid shard copied over it: np.load would read it without complaint
    episodes(3, 10, False, lap=0).save(seed)
    with pytest.raises(ValueError, match=r"lap_000/seed.npz \(lap 0, seed\) has changed since it was written"):
        store.verify()
    with pytest.raises(ValueError, match=r"lap_000/seed.npz \(lap 0, seed\) has changed"):
        store.training_data(1)
    assert len(store.load(kind="selected")) == 20                      # the other shard still reads

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    seed.write_bytes(bytes(flipped))
    (tmp_path / "lap_001" / "selected.npz").unlink()
    with pytest.raises(ValueError, match=r"2 shard\(s\).*lap_000/seed.npz \(lap 0, seed\) has changed.*"
                                         r"lap_001/selected.npz \(lap 1, selected\) is missing"):
        store.verify()
    seed.write_bytes(good)
    assert len(store.load(kind="seed")) == 30


def test_a_manifest_without_digests_still_reads(tmp_path):
    import json

    store = TrajectoryStore(tmp_path)
    store.add(0, "seed", episodes(3, 10, True, lap=0))
    manifest = json.loads(store.manifest_path.read_text())
    assert len(manifest["shards"][0].pop("sha256")) == 64
    store.manifest_path.write_text(json.dumps(manifest))              # as a store written before digests were kept
    store.verify()
    assert len(store.training_data(0)) == 30 and store.entries()[0].sha256 == ""
    seed = tmp_path / "lap_000" / "seed.npz"
    data = bytearray(seed.read_bytes())
    with zipfile.ZipFile(seed) as z:                                   # the last byte of the states' array
        member = z.getinfo("states.npy")
    at = member.header_offset                                          # its local header: 30 bytes, name, extra
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")
    data[start + member.compress_size - 1] ^= 0xFF
    seed.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"lap_000/seed.npz \(lap 0, seed\) is corrupt \(CRC error in states\.npy\)"):
        store.verify()
    seed.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match=r"lap_000/seed.npz \(lap 0, seed\) cannot be read"):
        store.verify()


@pytest.mark.parametrize("text", ['{"version": 1, "shards": [{"lap": 0', '{"version": 1}',
                                  '{"version": 1, "shards": [{"lap": 0, "colour": "red"}]}'])
def test_a_manifest_that_cannot_be_read_is_named(tmp_path, text):
    store = TrajectoryStore(tmp_path)
    store.add(0, "seed", episodes(3, 10, True, lap=0))
    store.manifest_path.write_text(text)
    with pytest.raises(ValueError, match=r"trajectory store manifest .*manifest.json cannot be read"):
        store.verify()
