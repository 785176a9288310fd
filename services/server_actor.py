"""Simulator servers as Ray actors: how a flywheel lap serves its simulator on a cluster or locally.

    actors, addresses = start_server_actors(configs, placements)   # ports fixed up front; restartable actors
    ...                                                            # policy workers connect over gRPC
    reports = stop_server_actors(actors, collect=[raw_dir, ...])   # graceful: in-flight calls finish, recordings
    # -> [{"address", "transitions_served", "transitions_stored", "episodes_stored", "shards", "incarnation",
    #      "errors", "collected", ...}] per server; raises RecordingError (path and OS error) if a shard was lost

Each actor holds one gRPC server (``services.server.serve``) in its own Ray worker process, so no
channel ever crosses a fork; a dead driver takes its actors with it. With ``host="0.0.0.0"`` the
actor reports its node's IP, so runners on other nodes can reach it (the server then requires a token).

A ``Placement`` pins an actor to a Ray node (hard node affinity: a restart stays there) and may give it a
*staging* name: the actor then keeps the world model it serves (sent as bytes) and its recordings in
``<tmp>/flywheel-staging/<name>`` on its own node's disk, and ``stop_server_actors(collect=...)`` copies
the recordings into the driver's directory through Ray before the actor ends. A server on another node
never needs the driver's disk.

A killed server actor is restarted by Ray (``ServerConfig.max_restarts`` times) on the same node and port,
chosen before the actor is created, so clients find the new incarnation at the same address; they
re-create their sessions themselves (``RemoteVectorEnv``), nothing is asked of the driver. The new
incarnation records into the same directory under fresh session ids and episode ids. Its report
counts only what it served itself; what the dead one wrote stays in the directory (and is collected).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from services.auth import host_port
from services.config import ServerConfig
from services.recorder import RecordingError

STAGING_ROOT = "flywheel-staging"
WM_FILE = "world_model.pt"
OWNER_FILE = "owner"              # "<pid> <start time>" of the actor recording there (rewritten by a restart)
ABANDONED_AFTER_S = 3600.0        # an ownerless staging directory untouched this long is removed


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one server actor runs and where its files live.

    ``node_id``: the Ray node it is pinned to ("" lets Ray choose). ``staging``: a directory name on that
    node's own disk for its recordings and world model ("" = the config's own paths). ``world_model``: the
    checkpoint's bytes, or an ``ObjectRef`` of them, served from the staging directory (staged actors only).
    """

    node_id: str = ""
    staging: str = ""
    world_model: Any = None


def staging_dir(name: str) -> Path:
    """The staging directory ``name`` on this node (under the system's temp directory)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"staging name {name!r} must be a plain directory name")
    return Path(tempfile.gettempdir()) / STAGING_ROOT / name


def server_device(saved: str, gpu_ids: list, cuda: bool) -> str:
    """Where a server runs its world model: CUDA when Ray gave the actor a GPU (or the checkpoint asks for it)
    and torch sees CUDA, else the CPU."""
    if cuda and (gpu_ids or str(saved).startswith("cuda")):
        return "cuda"
    return "cpu"


def _load_world_model(path: str):
    """The checkpoint at ``path`` on this actor's device (``server_device``)."""
    import torch

    from simulators.world_model import WorldModel, WorldModelConfig
    from simulators.world_model.checkpoint import read_payload

    saved = WorldModelConfig.from_dict(dict(read_payload(path)["config"]))
    device = server_device(saved.device, ray.get_gpu_ids(), torch.cuda.is_available())
    return WorldModel.load(path, config=dataclasses.replace(saved, device=device))


