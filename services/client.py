"""``SimulatorClient``: the typed Python client of the simulator service (numpy and grpc only).

    with SimulatorClient("127.0.0.1:50051") as client:
        session = client.create_session("pendulum", num_envs=64, fidelity=0.5)
        obs = session.reset(seed=0)
        for t in range(T):
            out = session.step(policy(obs))      # StepReply: observations, reward, reward_terms, ...
            obs = out.observations
        session.close()

Every call carries a deadline. Calls that are safe to repeat are retried with exponential backoff
on UNAVAILABLE for up to ``retry_seconds`` (a restarting server comes back at the same address);
Reset and Step are safe because they carry the session's sequence number and the server answers a
repeated one from its cache. A server that restarted does not know the session (NOT_FOUND):
``Session.recreate`` opens a new one with the same settings. Errors raise a ``SimulatorError``
subclass carrying the server's status code and message. Importing this module does not import
JAX or the physics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Self

import grpc
import numpy as np

from services.codec import decode, encode
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.proto.flywheel.simulator.v1 import simulator_pb2_grpc as pb_grpc


class SimulatorError(RuntimeError):
    """A failed call: ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = ""):
        super().__init__(f"{method}: {code.name}: {details}" if method else f"{code.name}: {details}")
        self.code, self.details, self.method = code, details, method


class InvalidArgument(SimulatorError):
    """Wrong shape, dtype, non-finite values or an out-of-range setting."""


class NotFound(SimulatorError):
    """Unknown session or world-model version."""


class ResourceExhausted(SimulatorError):
    """A batch or message over the server's limits."""


class FailedPrecondition(SimulatorError):
    """A call out of order (e.g. a Step sequence number that skips ahead)."""


class Unavailable(SimulatorError):
    """The server cannot be reached (after the retries)."""


class DeadlineExceeded(SimulatorError):
    """The call's deadline passed."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    """Explicit send/receive limits (the 4 MiB default caps a batch)."""
    size = int(max_message_mb) * 1024 * 1024
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]   # find a restarted server within a second


@dataclass(frozen=True)
class SessionInfo:
    """What ``CreateSession`` answers: the id, sizes, one env's bounds and the settings in force."""

    session_id: str
    task: str
    num_envs: int
    observation_low: np.ndarray
    observation_high: np.ndarray
    action_low: np.ndarray
    action_high: np.ndarray
    state_size: int
    episode_length: int
    control_dt: float
    horizon: int
    reward_weights: dict[str, float]
    wm_version: str


@dataclass(frozen=True)
class StepReply:
    """One served step (same-step auto-reset; see the proto's ``StepResponse``)."""

    observations: np.ndarray        # [B, O] after auto-reset
    final_observations: np.ndarray  # [B, O] of the states the step arrived in
    reward: np.ndarray              # [B] weighted total
    reward_terms: dict[str, np.ndarray]
    terminated: np.ndarray
    truncated: np.ndarray
    success: np.ndarray
    episode_ids: np.ndarray
    steps: np.ndarray
    window: np.ndarray
    wm_version: str

    @classmethod
    def from_proto(cls, r: pb.StepResponse) -> StepReply:
        return cls(decode(r.observations), decode(r.final_observations), decode(r.reward),
                   {k: decode(v) for k, v in r.reward_terms.items()}, decode(r.terminated), decode(r.truncated),
                   decode(r.success), decode(r.episode_ids), decode(r.steps), decode(r.window), r.wm_version)


