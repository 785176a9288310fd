"""Simulator servers as Ray actors: how a flywheel lap serves its simulator on a cluster or locally.

    actors, addresses = start_server_actors(configs)     # ports fixed up front; restartable actors
    ...                                                   # policy workers connect over gRPC
    reports = stop_server_actors(actors)                  # graceful: in-flight calls finish, recordings written
    # -> [{"address", "transitions_served", "transitions_stored", "episodes_stored", "shards", "incarnation",
    #      "errors", ...}] per server; raises RecordingError (path and OS error) if any shard write failed

Each actor holds one gRPC server (``services.server.serve``) in its own Ray worker process, so no
channel ever crosses a fork; a dead driver takes its actors with it. With ``host="0.0.0.0"`` the
actor reports its node's IP, so runners on other nodes can reach it.

A killed server actor is restarted by Ray (``ServerConfig.max_restarts`` times) on the same port,
chosen before the actor is created, so clients find the new incarnation at the same address; they
re-create their sessions themselves (``RemoteVectorEnv``), nothing is asked of the driver. The new
incarnation records into the same directory under fresh session ids and episode ids. Its report
counts only what it served itself; what the dead one wrote stays on disk.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import ray

from services.config import ServerConfig
from services.recorder import RecordingError


@ray.remote(num_cpus=0)
class SimulatorServerActor:
    """One simulator server in a Ray actor."""

    def __init__(self, config: ServerConfig):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        from services.server import serve

        self._server = serve(config)
        host = config.host
        if host in ("0.0.0.0", "::", "[::]"):
            host = ray.util.get_node_ip_address()
        self._address = f"{host}:{self._server.port}"

    def address(self) -> str:
        return self._address

    def pid(self) -> int:
        return os.getpid()

    def report(self) -> dict:
        """Totals so far (served, stored, episodes, shards), the incarnation and recording errors."""
        return {**self._server.report(), "address": self._address}

    def stop(self, grace: float = 5.0) -> dict:
        """Stop serving, write every session's recordings; returns ``report()``."""
        self._server.stop(grace)
        return self.report()


def free_port(host: str) -> int:
    """A port that is free on this machine for ``host`` now (the actor binds it, and binds it again after a restart)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def start_server_actors(configs: list[ServerConfig], timeout_s: float = 300.0) -> tuple[list, list[str]]:
    """Start one restartable actor per config (GPU where ``num_gpus`` asks) and wait until each serves.

    A config with ``port=0`` gets a free port of this machine first, so that a restarted actor binds
    the same one. Returns ``(actors, addresses)``.
    """
    configs = [c if c.port else dataclasses.replace(c, port=free_port(c.host)) for c in configs]
    actors = [SimulatorServerActor.options(num_gpus=c.num_gpus or None, max_restarts=int(c.max_restarts),
                                           max_task_retries=-1 if c.max_restarts else 0).remote(c) for c in configs]
    try:
        addresses = ray.get([a.address.remote() for a in actors], timeout=timeout_s)
    except BaseException:
        _kill(actors)
        raise
    return actors, addresses


def stop_server_actors(actors: list, grace: float = 5.0) -> list[dict]:
    """Stop servers gracefully (recordings written), end the actors; returns one report per server.

    Raises ``RecordingError`` naming the path and the OS error when a server failed to write a shard.
    A server that could not be stopped (it died for good) is reported with ``stop_error`` and zero totals.
    """
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


def _kill(actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001, S110 - already gone
            pass