@ray.remote(num_cpus=0)
class SimulatorServerActor:
    """One simulator server in a Ray actor."""

    def __init__(self, config: ServerConfig, staging: str = ""):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        from services.server import serve

        self._staging = staging_dir(staging) if staging else None
        if self._staging is not None:
            config = _stage(config, self._staging)
        if not config.torch_threads:
            from simulators.cpus import usable_cpus

            # Ray sets OMP_NUM_THREADS=1 in an actor that holds no CPU: torch would predict on one thread, not on
            # every core as service.torch_threads=0 means outside Ray
            config = dataclasses.replace(config, torch_threads=usable_cpus())
        self._recordings = Path(config.trajectory_dir) if config.trajectory_dir else None
        model = _load_world_model(config.world_model_path) if config.world_model_path and \
            Path(config.world_model_path).is_file() else None
        self._server = serve(config, model)
        host = config.host
        if host in ("0.0.0.0", "::", "[::]"):
            host = ray.util.get_node_ip_address()
        self._address = host_port(host, self._server.port)

    def address(self) -> str:
        return self._address

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def report(self) -> dict:
        """Totals so far (served, stored, episodes, shards), the incarnation and recording errors."""
        import torch

        return {**self._server.report(), "address": self._address, "torch_threads": torch.get_num_threads()}

    def stop(self, grace: float = 5.0) -> dict:
        """Stop serving, write every session's recordings; returns ``report()``."""
        self._server.stop(grace)
        return self.report()

    def recordings(self) -> list[str]:
        """Names of the completed shard files in the recording directory (every incarnation's)."""
        if self._recordings is None or not self._recordings.is_dir():
            return []
        return sorted(p.name for p in self._recordings.glob("*.npz") if not p.name.startswith("."))

    def read_recording(self, name: str) -> bytes:
        """One shard's bytes (``name`` from ``recordings()``)."""
        if name not in self.recordings():
            raise FileNotFoundError(f"no recorded shard {name!r} in {self._recordings}")
        return (self._recordings / name).read_bytes()

    def drop_staging(self) -> None:
        """Remove this server's staging directory (after its recordings were collected)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def _stage(config: ServerConfig, directory: Path) -> ServerConfig:
    """``config`` recording into ``directory/raw`` and serving the world model staged there (``prepare``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OWNER_FILE).write_text(_process_id(os.getpid()))
    changes: dict = {"trajectory_dir": str(directory / "raw") if config.trajectory_dir else None}
    if (directory / WM_FILE).is_file():
        changes["world_model_path"] = str(directory / WM_FILE)
    return dataclasses.replace(config, **changes)


def free_port(host: str) -> int:
    """A port that is free on this machine for ``host`` now (the actor binds it, and binds it again after a restart)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def _pinned(node_id: str) -> Any:
    return NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id else "DEFAULT"


def _process_id(pid: int) -> str:
    """``"<pid> <start time>"``: a process's identity that a later process reusing the pid does not share."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid} {start}"


def _owner_alive(directory: Path) -> bool:
    try:
        pid, start = (directory / OWNER_FILE).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False                                    # never owned, or owned before owners were written
    if start == "?":                                    # written where /proc is not: cannot tell, keep it
        return True
    return _process_id(pid) == f"{pid} {start}"


