"""Verified policy checkpoints: digests of weights, single files and whole checkpoint directories.

Three kinds of check, all raising ``CheckpointError`` (a ``ValueError``) that names the file:

- a single file (a ``TorchPolicy``): ``MAGIC`` + sha256(payload) + payload, where the payload is a
  ``torch.save`` of plain tensors and primitives, read back with ``weights_only=True``;
- a directory (a trainer checkpoint written by RLlib): ``flywheel_policy.json`` lists every file with
  its size and sha256, and carries a digest of its own content;
- weights in memory: ``state_digest`` is a sha256 over sorted keys, shapes and float32 bytes, the same
  on the learner and on every EnvRunner when they hold the same weights.

No RLlib and no JAX here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "flywheel_policy.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, altered or not of the expected kind; the message names the file."""


# -- weights ---------------------------------------------------------------------------------------
def state_digest(state: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """sha256 (hex) over ``keys`` (default: all) of a state dict: name, shape and float32 bytes of each value."""
    names = sorted(state if keys is None else keys)
    h = hashlib.sha256()
    for name in names:
        value = state[name]
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arr = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        h.update(f"{name}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# -- single files ----------------------------------------------------------------------------------
def write_verified(path: str | Path, payload: dict, magic: bytes) -> Path:
    """Write ``payload`` (torch-serialisable) as ``magic`` + sha256 + bytes, atomically."""
    import torch

    from simulators.dataset import atomic_write

    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(magic + hashlib.sha256(data).digest() + data))
    return Path(path)


def read_verified(path: str | Path, magic: bytes, what: str) -> dict:
    """The payload written by ``write_verified``; ``CheckpointError`` naming ``path`` for any defect."""
    import torch

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not raw.startswith(magic):
        raise CheckpointError(f"{path} is not a {what} (bad header: expected {magic!r}); "
                              f"{'the file is empty' if not raw else 'it is truncated or another kind of file'}")
    digest, data = raw[len(magic):len(magic) + 32], raw[len(magic) + 32:]
    if len(digest) < 32 or hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"{what} {path} is truncated or corrupt (sha256 mismatch over {len(data)} bytes)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad file
        raise CheckpointError(f"{what} {path} cannot be decoded: {exc}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{what} {path} holds a {type(payload).__name__}, expected a dict")
    return payload


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- directories -----------------------------------------------------------------------------------
def _files(directory: Path) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _self_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: str | Path, meta: Mapping[str, Any]) -> dict:
    """Write ``MANIFEST`` in ``directory``: ``meta`` + size and sha256 of every other file + its own digest."""
    from simulators.dataset import atomic_write

    directory = Path(directory)
    files = {rel: {"size": (directory / rel).stat().st_size, "sha256": file_sha256(directory / rel)}
             for rel in _files(directory)}
    manifest = {**meta, "format": MANIFEST_FORMAT, "files": files}
    manifest["digest"] = _self_digest(manifest)
    atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))
    return manifest


def read_manifest(directory: str | Path, what: str = "policy checkpoint") -> dict:
    """The manifest of ``directory`` after checking it and every file it lists; ``CheckpointError`` otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{what} {directory} does not exist (or is not a directory)")
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory} is not a {what}: no {MANIFEST} in it") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} manifest {path} cannot be read: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{what} manifest {path} has format {found!r}, expected {MANIFEST_FORMAT} "
                              f"(a checkpoint written before files were verified cannot be trusted; retrain it)")
    if manifest.get("digest") != _self_digest(manifest):
        raise CheckpointError(f"{what} manifest {path} is corrupt (its digest does not match its content)")
    for rel, want in manifest["files"].items():
        file = directory / rel
        if not file.is_file():
            raise CheckpointError(f"{what} {directory} is missing {rel} (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{what} file {file} is truncated or altered: {size} bytes, expected {want['size']}")
        if file_sha256(file) != want["sha256"]:
            raise CheckpointError(f"{what} file {file} is corrupt (sha256 mismatch)")
    return manifest


def replace_directory(tmp: str, path: str) -> str:
    """Move the finished checkpoint directory ``tmp`` to ``path``, replacing an older one without a moment
    where neither exists."""
    old = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
