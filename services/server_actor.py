"""Simulator servers as Ray actors: how a flywheel lap serves its simulator on a cluster or locally.

    actors = [SimulatorServerActor.options(num_gpus=cfg.num_gpus).remote(cfg) for _ in range(n)]
    addresses = ray.get([a.address.remote() for a in actors])
    ...                                              # policy workers connect over gRPC
    stop_server_actors(actors)                       # graceful: in-flight calls finish, recorders flush

Each actor holds one gRPC server (``services.server.serve``) in its own Ray worker process, so no
channel ever crosses a fork; a dead driver takes its actors with it. With ``host="0.0.0.0"`` the
actor reports its node's IP, so runners on other nodes can reach it.
"""

from __future__ import annotations

import contextlib
import os

import ray

from services.config import ServerConfig


@ray.remote(num_cpus=0, max_restarts=0)
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

    def stop(self, grace: float = 5.0) -> bool:
        self._server.stop(grace)
        return True


def start_server_actors(configs: list[ServerConfig], timeout_s: float = 300.0) -> tuple[list, list[str]]:
    """Start one actor per config (GPU where ``num_gpus`` asks) and wait until each serves; (actors, addresses)."""
    actors = [SimulatorServerActor.options(num_gpus=c.num_gpus or None).remote(c) for c in configs]
    try:
        addresses = ray.get([a.address.remote() for a in actors], timeout=timeout_s)
    except BaseException:
        stop_server_actors(actors)
        raise
    return actors, addresses


def stop_server_actors(actors: list, grace: float = 5.0) -> None:
    """Stop servers gracefully (recorders flush), then end the actors."""
    pending = []
    for a in actors:
        with contextlib.suppress(Exception):  # an actor that is already gone has nothing to flush
            pending.append(a.stop.remote(grace))
    with contextlib.suppress(Exception):      # killed below either way
        ray.get(pending, timeout=grace + 60)
    for a in actors:
        ray.kill(a)
