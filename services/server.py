"""The simulator server: sessions of the corrected simulator over gRPC, graded and recorded.

    server = serve(ServerConfig(port=0), world_model=wm)   # in-process; .address, .port, .stop(grace), .wait()
    with ServerProcess(config) as proc:                      # a spawned process (never fork with gRPC)
        env = RemoteVectorEnv(proc.address, "pendulum", num_envs=64)
    python -m services.server task=pendulum port=50051       # standalone: ServerConfig fields as key=value
    flywheel serve --port 50051 service.max_sessions=8       # the same through the flywheel's config layers

Before it binds, ``serve`` checks what a client would otherwise find out too late: the config's
ranges, the token and certificates, the world model, and that a session of the task can really be
opened (engine, physics parameters, world model of the task); only then does it report SERVING.
A server bound beyond loopback refuses to start without a token (``services.auth``). The servicer
(``services.servicer``) answers bad input with a status code and a message naming what was wrong;
standard health checking and reflection (v1 and v1alpha) are served and stay open to probes.
``stop`` finishes in-flight calls, then writes every session's recordings and returns the server's
``report()``: transitions served and stored, episodes and shards written, session counts, and the
recording errors (path and OS error), if any.

A server restarted after a crash (same config, same trajectory directory) is a new incarnation:
its session ids, shard names and episode ids never collide with those its dead incarnation wrote.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import sys
import threading
import time
import traceback
from concurrent import futures
from typing import Self

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from services.auth import AuthError, TokenInterceptor, group_readable, host_port, is_loopback, load_token, server_credentials
from services.client import channel_options
from services.config import ServerConfig
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.proto.flywheel.simulator.v1 import simulator_pb2_grpc as pb_grpc
from services.recorder import RecordingError
from services.servicer import SimulatorService
from services.session import ServiceError

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Simulator"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class BindError(RuntimeError):
    """The server could not listen on its host and port."""


class SimulatorServer:
    """A running server: ``address``, ``port``, ``stop(grace)``, ``wait()``."""

    def __init__(self, grpc_server: grpc.Server, service: SimulatorService, health_servicer, host: str, port: int):
        self._server, self.service, self._health = grpc_server, service, health_servicer
        self.host, self.port = host, port
        self.address = host_port(host, port)
        self._stopped = False

    def stop(self, grace: float | None = 5.0) -> dict:
        """Refuse new calls, let in-flight ones finish for up to ``grace`` seconds, write the recordings;
        returns ``report()``."""
        if not self._stopped:
            self._stopped = True
            self._health.enter_graceful_shutdown()
            self._server.stop(grace).wait()
            self.service.close_all()
        return self.report()

    def report(self) -> dict:
        """The service's totals, session counts and recording errors, with this server's address."""
        return {"address": self.address, **self.service.report()}

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def serve(config: ServerConfig, world_model=None) -> SimulatorServer:
    """Check ``config`` (a session of its task must open), bind (port 0 picks a free one) and start serving.

    Raises ``ValueError`` (``AuthError`` and ``ServiceError``'s reasons included) for bad input and
    ``BindError`` when the address cannot be bound, before any client could see the server.
    """
    config.validate()
    token, credentials = _security(config)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    service = SimulatorService(config, world_model)
    try:
        service.check()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="grpc-handler"),
                             options=[*channel_options(config.max_message_mb), ("grpc.so_reuseport", 0)],
                             interceptors=[TokenInterceptor(token)] if token else [])
        pb_grpc.add_SimulatorServicer_to_server(service, server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        _enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
        port = _bind(server, config, credentials)
    except BaseException:
        service.close_all()
        raise
    server.start()
    service.leases.start_reaper()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return SimulatorServer(server, service, health_servicer, config.host, port)


def _security(config: ServerConfig):
    """The token (or None) and the TLS credentials (or None); refuses a server beyond loopback without a token."""
    token = load_token(config.token_file)
    loopback = is_loopback(config.host)
    if not token and not loopback:
        raise AuthError(f"ServerConfig.host {config.host!r} listens beyond loopback, so the server needs a token: "
                        "set ServerConfig.token_file (service.token_file) or $FLYWHEEL_TOKEN_FILE / $FLYWHEEL_TOKEN; "
                        "clients send it with SimulatorClient(token=...) or the same variables")
    if config.token_file and group_readable(config.token_file):
        log.warning("token file %s can be read by other users; chmod 600 it", config.token_file)
    credentials = None
    if config.tls_cert_file:
        credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    elif token and not loopback:
        log.warning("serving on %s with a token but without TLS: the token crosses the network in clear text; "
                    "set tls_cert_file and tls_key_file", config.host)
    return token, credentials


def _enable_reflection(server: grpc.Server, names: tuple[str, ...]) -> None:
    """Server reflection under v1alpha and v1 (the same messages on the wire, so one servicer answers both)."""
    servicer = reflection.ReflectionServicer((*names, reflection.SERVICE_NAME, REFLECTION_V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1,
                                                                          {"ServerReflectionInfo": handler}),))


def _bind(server: grpc.Server, config: ServerConfig, credentials) -> int:
    address = host_port(config.host, config.port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise BindError(f"cannot bind {address}: the address is in use or not this machine's; "
                        "choose another port (0 picks a free one)")
    return port


# -- processes -----------------------------------------------------------------------------------
def _process_main(config: ServerConfig, conn, grace: float) -> None:
    try:
        server = serve(config)
    except BaseException:  # noqa: BLE001 - report the reason to the parent
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", server.address))
    try:
        conn.recv()                        # "stop", or EOF when the parent is gone
    except EOFError:
        pass
    report = server.stop(grace)
    with contextlib.suppress(OSError):
        conn.send(("report", report))


class ServerProcess:
    """A server in a spawned process (safe beside gRPC channels and JAX); a context manager."""

    STOP_MARGIN_S = 30.0    # beyond ``grace``: time to write the recordings and report before the process is killed

    def __init__(self, config: ServerConfig, start_timeout: float = 180.0, grace: float = 5.0):
        self.config, self.start_timeout, self.grace = config, start_timeout, grace
        self.address: str | None = None
        self._process = None
        self._conn = None

    def start(self) -> ServerProcess:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._process = ctx.Process(target=_process_main, args=(self.config, child, self.grace),
                                    daemon=True, name="flywheel-simulator-server")
        self._process.start()
        child.close()                       # the child's end lives in the child: its death reads as EOF here
        self._conn = parent
        if not parent.poll(self.start_timeout):
            self.stop()
            raise RuntimeError(f"simulator server did not start within {self.start_timeout:.0f} s")
        try:
            status, value = parent.recv()
        except EOFError:
            self._process.join(5)
            status, value = "error", f"the server process exited (code {self._process.exitcode}) before it reported"
        if status != "ok":
            self.stop()
            raise RuntimeError(f"simulator server failed to start:\n{value}")
        self.address = value
        return self

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self) -> dict | None:
        """Graceful stop (in-flight calls finish, recordings are written); SIGTERM, then SIGKILL, if it hangs.

        One bounded wait of ``grace + STOP_MARGIN_S`` for the whole stop. Returns the server's ``report()`` (None when it
        did not stop cleanly, e.g. it was killed or hung).
        """
        if self._process is None:
            return None
        report = None
        end = time.monotonic() + self.grace + self.STOP_MARGIN_S
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.send("stop")
                while report is None and conn.poll(max(end - time.monotonic(), 0.0)):
                    tag, value = conn.recv()
                    report = value if tag == "report" else None
            except (EOFError, OSError):   # the process died before it reported
                pass
            conn.close()
        self._process.join(max(end - time.monotonic(), 0.0))
        for signal_it in (self._process.terminate, self._process.kill):   # a stopped (SIGSTOP) process needs SIGKILL
            if not self._process.is_alive():
                break
            signal_it()
            self._process.join(5)
        self._process = None
        return report

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    """``ServerConfig`` from ``key=value`` arguments naming its fields (``reward.weights.physics=0.5`` too)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    items = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in items):
        print(f"usage: python -m services.server [key=value ...]\n{ServerConfig.__doc__}\nkeys: "
              + ", ".join(ServerConfig.__dataclass_fields__))
        raise SystemExit(0)
    bad = [a for a in items if "=" not in a or a.startswith("-")]
    if bad:
        raise ValueError(f"arguments must be key=value with a ServerConfig field as key, got {bad[0]!r}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(ServerConfig), OmegaConf.from_dotlist(items))
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


def run_server(config: ServerConfig, prog: str = "services.server") -> int:
    """Serve until SIGINT/SIGTERM, printing the bound address; bad input is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = serve(config)
    except BindError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except (ValueError, ServiceError, RecordingError) as exc:
        print(f"{prog}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr,
              flush=True)
        return 2
    print(f"serving {SERVICE_NAME} on {server.address}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    report = server.stop()
    print(f"served {report['transitions_served']} transitions, stored {report['transitions_stored']} "
          f"in {report['shards']} shard(s)", flush=True)
    for error in report["errors"]:
        print(f"recording failed: {error}", file=sys.stderr, flush=True)
    return 1 if report["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m services.server [key=value ...]``."""
    try:
        config = config_from_args(argv)
    except ValueError as exc:
        print(f"services.server: error: {exc}", file=sys.stderr)
        return 2
    return run_server(config)


if __name__ == "__main__":
    raise SystemExit(main())
