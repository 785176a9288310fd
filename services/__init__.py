"""The simulator service: versioned gRPC proto, server, client and gymnasium VectorEnv adapters.

Imports are lazy: ``services.client`` and ``services.vector_env`` (what a policy worker needs) pull
in numpy, grpc and gymnasium only, never JAX or the physics; the server side loads them on use.

    from services import ServerConfig, ServerProcess, RemoteVectorEnv
    with ServerProcess(ServerConfig(task="pendulum", engine="mujoco")) as server:
        env = RemoteVectorEnv(server.address, "pendulum", num_envs=64, fidelity=0.5)

A server beyond loopback wants a token (``ServerConfig.token_file``; clients: ``token_file=``/``token=``
or ``$FLYWHEEL_TOKEN_FILE``/``$FLYWHEEL_TOKEN``) and may use TLS (``tls_cert_file``/``tls_key_file``;
clients: ``tls_root_cert=`` or ``$FLYWHEEL_TLS_ROOT_CERT``); see ``services.auth``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClientCredentials": "services.auth",
    "SimulatorClient": "services.client",
    "SimulatorError": "services.client",
    "RemoteVectorEnv": "services.vector_env",
    "LanedVectorEnv": "services.lanes",
    "SimulatorVectorEnv": "services.vector_env",
    "LocalVectorEnv": "services.local_env",
    "ServerConfig": "services.config",
    "ServerProcess": "services.server",
    "SimulatorServer": "services.server",
    "serve": "services.server",
}

__all__ = ["ClientCredentials", "LanedVectorEnv", "LocalVectorEnv", "RemoteVectorEnv", "ServerConfig", "ServerProcess",
           "SimulatorClient", "SimulatorError", "SimulatorServer", "SimulatorVectorEnv", "serve"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'services' has no attribute {name!r}")
