"""``SimulatorService``: the ``flywheel.simulator.v1.Simulator`` servicer behind ``services.server``.

Sessions are leases (``services.leases``): a CreateSession whose caller has gone, or whose answer
could not reach it before its deadline (less than ``CREATE_MARGIN_S`` left), creates nothing; a
session left without a call for ``session_idle_s`` is closed, and admission is counted under a lock.
Every request's work is bounded (``services.limits``) and long work stops when its caller has gone.
Engines follow sessions (``services.engines``). Bad input is answered with a status code and a
message naming what was wrong and what was expected; other sessions keep running.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time

import grpc
import numpy as np

from services.batcher import StepBatcher
from services.codec import CodecError, decode_float, encode
from services.config import ServerConfig
from services.engines import EnginePool
from services.leases import Leases
from services.limits import CHUNK_ELEMENTS, CHUNK_STEPS, check_work, chunks, ensure_active, header_shape
from services.models import ModelStore, verify_report
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.proto.flywheel.simulator.v1 import simulator_pb2_grpc as pb_grpc
from services.recorder import claim_incarnation
from services.session import ServiceError, SessionRequest, SimSession, open_session
from simulators.physics.scale import data_scale
from simulators.tasks import TASKS

log = logging.getLogger(__name__)
EPISODE_BLOCK = 2**32   # episode ids per session (over all its resets): sessions never share one
SESSIONS_PER_INCARNATION = 2**16   # episode-id blocks per id range; a restart, or a spent range, takes the next one
MAX_EPISODE_ID = 2**63 - 1
TOTALS = ("transitions_served", "transitions_stored", "episodes_stored", "shards")
CREATE_MARGIN_S = 0.05   # time a CreateSession answer needs to reach its caller
REFUSAL_KEY, STREAM_SLOTS = "flywheel-refusal", "stream-slots"   # trailing metadata of a refused StreamStep
MAX_DETAILS = 2000       # characters of an error message sent back (gRPC's status details share a 16 KiB header limit)


def _rpc(method):
    """Answer ``ServiceError``/bad tensors/``ValueError`` with their status code; anything else is INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServiceError as exc:
            if exc.code == "CANCELLED":
                self.count("cancelled")
            context.abort(getattr(grpc.StatusCode, exc.code), bounded(str(exc)))
        except (CodecError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(exc)))
        except Exception as exc:  # the server keeps serving; the client gets the reason
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, bounded(f"{type(exc).__name__}: {exc}"))

    return wrapper


