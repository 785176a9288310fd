"""Verified policy files and checkpoint manifests (no Ray): every defect is a CheckpointError naming the file."""

import json
import os

import numpy as np
import pytest
import torch

from policies.checkpoint import CheckpointError, read_manifest, state_digest, write_manifest
from policies.torch_policy import TorchPolicy


def _policy() -> TorchPolicy:
    torch.manual_seed(0)
    return TorchPolicy(3, [-1.0, 0.0], [1.0, 4.0], [8, 8], "tanh")


def _flip(path, offset: int, n: int = 8) -> None:
    raw = bytearray(open(path, "rb").read())
    for i in range(offset, offset + n):
        raw[i] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def test_policy_file_round_trip_and_header(tmp_path):
    obs = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    policy = _policy()
    path = tmp_path / "policy.pt"
    policy.save(str(path))
    assert path.read_bytes().startswith(b"FLYWHEEL-PI\x00")
    assert os.listdir(tmp_path) == ["policy.pt"]                 # no temp file left beside it
    np.testing.assert_array_equal(TorchPolicy.load(str(path))(obs), policy(obs))


@pytest.mark.parametrize("where", ["header", "digest", "payload", "end"])
def test_flipped_bytes_in_a_policy_file_are_refused(tmp_path, where):
    path = tmp_path / "policy.pt"
    _policy().save(str(path))
    size = path.stat().st_size
    _flip(path, {"header": 0, "digest": 14, "payload": size // 2, "end": size - 8}[where])
    with pytest.raises(CheckpointError, match=str(path)):
        TorchPolicy.load(str(path))


@pytest.mark.parametrize("keep", [0, 5, 40, -1])
def test_truncated_policy_file_is_refused_with_its_name(tmp_path, keep):
    path = tmp_path / "policy.pt"
    _policy().save(str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(CheckpointError, match=f"{path}.*(truncated|empty)"):
        TorchPolicy.load(str(path))


def test_missing_policy_file_and_directory_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"cannot read policy file {tmp_path / 'nope.pt'}"):
        TorchPolicy.load(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        TorchPolicy.load(str(tmp_path))                          # a directory, not a file
    assert issubclass(CheckpointError, ValueError)


def test_a_plain_torch_file_is_not_a_policy_file(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"config": _policy().config(), "state_dict": _policy().state_dict()}, str(path))
    with pytest.raises(CheckpointError, match="bad header"):
        TorchPolicy.load(str(path))


def test_state_digest_is_order_free_and_sees_one_changed_value():
    rng = np.random.default_rng(0)
    state = {"b": rng.normal(size=(3, 2)).astype(np.float32), "a": rng.normal(size=4).astype(np.float32)}
    d = state_digest(state)
    assert d == state_digest(dict(reversed(list(state.items()))))
    assert d == state_digest({k: torch.from_numpy(v) for k, v in state.items()})
    changed = {**state, "a": state["a"].copy()}
    changed["a"][2] = np.nextafter(changed["a"][2], np.float32(np.inf))
    assert state_digest(changed) != d
    assert state_digest(state, ["a"]) != d and state_digest(state, ["a"]) == state_digest({"a": state["a"]})
    assert state_digest({"x": np.zeros((2, 3))}) != state_digest({"x": np.zeros((3, 2))})


def _checkpoint_dir(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(bytes(range(256)) * 4)
    (d / "sub" / "b.pkl").write_bytes(b"payload" * 10)
    write_manifest(d, {"iteration": 3})
    return d


def test_manifest_lists_every_file_and_checks_it(tmp_path):
    d = _checkpoint_dir(tmp_path)
    meta = read_manifest(d)
    assert set(meta["files"]) == {"a.bin", "sub/b.pkl"} and meta["iteration"] == 3
    _flip(d / "sub" / "b.pkl", 3)
    with pytest.raises(CheckpointError, match=f"{d / 'sub' / 'b.pkl'} is corrupt"):
        read_manifest(d)


def test_manifest_refuses_truncated_missing_and_tampered(tmp_path):
    d = _checkpoint_dir(tmp_path)
    (d / "a.bin").write_bytes((d / "a.bin").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{d / 'a.bin'} is truncated"):
        read_manifest(d)
    d = _checkpoint_dir(tmp_path / "2")
    (d / "sub" / "b.pkl").unlink()
    with pytest.raises(CheckpointError, match="missing sub/b.pkl"):
        read_manifest(d)
    d = _checkpoint_dir(tmp_path / "3")
    manifest = json.loads((d / "flywheel_policy.json").read_text())
    manifest["iteration"] = 4
    (d / "flywheel_policy.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest .* is corrupt"):
        read_manifest(d)
    (d / "flywheel_policy.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_manifest(d)
    (d / "flywheel_policy.json").unlink()
    with pytest.raises(CheckpointError, match="no flywheel_policy.json"):
        read_manifest(d)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'gone'} does not exist"):
        read_manifest(tmp_path / "gone")
