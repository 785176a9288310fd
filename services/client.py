"""``SimulatorClient``: the typed Python client of the simulator service (numpy and grpc only).

    with SimulatorClient("127.0.0.1:50051") as client:
        session = client.create_session("pendulum", num_envs=64, fidelity=0.5)
        obs = session.reset(seed=0)
        for t in range(T):
            out = session.step(policy(obs))      # StepReply: observations, reward, reward_terms, ...
            obs = out.observations
        session.close()

Every call carries a deadline: ``timeout`` per call (connecting included, unless ``connect_timeout``
says otherwise); a ``StreamStep`` stream lives at most ``stream_seconds`` (then a new one opens) and
each of its steps must be answered within ``timeout``. Calls that are safe to repeat are retried with
exponential backoff on UNAVAILABLE for up to ``retry_seconds`` (a restarting server comes back at the same address);
Reset and Step are safe because they carry the session's sequence number and the server answers a
repeated one from its cache. A server that restarted does not know the session (NOT_FOUND):
``Session.recreate`` opens a new one with the same settings. Errors raise a ``SimulatorError``
subclass carrying the server's status code and message. Importing this module does not import
JAX or the physics.

A server with a token wants it on every call: ``token=``/``token_file=`` or ``$FLYWHEEL_TOKEN`` /
``$FLYWHEEL_TOKEN_FILE``; a TLS server wants the CA of its certificate: ``tls_root_cert=`` or
``$FLYWHEEL_TLS_ROOT_CERT`` (all of it in ``credentials=services.auth.ClientCredentials(...)``).
Sessions are leases: one left without a call for the server's ``session_idle_s`` (``info.idle_timeout_s``)
is closed by the server, and one never called within ``min(idle_timeout_s, 30 s)`` of its creation too (reset
a session soon after creating it).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Self

import grpc
import numpy as np

from services.auth import ClientCredentials, metadata
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


class DataLoss(SimulatorError):
    """Served transitions could not be recorded (the server's trajectory directory): the session stops serving."""


class Unavailable(SimulatorError):
    """The server cannot be reached (after the retries)."""


class DeadlineExceeded(SimulatorError):
    """The call's deadline passed."""


class Unauthenticated(SimulatorError):
    """The server wants a token this client did not send (or sent wrong)."""


class Cancelled(SimulatorError):
    """The call was cancelled before it was answered."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _refused_stream(exc: grpc.RpcError) -> bool:
    """Whether a StreamStep was refused for want of a stream slot (the server's trailing metadata says so)."""
    try:
        trailing = dict(exc.trailing_metadata() or ())
    except Exception:  # noqa: BLE001 - an error raised before any metadata came
        return False
    return trailing.get("flywheel-refusal") == "stream-slots"


def check_address(address: str) -> str:
    """A ``host:port`` (``[v6]:port``) target has a host and a port in [1, 65535]; other gRPC target forms
    (``dns:///...``, ``unix:...``) pass as they are."""
    if "://" in address or address.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:", "dns:")):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"simulator address {address!r} is not host:port with a port in [1, 65535] "
                         "(e.g. 127.0.0.1:50051, [::1]:50051)")
    return address


MAX_MESSAGE_MB = 2047   # gRPC's message limits are C ints: under 2 GiB


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    """Explicit send/receive limits (the 4 MiB default caps a batch); ``max_message_mb`` in [1, 2047]."""
    if not 1 <= int(max_message_mb) <= MAX_MESSAGE_MB:
        raise ValueError(f"max_message_mb must be in [1, {MAX_MESSAGE_MB}] (gRPC's limit is under 2 GiB), "
                         f"got {max_message_mb!r}")
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
    idle_timeout_s: float = 0.0     # the server closes the session after this long without a call


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
                 max_message_mb: int = 256, connect_timeout: float | None = None, token: str | None = None,
                 token_file: str | None = None, tls_root_cert: str | None = None,
                 credentials: ClientCredentials | None = None, stream_seconds: float = 3600.0):
        self.address, self.timeout, self.backoff = address, float(timeout), float(backoff)
        self.retry_seconds = self.timeout if retry_seconds is None else float(retry_seconds)
        self.stream_seconds = float(stream_seconds)
        self.credentials = credentials or ClientCredentials.from_env(token, token_file, tls_root_cert)
        self.metadata = metadata(self.credentials.resolved_token())
        connect = self.timeout if connect_timeout is None else float(connect_timeout)
        check_address(address)
        self._channel = self.credentials.channel(address, [*channel_options(max_message_mb), *RECONNECT_OPTIONS])
        self._stub = pb_grpc.SimulatorStub(self._channel)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect)
        except grpc.FutureTimeoutError:
            self._channel.close()
            hint = (" (is a server listening there? a TLS server also needs tls_root_cert or $FLYWHEEL_TLS_ROOT_CERT)"
                    if not self.credentials.tls else " (is a server listening there, with a certificate tls_root_cert "
                    "vouches for?)")
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"no simulator server at {address} after {connect:g} s"
                              + hint) from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- plumbing ------------------------------------------------------------------------------
    def call(self, method: str, request, timeout: float | None = None, retry_seconds: float | None = None):
        """Invoke ``method`` with a deadline; where it is safe, retry UNAVAILABLE with backoff for ``retry_seconds``.

        The whole call, retries included, ends within ``max(timeout, retry_seconds)``.
        """
        fn = getattr(self._stub, method)
        window = self.retry_seconds if retry_seconds is None else float(retry_seconds)
        per_call = self.timeout if timeout is None else float(timeout)
        now = time.monotonic()
        give_up = now + (window if method in self._SAFE else 0.0)
        end = max(give_up, now + per_call)
        attempt = 0
        while True:
            try:
                deadline = min(per_call, max(end - time.monotonic(), 0.001))
                return fn(request, timeout=deadline, metadata=self.metadata)
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
                           r.horizon, dict(r.reward_weights), r.wm_version, r.idle_timeout_s)

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

    def load_world_model(self, version: str) -> str:
        """Make ``version`` (loaded, or ``<version>.pt`` in the server's model directory) the server's current
        world model; sessions created afterwards use it. Returns its version."""
        return self.call("LoadWorldModel", pb.LoadWorldModelRequest(version=version)).wm_version

    def health(self, service: str = "") -> str:
        """Standard gRPC health check: ``"SERVING"``, ``"NOT_SERVING"``, ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout, metadata=self.metadata)
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
        self.episode_ids: np.ndarray | None = None    # [B] the episodes the last reset started
        self._seq = 0
        self._stream = None
        self._streaming = False
        self._pending: PendingStep | None = None   # a step_start not yet answered
        self._abandoned = 0                          # the sequence number of a cancelled step (0: none)
        self._unanswered: tuple[str, object] | None = None   # a numbered call that got no answer: (method, request)

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
        if self._pending is not None:           # its answer belongs to the lost session
            self._pending.cancel()
        self.info, self.id, self.recreated, self._seq = info, info.session_id, self.recreated + 1, 0
        self._abandoned, self._unanswered = 0, None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        return info

    def reset(self, seed: int | list[int] | None = None) -> np.ndarray:
        """Reset every env (re-seeded when ``seed`` is given: an int, or one per env); returns observations ``[B, O]``.

        ``episode_ids`` then holds the episode each env starts. After a call that got no answer, a reset first
        settles it (``retry``: its sequence number is used up), then resets.
        """
        if self._unanswered is not None:
            self.retry()
        request = pb.ResetRequest(session_id=self.id, seq=self._seq + 1)
        if isinstance(seed, (list, tuple, np.ndarray)):
            request.seeds.extend(int(s) for s in seed)
        elif seed is not None:
            request.has_seed, request.seed = True, int(seed)
        r = self._sequenced("Reset", request)
        self.episode_ids = decode(r.episode_ids) if r.episode_ids.dtype else None
        return decode(r.observations)

    def step(self, actions: np.ndarray, hold: np.ndarray | None = None) -> StepReply:
        """Step every env with ``actions [B, A]`` (float32 on the wire); envs flagged in ``hold [B]`` stay put.

        A step whose answer did not come (deadline, server unreachable) may have run on the server: a step with
        other actions is refused until ``retry()`` (or the same step again) got its answer, or ``reset`` settled it.
        """
        return StepReply.from_proto(self._sequenced("Step", self._step_request(actions, hold)))

    def retry(self):
        """Send again the numbered call that got no answer: the server answers from its cache if it ran, else runs
        it now. Returns what that ``step`` (a ``StepReply``) or ``reset`` (observations) would have returned."""
        if self._unanswered is None:
            raise RuntimeError(f"session {self.id} has no call waiting for an answer")
        method, request = self._unanswered
        r = self._sequenced(method, request)
        if method == "Step":
            return StepReply.from_proto(r)
        self.episode_ids = decode(r.episode_ids) if r.episode_ids.dtype else None
        return decode(r.observations)

    def step_start(self, actions: np.ndarray, hold: np.ndarray | None = None) -> PendingStep:
        """``step`` without waiting: the call is on its way when this returns; ``.result()`` is its ``StepReply``.

        One step at a time per session (the next needs this one's sequence number used up): call ``result``
        before the next ``step``/``step_start``. Unary, the call is a gRPC future; over a stream
        (``use_stream``), the request is queued on the stream and ``result`` reads its answer.
        """
        request = self._step_request(actions, hold)
        if self._streaming:
            stream = self._open_stream()
            stream.put(request)
            self._pending = PendingStep(self, request, stream=stream)
        else:
            future = self.client._stub.Step.future(request, timeout=self.client.timeout, metadata=self.client.metadata)
            self._pending = PendingStep(self, request, future)
        return self._pending

    def _step_request(self, actions: np.ndarray, hold: np.ndarray | None) -> pb.StepRequest:
        if self._pending is not None:
            raise RuntimeError(f"session {self.id} has a step in flight; call its result() first")
        if self._abandoned:
            raise RuntimeError(f"session {self.id}: step {self._abandoned} was cancelled and may or may not have run; "
                               "close or re-create the session")
        request = pb.StepRequest(session_id=self.id, seq=self._seq + 1, actions=encode(actions, "float32"))
        if hold is not None and np.any(hold):
            request.hold.CopyFrom(encode(np.asarray(hold, bool), "bool"))
        return request

    def _sequenced(self, method: str, request):
        """Send a numbered call; the number is used up only when the server answered it.

        After an ambiguous failure (deadline, unavailable) repeat the same request: the server
        either runs it or answers it from its cache.
        """
        if self._unanswered is not None and (self._unanswered[0], self._unanswered[1].SerializeToString()) != \
                (method, request.SerializeToString()):           # the same request again is a retry
            kept_method, kept = self._unanswered
            raise RuntimeError(f"session {self.id}: {kept_method} {kept.seq} got no answer and may have run on the "
                               "server; call retry() for its answer (or repeat that call), or reset()")
        try:
            if self._streaming and method == "Step":
                stream = self._open_stream()
                response = stream.send(request)
                self._stream_answered(stream)
            else:
                response = self.client.call(method, request)
        except (DeadlineExceeded, Unavailable):
            self._unanswered = (method, request)
            raise
        self._unanswered = None
        self._seq = request.seq
        return response

    def _open_stream(self) -> _StepStream:
        if self._stream is None or self._stream.dead:
            if self._stream is not None:
                self._stream.close()
            self._stream = _StepStream(self.client)
        return self._stream

    def _stream_answered(self, stream: _StepStream) -> None:
        if stream.refused:                      # the server has no stream slot free: unary calls from now on
            self._streaming = False

    def use_stream(self) -> None:
        """Step over a bidirectional ``StreamStep`` call instead of unary calls (unary while the server has no
        stream slot free)."""
        self._streaming = True

    def close(self) -> dict:
        """Close the session (the server flushes its recorder); returns transitions served and shard files."""
        self._streaming = False
        if self._pending is not None:
            self._pending.cancel()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        r = self.client.call("CloseSession", pb.CloseSessionRequest(session_id=self.id),
                             retry_seconds=min(self.client.retry_seconds, 5.0))   # a gone server has nothing to close
        return {"transitions": int(r.transitions), "shards": list(r.shards), "wm_version": r.wm_version}


class PendingStep:
    """A Step on its way (``Session.step_start``); ``result()`` waits for its ``StepReply`` (once).

    An answer that did not come because the server was unavailable is asked again with the same request
    (its sequence number makes that safe: the server answers a step it already ran from its cache); any
    other failure raises the ``SimulatorError`` a blocking ``step`` would.
    """

    def __init__(self, session: Session, request: pb.StepRequest, future=None, stream: _StepStream | None = None):
        self.session, self.request, self._future, self._stream = session, request, future, stream
        self._response: pb.StepResponse | None = None

    def result(self) -> StepReply:
        if self._response is None:
            if self._future is None and self._stream is None:
                raise RuntimeError("this step was cancelled before its answer came")
            session, future, stream, self._future, self._stream = self.session, self._future, self._stream, None, None
            session._pending = None
            if stream is not None:               # the stream's own fallbacks: a unary retry of the same request
                response = stream.take(self.request)
                session._stream_answered(stream)
            else:
                try:
                    response = future.result()
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code != grpc.StatusCode.UNAVAILABLE:
                        raise _ERRORS.get(code, SimulatorError)(code, exc.details() or "", "Step") from None
                    response = session.client.call("Step", self.request)   # retried with backoff, same seq
            session._seq = self.request.seq
            self._response = response
        return StepReply.from_proto(self._response)

    def cancel(self) -> None:
        """Give up on the answer, before closing or re-creating the session: whether the server ran the step
        is unknown, so the session takes no other step until it is re-created."""
        if self._future is not None:
            self._future.cancel()
        elif self._stream is not None:         # its answer would come out of order for the next step
            self._stream.close()
            self._stream.dead = True
        if self._future is not None or self._stream is not None:
            self.session._abandoned = self.request.seq
        self._future = self._stream = None
        self.session._pending = None


class _StepStream:
    """A ``StreamStep`` call fed one request at a time.

    The stream lives at most ``client.stream_seconds``; each answer must come within ``client.timeout``
    (a watchdog cancels the stream otherwise: DeadlineExceeded). A stream that broke or aged out falls
    back to a unary retry of the same request (its sequence number makes that safe); one the server
    refused for want of a slot sets ``refused`` and is answered by a unary call.
    """

    def __init__(self, client: SimulatorClient):
        self.client, self.dead, self.refused = client, False, False
        self._requests: queue.Queue = queue.Queue()
        self._responses = client._stub.StreamStep(iter(self._requests.get, None), timeout=client.stream_seconds,
                                                  metadata=client.metadata)
        self._watchdog = _Watchdog(self._responses.cancel)

    def send(self, request: pb.StepRequest) -> pb.StepResponse:
        self.put(request)
        return self.take(request)

    def put(self, request: pb.StepRequest) -> None:
        """Send ``request`` on the stream without waiting for its answer (``take``)."""
        self._requests.put(request)

    def take(self, request: pb.StepRequest) -> pb.StepResponse:
        """The answer to ``request``, the last one ``put``."""
        try:
            with self._watchdog.armed(self.client.timeout):
                return next(self._responses)
        except StopIteration:
            self.dead = True
            return self.client.call("Step", request)
        except grpc.RpcError as exc:
            self.dead = True
            code = exc.code()
            if self._watchdog.fired:
                raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.client.timeout:g} s "
                                       f"from {self.client.address}", "StreamStep") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _refused_stream(exc):
                self.refused = True
                return self.client.call("Step", request)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):   # same seq: cached if it ran
                return self.client.call("Step", request)
            raise _ERRORS.get(code, SimulatorError)(code, exc.details() or "", "StreamStep") from None

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
        self._watchdog.close()


class _Watchdog:
    """Calls ``cancel`` when an armed wait outlasts its timeout (one thread, shared by every wait of a stream)."""

    def __init__(self, cancel):
        self._cancel, self.fired = cancel, False
        self._deadline: float | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def armed(self, seconds: float) -> Iterator[None]:
        with self._cond:
            self._deadline = time.monotonic() + seconds
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.fired, self._deadline = True, None
                self._cancel()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
