"""The simulator server: sessions of the corrected simulator over gRPC, graded and recorded.

    server = serve(ServerConfig(port=0), world_model=wm)   # in-process; .address, .port, .stop(grace), .wait()
    with ServerProcess(config) as proc:                      # a spawned process (never fork with gRPC)
        env = RemoteVectorEnv(proc.address, "pendulum", num_envs=64)
    python -m services.server --task pendulum --port 50051   # standalone (``flywheel serve``)

Bad input is answered with a status code and a message naming what was wrong and what was expected
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION); other sessions keep running.
Standard health checking and reflection are served. ``stop`` finishes in-flight calls, then writes
every session's recordings and returns the server's ``report()``: transitions served and stored,
episodes and shards written, and the recording errors (path and OS error), if any.

A server restarted after a crash (same config, same trajectory directory) is a new incarnation:
its session ids, shard names and episode ids never collide with those its dead incarnation wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.client import channel_options
from services.codec import CodecError, decode_float, encode
from services.config import ServerConfig
from services.models import ModelStore, verify_report
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.proto.flywheel.simulator.v1 import simulator_pb2_grpc as pb_grpc
from services.recorder import claim_incarnation
from services.session import ServiceError, SessionRequest, SimSession, open_session
from simulators.physics.scale import data_scale

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Simulator"].full_name
EPISODE_BLOCK = 2**32   # episode ids per simulator instance: sessions never share one
SESSIONS_PER_INCARNATION = 2**16   # episode-id blocks per server incarnation; a restart takes the next range
TOTALS = ("transitions_served", "transitions_stored", "episodes_stored", "shards")


def _rpc(method):
    """Answer ``ServiceError``/bad tensors/``ValueError`` with their status code; anything else is INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServiceError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        except (CodecError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # the server keeps serving; the client gets the reason
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    return wrapper


class SimulatorService(pb_grpc.SimulatorServicer):
    """The ``flywheel.simulator.v1.Simulator`` servicer: sessions, Imagine, Verify, LoadWorldModel."""

    def __init__(self, config: ServerConfig, world_model=None):
        self.config = config
        self.models = ModelStore(config, world_model)
        self.sessions: dict[str, SimSession] = {}
        self._closed: dict[str, pb.CloseSessionResponse | ServiceError] = {}
        self._lock = threading.Lock()
        self._blocks = 0
        self.incarnation = claim_incarnation(config.trajectory_dir, str(config.episode_offset))
        self._totals = dict.fromkeys(TOTALS, 0)
        self._errors: list[dict] = []

    def _episode_offset(self) -> int:
        with self._lock:
            if self._blocks >= SESSIONS_PER_INCARNATION:
                raise ServiceError("RESOURCE_EXHAUSTED", f"the server used all its {SESSIONS_PER_INCARNATION} "
                                   "episode-id blocks (one per session and per reset); start a new server")
            self._blocks += 1
            block = self.incarnation * SESSIONS_PER_INCARNATION + self._blocks - 1
            return self.config.episode_offset + block * EPISODE_BLOCK

    def _session(self, session_id: str) -> SimSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise ServiceError("NOT_FOUND", f"unknown session {session_id!r}; create one with CreateSession")
        return session

    def _check_batch(self, n: int, what: str) -> None:
        if n > self.config.max_batch:
            raise ServiceError("RESOURCE_EXHAUSTED", f"{what} of {n} is over the server's max_batch "
                               f"{self.config.max_batch}; split it into batches of at most {self.config.max_batch}")

    # -- sessions ------------------------------------------------------------------------------
    @_rpc
    def CreateSession(self, request, context):
        if len(self.sessions) >= self.config.max_sessions:
            raise ServiceError("RESOURCE_EXHAUSTED", f"the server holds its maximum of {self.config.max_sessions} "
                               "sessions; close one first")
        req = SessionRequest(request.task, request.num_envs, request.fidelity, request.mode, request.seed,
                             request.world_model_version, dict(request.reward_weights), request.horizon)
        session = open_session(self.config, self.models, req, self._episode_offset, self.incarnation)
        with self._lock:
            self.sessions[session.id] = session
        i = session.info
        return pb.CreateSessionResponse(
            session_id=i.session_id, num_envs=i.num_envs, task=i.task, wm_version=i.wm_version,
            observation=pb.BoxSpec(low=encode(i.observation_low), high=encode(i.observation_high)),
            action=pb.BoxSpec(low=encode(i.action_low), high=encode(i.action_high)), state_size=i.state_size,
            episode_length=i.episode_length, control_dt=i.control_dt, horizon=i.horizon,
            reward_weights=i.reward_weights)

    @_rpc
    def Reset(self, request, context):
        return self._session(request.session_id).reset(request.seq, request.seed if request.has_seed else None)

    @_rpc
    def Step(self, request, context):
        hold = request.hold if request.HasField("hold") else None
        return self._session(request.session_id).step(request.seq, request.actions, hold)

    def StreamStep(self, request_iterator, context):
        for request in request_iterator:
            yield self.Step(request, context)

    @_rpc
    def CloseSession(self, request, context):
        with self._lock:
            answer = self._closed.get(request.session_id)
            if answer is None:
                session = self._session(request.session_id)
                del self.sessions[request.session_id]
        if answer is None:
            answer = self._close(session)
            with self._lock:
                self._closed[request.session_id] = answer
        if isinstance(answer, ServiceError):
            raise answer
        return answer

    def _close(self, session: SimSession) -> pb.CloseSessionResponse | ServiceError:
        """Close a session, add its recorder's totals to the server's; the answer to CloseSession."""
        session.close()
        totals = session.recorder.totals()
        with self._lock:
            for k in TOTALS:
                self._totals[k] += totals[k]
            if totals["error"]:
                self._errors.append(totals["error"])
        if totals["error"]:
            return ServiceError("FAILED_PRECONDITION", f"session {session.id}: {session.recorder.error}; "
                                f"{totals['transitions_served'] - totals['transitions_stored']} served transitions "
                                "were not stored")
        return pb.CloseSessionResponse(transitions=session.recorder.recorded, shards=session.recorder.shards,
                                       wm_version=session.wm_version)

    def close_all(self) -> dict:
        """Close every open session (shutdown: their recordings are written); returns ``report()``."""
        with self._lock:
            sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            self._close(session)
        return self.report()

    def report(self) -> dict:
        """Totals over every session so far (open ones included) and the recording errors
        (``[{"path": ..., "error": ...}]``, one per failed session)."""
        with self._lock:
            totals, errors, open_ = dict(self._totals), list(self._errors), list(self.sessions.values())
        for session in open_:
            t = session.recorder.totals()
            totals = {k: totals[k] + t[k] for k in TOTALS}
            if t["error"]:
                errors.append(t["error"])
        return {**totals, "incarnation": self.incarnation, "sessions_open": len(open_), "errors": errors}

    # -- world model and physics checks --------------------------------------------------------
    @_rpc
    def Imagine(self, request, context):
        wm = self.models.get(request.world_model_version, request.task or None)
        s0 = decode_float(request.states, "states", (None, wm.state_size))
        self._check_batch(len(s0), "Imagine batch")
        actions = decode_float(request.actions, "actions", (len(s0), None, wm.action_size))
        return pb.ImagineResponse(imagined=encode(wm.imagine(s0, actions), "float32"), wm_version=wm.version)

    @_rpc
    def Verify(self, request, context):
        engine, lock = self.models.verifier(request.task or self.config.task)
        s, a = engine.spec.state_size, engine.spec.action_size
        start = decode_float(request.states, "states", (None, s))
        self._check_batch(len(start), "Verify batch")
        actions = decode_float(request.actions, "actions", (len(start), None, a))
        nxt = decode_float(request.next_states, "next_states", (len(start), actions.shape[1], s), finite=False)
        wm = self.models.get()  # the residual's scale: the world model's where it is of this task, else the task's data scale
        scale = wm.state_scale if wm.task.name == engine.task.name else data_scale(engine.task, self.config.engine_params or None)
        with lock:
            report = verify_report(engine, start, actions, nxt, self.config.reward, scale)
        report["scale"] = np.asarray(scale, dtype=np.float64)
        return pb.VerifyResponse(report={k: encode(v.astype(np.float32) if v.dtype.kind == "f" else v)
                                         for k, v in report.items()}, wm_version=self.models.current)

    @_rpc
    def LoadWorldModel(self, request, context):
        wm = self.models.load(request.version, request.path)
        return pb.LoadWorldModelResponse(wm_version=wm.version, task=wm.task.name)


class SimulatorServer:
    """A running server: ``address``, ``port``, ``stop(grace)``, ``wait()``."""

    def __init__(self, grpc_server: grpc.Server, service: SimulatorService, health_servicer, host: str, port: int):
        self._server, self.service, self._health = grpc_server, service, health_servicer
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
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
        """The service's totals and recording errors, with this server's address."""
        return {"address": self.address, **self.service.report()}

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def serve(config: ServerConfig, world_model=None) -> SimulatorServer:
    """Start a server for ``config`` (port 0 picks a free one) and return it running."""
    config.validate()
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    service = SimulatorService(config, world_model)
    options = [*channel_options(config.max_message_mb), ("grpc.so_reuseport", 0)]   # a taken port is an error
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=options)
    pb_grpc.add_SimulatorServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        raise RuntimeError(f"cannot bind {config.host}:{config.port}: the address is in use or not this machine's; "
                           "choose another port (0 picks a free one)")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return SimulatorServer(server, service, health_servicer, config.host, port)


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
        """Graceful stop (in-flight calls finish, recordings are written); terminate if it hangs.

        Returns the server's ``report()`` (None when it did not stop cleanly, e.g. it was killed).
        """
        if self._process is None:
            return None
        report = None
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.send("stop")
                end = time.monotonic() + self.grace + 30
                while report is None and conn.poll(max(end - time.monotonic(), 0.0)):
                    tag, value = conn.recv()
                    report = value if tag == "report" else None
            except (EOFError, OSError):   # the process died before it reported
                pass
            conn.close()
        self._process.join(self.grace + 30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._process = None
        return report

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="flywheel serve", description="Serve the corrected simulator over gRPC.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--task", default="pendulum")
    p.add_argument("--engine", default="auto")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="simulator physics parameter, e.g. mass_scale=1.2 (repeatable)")
    p.add_argument("--world-model", dest="world_model_path", default=None)
    p.add_argument("--world-model-dir", default=None)
    p.add_argument("--trajectory-dir", default=None)
    p.add_argument("--flush-every", type=int, default=20_000)
    p.add_argument("--flush-seconds", type=float, default=2.0)
    p.add_argument("--lap", type=int, default=0)
    p.add_argument("--episode-offset", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--max-message-mb", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--torch-threads", type=int, default=0, help="0 keeps torch's default")
    args = vars(p.parse_args(argv))
    params = {}
    for item in args.pop("param"):
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--param expects NAME=VALUE, got {item!r}")
        params[name] = float(value)
    return ServerConfig(engine_params=params, **args)


def main(argv: list[str] | None = None) -> int:
    """Run a server until SIGINT/SIGTERM; prints the bound address."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(argv)
    server = serve(config)
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


if __name__ == "__main__":
    raise SystemExit(main())