def remove_abandoned_staging(root: Path | None = None, after_s: float = ABANDONED_AFTER_S) -> list[str]:
    """Remove this node's staging directories whose server is gone and that nothing touched for ``after_s``.

    What a killed run (its driver gone, so its actors too) left on a node's disk: the world model and the
    recordings no lap will collect. A directory whose owner lives, or that changed recently (being staged,
    or its actor restarting), stays. Returns the names removed.
    """
    import time

    root = Path(tempfile.gettempdir()) / STAGING_ROOT if root is None else Path(root)
    removed = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            touched = max(p.stat().st_mtime for p in (d, d / "raw", d / OWNER_FILE) if p.exists())
        except OSError:
            continue
        if d.is_dir() and time.time() - touched > after_s and not _owner_alive(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def prepare(host: str, staging: str = "", world_model: bytes | None = None) -> int:
    """On an actor's node before it starts: remove staging a dead run left, stage its world model
    (``staging``), and return a free port for ``host``."""
    if staging:
        try:
            remove_abandoned_staging()
        except OSError as exc:                          # housekeeping: never a reason not to serve
            logging.getLogger(__name__).warning("could not remove abandoned staging directories: %s", exc)
    if staging and world_model is not None:
        from simulators.dataset import atomic_write

        atomic_write(staging_dir(staging) / WM_FILE, lambda f: f.write(world_model))
    return free_port(host)


def _prepare_on(p: Placement, host: str) -> Any:
    """``prepare`` here (this node, nothing staged: the port itself) or as a task pinned to ``p.node_id`` (a ref)."""
    if not p.staging and (not p.node_id or p.node_id == ray.get_runtime_context().get_node_id()):
        return free_port(host)
    task = ray.remote(prepare).options(num_cpus=0, scheduling_strategy=_pinned(p.node_id), max_retries=0)
    return task.remote(host, p.staging, p.world_model)


def start_server_actors(configs: list[ServerConfig], placements: list[Placement] | None = None,
                        timeout_s: float = 300.0) -> tuple[list, list[str]]:
    """Start one restartable actor per config (the ``num_gpus`` and ``num_cpus`` it asks for, on its ``Placement``) and wait
    until each serves.

    A config with ``port=0`` gets a port that is free on the actor's node first, so that a restarted
    actor binds the same one; a staged actor's world model is written on its node before it starts (the
    actor gets no object-store arguments, and a restart finds the file). Returns ``(actors, addresses)``.
    """
    placements = list(placements) if placements is not None else [Placement() for _ in configs]
    if len(placements) != len(configs):
        raise ValueError(f"start_server_actors: {len(configs)} configs but {len(placements)} placements; give one each")
    if any(p.staging and not p.node_id for p in placements):
        raise ValueError("start_server_actors: a Placement with staging needs its node_id (the staging directory is "
                         "on that node's disk)")
    ready = [_prepare_on(p, c.host) for c, p in zip(configs, placements)]
    ports = [r if isinstance(r, int) else ray.get(r, timeout=timeout_s) for r in ready]
    configs = [c if c.port else dataclasses.replace(c, port=port) for c, port in zip(configs, ports)]
    actors = []
    try:
        for c, p in zip(configs, placements):
            options = {"num_gpus": c.num_gpus or None, "num_cpus": float(c.num_cpus), "max_restarts": int(c.max_restarts),
                       "max_task_retries": -1 if c.max_restarts else 0, "scheduling_strategy": _pinned(p.node_id)}
            args = (c, p.staging) if p.staging else (c,)
            actors.append(SimulatorServerActor.options(**options).remote(*args))
        addresses = ray.get([a.address.remote() for a in actors], timeout=timeout_s)
    except BaseException:
        _kill(actors)
        raise
    return actors, addresses


def stop_server_actors(actors: list, grace: float = 5.0, collect: list[str | os.PathLike | None] | None = None) -> list[dict]:
    """Stop servers gracefully (recordings written), end the actors; returns one report per server.

    ``collect[i]``, where given, is a directory on this machine: server ``i``'s shards are copied there
    (atomically, through Ray) and its staging directory removed before the actor ends (``collected``
    counts them). Raises ``RecordingError`` naming the path and the error when a server failed to write
    a shard or one could not be copied. A server that could not be stopped (it died for good) is
    reported with ``stop_error`` and zero totals.
    """
    collect = list(collect) if collect is not None else [None] * len(actors)
    pending = []
    for a in actors:
        try:
            pending.append(a.stop.remote(grace))
        except Exception as exc:  # noqa: BLE001 - reported below
            pending.append(exc)
    reports = []
    for ref in pending:
        try:
            if isinstance(ref, Exception):
                raise ref
            reports.append(ray.get(ref, timeout=grace + 60))
        except Exception as exc:  # noqa: BLE001 - a dead actor has nothing left to write
            reports.append({"address": "", "transitions_served": 0, "transitions_stored": 0, "episodes_stored": 0,
                            "shards": 0, "incarnation": -1, "errors": [],
                            "stop_error": f"{type(exc).__name__}: {exc}"})
    for actor, report, dest in zip(actors, reports, collect):
        if dest is not None and not report.get("stop_error"):
            report["collected"], errors = collect_recordings(actor, Path(dest))
            report["errors"] = [*report["errors"], *errors]
    _kill(actors)
    failed = [(r["address"], e) for r in reports for e in r["errors"]]
    if failed:
        (address, first), rest = failed[0], failed[1:]
        error = RecordingError(first["path"], first["error"], f"server {address}" + (
            f"; {len(rest)} more failed write(s): " + "; ".join(f"{e['path']}: {e['error']}" for _, e in rest)
            if rest else ""))
        error.reports = reports
        raise error
    return reports


def collect_recordings(actor, dest: Path, timeout_s: float = 600.0) -> tuple[int, list[dict]]:
    """Copy a server's shards into ``dest`` one at a time, then drop its staging directory.

    Returns ``(shards copied, errors)``; each error is ``{"path", "error"}`` like a recorder's.
    """
    from simulators.dataset import atomic_write

    try:
        names = ray.get(actor.recordings.remote(), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the actor's node may be gone
        return 0, [{"path": str(dest), "error": f"cannot list the server's recordings: {type(exc).__name__}: {exc}"}]
    copied, errors = 0, []
    for name in names:
        try:
            blob = ray.get(actor.read_recording.remote(name), timeout=timeout_s)
            atomic_write(dest / name, lambda f, b=blob: f.write(b))
            copied += 1
        except Exception as exc:  # noqa: BLE001 - every lost shard is reported
            errors.append({"path": str(dest / name), "error": f"{type(exc).__name__}: {exc}"})
    if not errors:
        try:
            ray.get(actor.drop_staging.remote(), timeout=timeout_s)
        except Exception:  # noqa: BLE001, S110 - a leftover temp directory loses nothing
            pass
    return copied, errors


def _kill(actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001, S110 - already gone
            pass