class SimulatorService(pb_grpc.SimulatorServicer):
    """Sessions, Imagine, Verify and LoadWorldModel over the corrected simulator."""

    def __init__(self, config: ServerConfig, world_model=None):
        self.config = config
        self.models = ModelStore(config, world_model)
        self.engines = EnginePool(config.engine, config.engine_params, config.idle_engines)
        wait = float(config.coalesce_wait_ms)   # Step calls of many sessions computed together (0: off)
        self.batcher = StepBatcher(wait / 1e3) if wait > 0 else None
        self.leases = Leases(config.max_sessions, config.session_idle_s, self._close, on_reap=self.cancel_idle_streams)
        self._open_streams: dict[int, list] = {}      # id -> [context, last request time]: idle ones are cancelled
        # streams and long calls (Imagine, Verify) hold a handler thread: together at most workers - 1, so one
        # thread always stays free for short calls (Step, sessions) and health probes
        self.max_held = max(0, int(config.workers) - 1)
        self._lock = threading.Lock()
        self._blocks = 0
        self._held = 0
        self.incarnation = claim_incarnation(config.trajectory_dir, str(config.episode_offset))
        self._range = self.incarnation                # the id range new sessions' blocks come from
        self._totals = dict.fromkeys(TOTALS, 0)
        self._errors: list[dict] = []
        self._counts = {"cancelled": 0, "streams_refused": 0, "long_calls_refused": 0, "streams_idle_cancelled": 0}

    def count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _episode_offset(self) -> int:
        """The first episode id of a new session's block; a spent range is replaced by a fresh one (claimed as a
        restart claims one, so no later incarnation reuses it)."""
        with self._lock:
            if self._blocks >= SESSIONS_PER_INCARNATION:
                self._range = claim_incarnation(self.config.trajectory_dir, str(self.config.episode_offset),
                                                at_least=self._range + 1)
                self._blocks = 0
                log.info("episode-id range %d spent (%d sessions): new sessions take range %d",
                         self._range - 1, SESSIONS_PER_INCARNATION, self._range)
            block = self._range * SESSIONS_PER_INCARNATION + self._blocks
            offset = self.config.episode_offset + block * EPISODE_BLOCK
            if offset > MAX_EPISODE_ID - EPISODE_BLOCK:
                raise ServiceError("RESOURCE_EXHAUSTED", f"episode ids of this trajectory directory are spent "
                                   f"(range {self._range}); record into a new trajectory directory")
            self._blocks += 1
            return offset

    def _open(self, request: SessionRequest) -> SimSession:
        session = open_session(self.config, self.models, request, self._episode_offset, self.incarnation, self.engines)
        session.batcher = self.batcher
        return session

    def check(self) -> None:
        """Open, reset and close a one-env session of the configured task: raises what a client would be answered."""
        if self.models.current_for(self.config.task) is None:
            other = self.models.get(self.models.current)
            raise ServiceError("FAILED_PRECONDITION", f"world model {other.version} is for task {other.task.name!r}, "
                               f"not {self.config.task!r}, the server's task: no session could use it; serve a "
                               f"{self.config.task} model")
        session = self._open(SessionRequest(self.config.task, 1))
        try:
            session.restart(0)                     # nothing is stepped, so nothing is recorded
        finally:
            session.close()

    # -- sessions ------------------------------------------------------------------------------
    @_rpc
    def CreateSession(self, request, context):
        ensure_active(context, "CreateSession")
        req = SessionRequest(request.task, request.num_envs, request.fidelity, request.mode, request.seed,
                             request.world_model_version, dict(request.reward_weights), request.horizon)
        with self.leases.reserve():
            session = self._open(req)
            gone = _caller_gone(context)
            if gone:                            # the caller would never use nor close the session
                session.close()
                self.leases.rolled_back()
                raise ServiceError(gone, "CreateSession: the caller's deadline passed or nearly passed before the "
                                   "session was ready; nothing was created (allow the call more time)")
            self.leases.add(session)
        i = session.info
        return pb.CreateSessionResponse(
            session_id=i.session_id, num_envs=i.num_envs, task=i.task, wm_version=i.wm_version,
            observation=pb.BoxSpec(low=encode(i.observation_low), high=encode(i.observation_high)),
            action=pb.BoxSpec(low=encode(i.action_low), high=encode(i.action_high)), state_size=i.state_size,
            episode_length=i.episode_length, control_dt=i.control_dt, horizon=i.horizon,
            reward_weights=i.reward_weights, idle_timeout_s=i.idle_timeout_s)

    @_rpc
    def Reset(self, request, context):
        if request.seeds and request.has_seed:
            raise ServiceError("INVALID_ARGUMENT", "Reset takes a seed or per-env seeds, not both")
        seed = list(request.seeds) if request.seeds else (request.seed if request.has_seed else None)
        with self.leases.use(request.session_id) as session:
            return session.reset(request.seq, seed)

    @_rpc
    def Step(self, request, context):
        hold = request.hold if request.HasField("hold") else None
        with self.leases.use(request.session_id) as session:
            return session.step(request.seq, request.actions, hold)

    def StreamStep(self, request_iterator, context):
        if not self._hold():
            self.count("streams_refused")
            context.set_trailing_metadata(((REFUSAL_KEY, STREAM_SLOTS),))     # machine-readable: clients fall back
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"all {self.max_held} stream slots of the server are "
                          "in use (workers - 1, shared with Imagine and Verify calls); step with unary Step calls")
        key, entry = id(context), [context, time.monotonic()]
        with self._lock:
            self._open_streams[key] = entry
        try:
            for request in request_iterator:
                if not context.is_active():
                    return
                entry[1] = time.monotonic()
                yield self.Step(request, context)
                entry[1] = time.monotonic()
        finally:
            with self._lock:
                self._open_streams.pop(key, None)
            self._release_hold()

    def cancel_idle_streams(self) -> int:
        """Cancel streams with no request for ``session_idle_s`` (a stalled client's stream holds a handler thread
        and a slot); returns how many."""
        end = time.monotonic() - float(self.config.session_idle_s)
        with self._lock:
            idle = [ctx for ctx, last in self._open_streams.values() if last < end]
        for ctx in idle:
            ctx.cancel()
            self.count("streams_idle_cancelled")
        return len(idle)

    def _hold(self) -> bool:
        """Take one of the ``workers - 1`` slots for a call that holds its handler thread long; False when full."""
        with self._lock:
            if self._held >= self.max_held:
                return False
            self._held += 1
            return True

    def _release_hold(self) -> None:
        with self._lock:
            self._held -= 1

    @contextlib.contextmanager
    def _long_call(self, what: str):
        """Imagine and Verify share the stream slots; beyond them RESOURCE_EXHAUSTED (a probe must find a thread)."""
        if not self._hold():
            self.count("long_calls_refused")
            raise ServiceError("RESOURCE_EXHAUSTED", f"{what}: all {self.max_held} slots for streams and Imagine/Verify "
                               "calls are in use (workers - 1; one handler thread stays free for steps and health "
                               "probes); retry shortly or raise service.workers")
        try:
            yield
        finally:
            self._release_hold()

    @_rpc
    def CloseSession(self, request, context):
        answer = self.leases.close(request.session_id)
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
            return ServiceError("DATA_LOSS", f"session {session.id}: {session.recorder.error}; "
                                f"{totals['transitions_served'] - totals['transitions_stored']} served transitions "
                                "were not stored")
        return pb.CloseSessionResponse(transitions=session.recorder.recorded, shards=session.recorder.shards,
                                       wm_version=session.wm_version)

    def close_all(self) -> dict:
        """Close every open session (shutdown: their recordings are written), free the engines; returns ``report()``."""
        self.leases.close_all()
        self.engines.close()
        self.models.close()
        return self.report()

    def report(self) -> dict:
        """Totals over every session so far (open ones included), the recording errors (``[{"path": ...,
        "error": ...}]``, one per failed session) and the session counts (open, created, closed, expired,
        rolled back, refused for being full) and calls cancelled because their caller went away."""
        with self._lock:
            totals, errors, counts = dict(self._totals), list(self._errors), dict(self._counts)
        open_ = self.leases.sessions()
        for session in open_:
            t = session.recorder.totals()
            totals = {k: totals[k] + t[k] for k in TOTALS}
            if t["error"]:
                errors.append(t["error"])
        sessions = {f"sessions_{k}": v for k, v in self.leases.counts.items()}
        return {**totals, "incarnation": self.incarnation, "sessions_open": len(open_), **sessions,
                "calls_cancelled": counts["cancelled"], "streams_refused": counts["streams_refused"],
                "long_calls_refused": counts["long_calls_refused"],
                "streams_idle_cancelled": counts["streams_idle_cancelled"], "errors": errors}

    # -- world model and physics checks --------------------------------------------------------
    @_rpc
    def Imagine(self, request, context):
        with self._long_call("Imagine"):
            return self._imagine(request, context)

    def _imagine(self, request, context):
        if request.task:
            TASKS.target(request.task)           # an unknown task is named as such (ValueError: INVALID_ARGUMENT)
        wm = self.models.get(request.world_model_version, request.task or None)
        b, h = _leading(request.states, request.actions, "Imagine")
        check_work(self.config, "Imagine", b, h, wm.state_size)
        s0 = decode_float(request.states, "states", (None, wm.state_size))
        actions = decode_float(request.actions, "actions", (len(s0), None, wm.action_size))
        out = np.empty((len(s0), actions.shape[1], wm.state_size), np.float32)
        s = s0
        for lo, hi in chunks(actions.shape[1], min(CHUNK_STEPS, CHUNK_ELEMENTS // max(1, len(s0) * wm.state_size))):
            ensure_active(context, "Imagine")
            part = wm.imagine(s, actions[:, lo:hi])
            out[:, lo:hi], s = part, part[:, -1]
        return pb.ImagineResponse(imagined=encode(out, "float32"), wm_version=wm.version)

    @_rpc
    def Verify(self, request, context):
        with self._long_call("Verify"):
            return self._verify(request, context)

    def _verify(self, request, context):
        engine, lock = self.models.verifier(request.task or self.config.task)
        s, a = engine.spec.state_size, engine.spec.action_size
        b, h = _leading(request.states, request.actions, "Verify")
        check_work(self.config, "Verify", b, h, s)
        start = decode_float(request.states, "states", (None, s))
        actions = decode_float(request.actions, "actions", (len(start), None, a))
        nxt = decode_float(request.next_states, "next_states", (len(start), actions.shape[1], s), finite=False)
        wm = self.models.current_for(engine.task.name)   # the residual's scale: this task's model's, else the data scale
        scale = wm.state_scale if wm is not None else data_scale(engine.task, self.config.engine_params or None)
        parts = []
        for lo, hi in list(chunks(len(start), CHUNK_ELEMENTS // max(1, actions.shape[1] * s))) or [(0, 0)]:
            ensure_active(context, "Verify")
            with lock:
                parts.append(verify_report(engine, start[lo:hi], actions[lo:hi], nxt[lo:hi], self.config.reward, scale))
        report = {k: np.concatenate([p[k] for p in parts]) if parts[0][k].ndim else parts[0][k] for k in parts[0]}
        report["scale"] = np.asarray(scale, dtype=np.float64)
        return pb.VerifyResponse(report={k: encode(v.astype(np.float32) if v.dtype.kind == "f" else v)
                                         for k, v in report.items()}, wm_version=wm.version if wm is not None else "")

    @_rpc
    def LoadWorldModel(self, request, context):
        wm = self.models.load(request.version, request.path)
        return pb.LoadWorldModelResponse(wm_version=wm.version, task=wm.task.name)


def bounded(message: str) -> str:
    """An error message cut to ``MAX_DETAILS`` characters (one that echoes a huge request field must still arrive)."""
    if len(message) <= MAX_DETAILS:
        return message
    cut = len(message) - MAX_DETAILS
    return f"{message[:MAX_DETAILS // 2]} ...[{cut} characters cut]... {message[-MAX_DETAILS // 2:]}"


def _caller_gone(context) -> str:
    """``"CANCELLED"`` when the caller left, ``"DEADLINE_EXCEEDED"`` when an answer would arrive too late, else ``""``."""
    if not context.is_active():
        return "CANCELLED"
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining < CREATE_MARGIN_S else ""


def _leading(states: pb.Tensor, actions: pb.Tensor, call: str) -> tuple[int, int]:
    """``(B, H)`` of a ``states [B, S]`` and ``actions [B, H, A]`` pair, from their headers; both at least 1."""
    s, a = header_shape(states, "states"), header_shape(actions, "actions")
    b, h = (s[0] if s else 0), (a[1] if len(a) > 1 else 0)
    if b < 1 or h < 1:
        raise ServiceError("INVALID_ARGUMENT", f"{call}: states [B, S] and actions [B, H, A] need B >= 1 and H >= 1, "
                           f"got states {list(s)} and actions {list(a)}")
    return b, h