class SimulatorClient:
    """A connection to one simulator server; use it as a context manager."""

    _SAFE: ClassVar[frozenset[str]] = frozenset({"Reset", "Step", "CloseSession", "Imagine", "Verify", "LoadWorldModel", "Check"})

    def __init__(self, address: str, timeout: float = 60.0, retry_seconds: float | None = None, backoff: float = 0.1,
                 max_message_mb: int = 256, connect_timeout: float = 30.0):
        self.address, self.timeout, self.backoff = address, float(timeout), float(backoff)
        self.retry_seconds = self.timeout if retry_seconds is None else float(retry_seconds)
        self._channel = grpc.insecure_channel(address, options=[*channel_options(max_message_mb), *RECONNECT_OPTIONS])
        self._stub = pb_grpc.SimulatorStub(self._channel)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"no simulator server at {address} "
                              f"after {connect_timeout:.0f} s") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- plumbing ------------------------------------------------------------------------------
    def call(self, method: str, request, timeout: float | None = None, retry_seconds: float | None = None):
        """Invoke ``method`` with a deadline; where it is safe, retry UNAVAILABLE with backoff for ``retry_seconds``."""
        fn = getattr(self._stub, method)
        window = self.retry_seconds if retry_seconds is None else float(retry_seconds)
        give_up = time.monotonic() + (window if method in self._SAFE else 0.0)
        attempt = 0
        while True:
            try:
                return fn(request, timeout=self.timeout if timeout is None else timeout)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            pause = min(self.backoff * 2**attempt, 2.0)
            if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() + pause > give_up:
                if code == grpc.StatusCode.UNAVAILABLE and method in self._SAFE:
                    details += f" (still unavailable after retrying for {window:.0f} s)"
                raise _ERRORS.get(code, SimulatorError)(code, details, method) from None
            time.sleep(pause)
            attempt += 1

    # -- calls ---------------------------------------------------------------------------------
    def create_session(self, task: str, num_envs: int, fidelity: float = 1.0, mode: str = "blend", seed: int = 0,
                       world_model_version: str = "", reward_weights: dict[str, float] | None = None,
                       horizon: int = 0) -> Session:
        """Open a session of ``num_envs`` environments; returns a ``Session`` handle."""
        request = pb.CreateSessionRequest(task=task, num_envs=num_envs, fidelity=fidelity, mode=mode, seed=seed,
                                          world_model_version=world_model_version,
                                          reward_weights=reward_weights or {}, horizon=horizon)
        return Session(self, self._open(request), request)

    def _open(self, request: pb.CreateSessionRequest) -> SessionInfo:
        r = self.call("CreateSession", request)
        return SessionInfo(r.session_id, r.task, r.num_envs, decode(r.observation.low), decode(r.observation.high),
                           decode(r.action.low), decode(r.action.high), r.state_size, r.episode_length, r.control_dt,
                           r.horizon, dict(r.reward_weights), r.wm_version)

    def imagine(self, states: np.ndarray, actions: np.ndarray, task: str = "",
                world_model_version: str = "") -> tuple[np.ndarray, str]:
        """Open-loop world-model rollout: ``[B,S], [B,H,A] -> ([B,H,S], version)``."""
        r = self.call("Imagine", pb.ImagineRequest(task=task, world_model_version=world_model_version,
                                                   states=encode(states), actions=encode(actions)))
        return decode(r.imagined), r.wm_version

    def verify(self, states: np.ndarray, actions: np.ndarray, next_states: np.ndarray,
               task: str = "") -> dict[str, np.ndarray]:
        """Physics-violation (RLPF) report of windows ``[B,S], [B,H,A], [B,H,S]`` for ``task`` (empty: the server's).

        Keys, exactly: ``per_transition [B,H]``, ``per_window [B]``, ``violates [B]``, ``reward [B]``,
        ``components/<name> [B,H]`` (tolerance units) and ``raw/<name> [B,H]`` (physical units) for each
        name in ``rewards.COMPONENTS``, and ``scale [S]``: the residual's scale (the current world model's
        when it is of ``task``, else ``simulators.physics.scale.data_scale(task)``).
        """
        r = self.call("Verify", pb.VerifyRequest(task=task, states=encode(states), actions=encode(actions),
                                                 next_states=encode(next_states)))
        return {k: decode(v) for k, v in r.report.items()}

    def load_world_model(self, version: str = "", path: str = "") -> str:
        """Swap the server's current world model; sessions created afterwards use it. Returns its version."""
        return self.call("LoadWorldModel", pb.LoadWorldModelRequest(version=version, path=str(path))).wm_version

    def health(self, service: str = "") -> str:
        """Standard gRPC health check: ``"SERVING"``, ``"NOT_SERVING"``, ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _ERRORS.get(exc.code(), SimulatorError)(exc.code(), exc.details() or "", "Check") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


class Session:
    """One server-side batch of environments; Reset and Step are numbered so a retry never steps twice."""

    RESEED = 1_000_003   # seed stride of a re-created session: a fresh random stream, never the first one again

    def __init__(self, client: SimulatorClient, info: SessionInfo, request: pb.CreateSessionRequest | None = None):
        self.client, self.info, self.id = client, info, info.session_id
        self.request = request
        self.recreated = 0
        self._seq = 0
        self._stream = None

    def recreate(self) -> SessionInfo:
        """Open a new server-side session with this one's settings (after the server lost it, e.g. it restarted).

        Its envs start afresh: call ``reset`` next. Its seed is the original plus ``RESEED`` per re-creation.
        """
        if self.request is None:
            raise RuntimeError(f"session {self.id} was not made by create_session; it cannot be re-created")
        request = pb.CreateSessionRequest()
        request.CopyFrom(self.request)
        request.seed = (self.request.seed + self.RESEED * (self.recreated + 1)) % 2**31
        info = self.client._open(request)
        old = self.info
        if (info.num_envs, info.task, info.action_low.shape) != (old.num_envs, old.task, old.action_low.shape):
            raise SimulatorError(grpc.StatusCode.FAILED_PRECONDITION, f"the re-created session {info.session_id} has "
                                 f"{info.num_envs} {info.task} envs, expected {old.num_envs} {old.task} envs",
                                 "CreateSession")
        self.info, self.id, self.recreated, self._seq = info, info.session_id, self.recreated + 1, 0
        if self._stream is not None:
            self._stream.close()
            self._stream = _StepStream(self.client)
        return info

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every env (re-seeded when ``seed`` is given); returns observations ``[B, O]``."""
        r = self._sequenced("Reset", pb.ResetRequest(session_id=self.id, seq=self._seq + 1, has_seed=seed is not None,
                                                     seed=0 if seed is None else int(seed)))
        return decode(r.observations)

    def step(self, actions: np.ndarray, hold: np.ndarray | None = None) -> StepReply:
        """Step every env with ``actions [B, A]`` (float32 on the wire); envs flagged in ``hold [B]`` stay put."""
        request = pb.StepRequest(session_id=self.id, seq=self._seq + 1, actions=encode(actions, "float32"))
        if hold is not None and np.any(hold):
            request.hold.CopyFrom(encode(np.asarray(hold, bool), "bool"))
        return StepReply.from_proto(self._sequenced("Step", request))

    def _sequenced(self, method: str, request):
        """Send a numbered call; the number is used up only when the server answered it.

        After an ambiguous failure (deadline, unavailable) repeat the same request: the server
        either runs it or answers it from its cache.
        """
        if self._stream is not None and method == "Step":
            if self._stream.dead:
                self._stream = _StepStream(self.client)
            response = self._stream.send(request)
        else:
            response = self.client.call(method, request)
        self._seq = request.seq
        return response

    def use_stream(self) -> None:
        """Step over one bidirectional ``StreamStep`` call instead of unary calls."""
        if self._stream is None:
            self._stream = _StepStream(self.client)

    def close(self) -> dict:
        """Close the session (the server flushes its recorder); returns transitions served and shard files."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        r = self.client.call("CloseSession", pb.CloseSessionRequest(session_id=self.id),
                             retry_seconds=min(self.client.retry_seconds, 5.0))   # a gone server has nothing to close
        return {"transitions": int(r.transitions), "shards": list(r.shards), "wm_version": r.wm_version}


class _StepStream:
    """A ``StreamStep`` call fed one request at a time; a broken stream falls back to a unary retry."""

    def __init__(self, client: SimulatorClient):
        import queue

        self.client, self.dead = client, False
        self._requests: queue.Queue = queue.Queue()
        self._responses = client._stub.StreamStep(iter(self._requests.get, None))

    def send(self, request: pb.StepRequest) -> pb.StepResponse:
        self._requests.put(request)
        try:
            return next(self._responses)
        except grpc.RpcError as exc:
            self.dead = True
            if exc.code() == grpc.StatusCode.UNAVAILABLE:   # same seq: the server's cache makes this safe
                return self.client.call("Step", request)
            raise _ERRORS.get(exc.code(), SimulatorError)(exc.code(), exc.details() or "", "StreamStep") from None

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
