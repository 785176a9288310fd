"""World-model checkpoint files: one atomically written file, checked by a digest before anything loads.

Layout: ``MAGIC`` + sha256(payload) (32 bytes) + payload, where the payload is a ``torch.save``
of plain tensors and primitives (loaded with ``weights_only=True``). A truncated or altered file
fails the digest and raises ``ValueError`` before any weight is touched.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from simulators.dataset import atomic_write
from simulators.tasks import Task, make_task

MAGIC = b"FLYWHEEL-WM\x00"
FORMAT = 1


def save_checkpoint(wm, path) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT, "version": wm.version, "task": wm.task.name, "state_size": wm.state_size,
        "action_size": wm.action_size, "in_features": wm.in_features, "config": wm.config_dict(),
        "fitted": wm.fitted, "net": {k: v.detach().cpu() for k, v in wm.net.state_dict().items()},
        "norm": {k: v.detach().cpu() for k, v in wm.norm.items()},
        "state_scale": torch.as_tensor(wm.state_scale, dtype=torch.float64),
        "base_params": dict(wm.base_params),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(MAGIC + hashlib.sha256(data).digest() + data))
    return path


def read_payload(path) -> dict:
    """The checkpoint's payload dict; ``ValueError`` for a missing, truncated, corrupt or foreign file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read world-model checkpoint {path}: {exc}") from exc
    if not raw.startswith(MAGIC):
        raise ValueError(f"{path} is not a world-model checkpoint (bad header)")
    digest, data = raw[len(MAGIC):len(MAGIC) + 32], raw[len(MAGIC) + 32:]
    if len(digest) < 32 or hashlib.sha256(data).digest() != digest:
        raise ValueError(f"world-model checkpoint {path} is truncated or corrupt (checksum mismatch)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure is a bad file
        raise ValueError(f"world-model checkpoint {path} cannot be decoded: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"world-model checkpoint {path} has an unsupported format "
                         f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}; "
                         f"expected {FORMAT}")
    return payload


def load_checkpoint(cls, path, task: str | Task | None, state_size: int | None, action_size: int | None,
                    config=None):
    from simulators.world_model.model import ARCHITECTURE, WorldModelConfig

    p = read_payload(path)
    task = make_task(task if task is not None else p["task"])
    diffs = []
    if task.name != p["task"]:
        diffs.append(f"task {p['task']!r} in the checkpoint vs {task.name!r} requested")
    for name, want in (("state_size", state_size), ("action_size", action_size)):
        if want is not None and int(want) != p[name]:
            diffs.append(f"{name} {p[name]} in the checkpoint vs {int(want)} requested")
    if not diffs:
        obs = task.observe(torch.zeros((1, p["state_size"]), dtype=torch.float64)) if task.name == p["task"] else None
        if obs is not None and obs.shape[1] + p["action_size"] != p["in_features"]:
            diffs.append(f"input features {p['in_features']} in the checkpoint vs "
                         f"{obs.shape[1] + p['action_size']} for task {task.name!r}")
    try:
        saved = WorldModelConfig.from_dict(dict(p["config"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"world-model checkpoint {path} holds a config this version cannot use: {exc}") from exc
    if config is not None:
        diffs += [f"world_model.{name} {getattr(saved, name)!r} in the checkpoint vs {getattr(config, name)!r} in the config"
                  for name in ARCHITECTURE if getattr(saved, name) != getattr(config, name)]
    if diffs:
        raise ValueError(f"world-model checkpoint {path} does not match: " + "; ".join(diffs))
    config = saved if config is None else config
    wm = cls(task, p["state_size"], p["action_size"], config, base_params=p.get("base_params"))
    try:
        wm.net.load_state_dict(p["net"])
    except RuntimeError as exc:
        raise ValueError(f"world-model checkpoint {path} has weights that do not fit its config: {exc}") from exc
    wm.norm = {k: v.to(wm.device, torch.float32) for k, v in p["norm"].items()}
    wm.state_scale = p["state_scale"].numpy().astype("float64")
    wm.fitted, wm.version = bool(p["fitted"]), str(p["version"])
    wm.net.eval()
    return wm
