"""``SimSession``: one client's batch of corrected-simulator environments, graded and recorded.

    session = open_session(config, models, SessionRequest(task="pendulum", num_envs=64), next_offset, engines=pool)
    obs = session.restart(seed)                   # CorrectedSimulator.reset (re-seeded when a seed is given)
    result, grades = session.advance(actions)     # CorrectedSimulator.step + rewards.grade_step + record
    session.reset(seq, seed) / session.step(seq, actions_msg)   # the same, sequenced, as proto messages
    session.close()                               # recordings written, the engine given back

The server and ``LocalVectorEnv`` share this code. Calls of one session are serialised by its lock.
Reset and Step carry a sequence number: the next number runs the call, a repeat of the last one is
answered from the cache (a retried call never steps twice), anything else is out of order;
``seq == 0`` means untagged and always runs. Once the session's recorder failed to write a shard,
Step and Reset answer DATA_LOSS with the path and the OS error: nothing is served unrecorded.
A seed is an int or one int per env (the batch is then seeded from all of them, ``numpy.random.SeedSequence``).
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rewards import grade_step
from services.client import SessionInfo
from services.codec import decode_float, decode_mask, encode
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.recorder import Recorder
from simulators.physics.base import InputError

TERMS = ("task", "imagination", "physics")
MAX_HORIZON = 1000   # the longest imagination window a grade takes (rewards.config)
MAX_WEIGHT = 1e6   # a reward weight's bound: each term is O(1) per step, so totals stay far inside float32


class InternalError(RuntimeError):
    """A failure inside the server while serving a valid request (answered INTERNAL and logged with its trace)."""


class ServiceError(Exception):
    """An error with the name of the gRPC status code it should be answered with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class SessionRequest:
    """What a client asks for in ``CreateSession``."""

    task: str = ""
    num_envs: int = 1
    fidelity: float = 1.0
    mode: str = "blend"
    seed: int = 0
    world_model_version: str = ""
    reward_weights: dict[str, float] = field(default_factory=dict)
    horizon: int = 0


def with_weights(config, weights: dict[str, float], horizon: int = 0):
    """A copy of a ``RewardConfig`` with some weights (task, imagination, physics) and the horizon replaced."""
    names = {f.name for f in dataclasses.fields(config.weights)}
    unknown = set(weights) - names
    if unknown:
        raise ServiceError("INVALID_ARGUMENT", f"unknown reward weight(s) {sorted(unknown)}; allowed: {sorted(names)}")
    bad = {k: v for k, v in weights.items() if not (np.isfinite(v) and 0 <= v <= MAX_WEIGHT)}
    if bad:
        raise ServiceError("INVALID_ARGUMENT", f"reward weights {bad} must be in [0, {MAX_WEIGHT:g}] (a reward "
                           "scaled past that overflows float32)")
    changes = {"weights": dataclasses.replace(config.weights, **weights)}
    if horizon:
        if not 1 <= int(horizon) <= MAX_HORIZON:
            raise ServiceError("INVALID_ARGUMENT", f"horizon {int(horizon)} is out of range; allowed: 1 to {MAX_HORIZON} "
                               f"(0: the server's {config.horizon})")
        changes["horizon"] = int(horizon)
    return dataclasses.replace(config, **changes)


def observation_bounds(task, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One env's observation bounds: the task's ``observation_low``/``observation_high`` where it declares
    them (``None`` or missing entries are unbounded), else -inf/+inf."""
    bounds = []
    for name, default in (("observation_low", -np.inf), ("observation_high", np.inf)):
        value = getattr(task, name, None)
        b = np.full(size, default, np.float32)
        if value is not None:
            given = np.asarray([default if v is None else v for v in value], np.float32).reshape(-1)
            if given.shape != (size,):
                raise ValueError(f"task {task.name}: {name} has {given.size} entries, expected {size}")
            b = given
        bounds.append(b)
    return bounds[0], bounds[1]


def seed_of(seed: int | list[int] | None, default: int):
    """What ``CorrectedSimulator`` is seeded with: an int, or a ``SeedSequence`` of per-env seeds."""
    if seed is None:
        return int(default)
    if isinstance(seed, (list, tuple, np.ndarray)):
        return np.random.SeedSequence([int(s) for s in seed])
    return int(seed)


def open_session(config, models, request: SessionRequest, next_offset: Callable[[], int],
                 incarnation: int = 0, engines=None) -> SimSession:
    """Validate a ``SessionRequest`` against the server's limits and build its session.

    ``incarnation`` (the server's restart count) is part of the session id, so shard names of a
    restarted server never collide with its dead incarnation's. The engine comes from ``engines``
    (a ``services.engines.EnginePool``) and goes back to it when the session closes; without a pool
    the session builds its own and closes it.
    """
    from services.engines import close_engine
    from services.limits import check_work
    from simulators import make_engine, make_task
    from simulators.corrected import CorrectedSimulator

    task, n = make_task(request.task or config.task), int(request.num_envs)
    if n < 1:
        raise ServiceError("INVALID_ARGUMENT", f"num_envs must be >= 1, got {n}")
    if n > config.max_batch:
        raise ServiceError("RESOURCE_EXHAUSTED", f"num_envs {n} is over the server's max_batch {config.max_batch}; "
                           f"ask for at most {config.max_batch} envs per session")
    if not 0.0 <= request.fidelity <= 1.0:
        raise ServiceError("INVALID_ARGUMENT", f"fidelity must be in [0, 1], got {request.fidelity}")
    wm = models.get(request.world_model_version, task.name)
    reward = with_weights(config.reward, dict(request.reward_weights), int(request.horizon))
    check_work(config, "CreateSession (num_envs x horizon x state size)", n, int(reward.horizon), wm.state_size)
    mode, fidelity = request.mode or "blend", float(request.fidelity)
    if engines is None:
        engine, release = make_engine(config.engine, task, dict(config.engine_params) or None), close_engine
    else:
        engine, release = engines.acquire(task), engines.release

    def make_sim(seed, episode_offset=None):
        offset = next_offset() if episode_offset is None else int(episode_offset)
        return CorrectedSimulator(task, wm, engine, fidelity, mode=mode, horizon=int(reward.horizon),
                                  seed=seed_of(seed, request.seed), num_envs=n, episode_offset=offset)

    try:
        session_id = f"s{int(incarnation)}-{uuid.uuid4().hex[:12]}"
        meta = {"task": task.name, "wm_version": wm.version, "fidelity": fidelity, "mode": mode, "engine": engine.name,
                "engine_params": dict(config.engine_params), "lap": int(config.lap)}
        recorder = Recorder(config.trajectory_dir, session_id, meta, config.flush_every, config.lap,
                            config.flush_seconds)
        spec = engine.spec
        low, high = observation_bounds(task, spec.observation_size)
        info = SessionInfo(session_id, task.name, n, low, high, spec.action_low.astype(np.float32),
                           spec.action_high.astype(np.float32), spec.state_size, task.episode_length, spec.control_dt,
                           int(reward.horizon), {k: float(v) for k, v in dataclasses.asdict(reward.weights).items()},
                           wm.version, float(config.session_idle_s))
        return SimSession(info, make_sim, engine, wm, reward, recorder, release)
    except BaseException:
        release(engine)
        raise


class SimSession:
    """A ``CorrectedSimulator`` batch behind the wire: validation, sequence numbers, grading, recording."""

    def __init__(self, info: SessionInfo, make_sim: Callable[..., object], engine, world_model,
                 reward_config, recorder: Recorder, release: Callable[[object], None] | None = None):
        self.info, self.id, self.num_envs = info, info.session_id, info.num_envs
        self.make_sim, self.engine, self.reward_config, self.recorder = make_sim, engine, reward_config, recorder
        self.wm_version = str(world_model.version)
        self.scale = np.asarray(world_model.state_scale, dtype=np.float64)
        self.sim = make_sim(None)
        self.lock = threading.Lock()
        self.closed = False
        self._release = release
        self.batcher = None              # a services.batcher.StepBatcher: steps computed with other sessions'
        self._seq, self._cached, self._cached_key, self._started = 0, None, b"", False

    # -- in-process ----------------------------------------------------------------------------
    def restart(self, seed: int | list[int] | None = None) -> np.ndarray:
        """Reset every env (a fresh simulator seeded with ``seed`` when given: an int or one per env);
        observations ``[B, O]``.

        Episodes cut short by a reset are recorded as unfinished; new episodes get ids never used before.
        """
        if self.closed:
            raise ServiceError("NOT_FOUND", f"session {self.id} is closed")
        if isinstance(seed, (list, tuple, np.ndarray)):
            seed = check_seeds(seed, self.num_envs)
        elif seed is not None:
            seed = check_seed(seed)
        next_id = self.sim.next_episode_id             # new episodes go on in the session's own id block
        fresh = self.make_sim(seed, next_id) if seed is not None else None   # first: a refused reset changes nothing
        if self._started:
            self.recorder.abandon()
        if fresh is not None:
            self.sim = fresh
        else:
            self.sim.episode_offset = next_id
        self._started = True
        return np.asarray(self.sim.reset())

    def start_ids(self) -> np.ndarray:
        """``[B]`` the episodes the last reset started (``CorrectedSimulator.reset``: ``episode_offset + arange(B)``)."""
        return self.sim.episode_offset + np.arange(self.num_envs, dtype=np.int64)

    def advance(self, actions: np.ndarray, hold: np.ndarray | None = None):
        """Step (envs in ``hold`` stay put), grade and record the batch; returns ``(StepResult, grades)``."""
        if self.closed:
            raise ServiceError("NOT_FOUND", f"session {self.id} is closed")
        if not self._started:
            raise ServiceError("FAILED_PRECONDITION", f"session {self.id}: call Reset before Step")
        self.recorder.check()
        try:
            r = self.sim.step(actions, hold) if self.batcher is None else self.batcher.step(self.sim, actions, hold)
            grades = grade_step(r, self.engine, self.scale, self.reward_config)
            done = np.asarray(r.terminated) | np.asarray(r.truncated)
            live = slice(None) if hold is None or not np.any(hold) else ~np.asarray(hold, bool)
            self.recorder.add(r.states[live], r.actions[live], r.next_states[live], r.episode_ids[live],
                              r.steps[live], done[live], r.success[live], {k: v[live] for k, v in grades.items()})
        except InputError:
            raise                                   # the request's actions or hold: INVALID_ARGUMENT
        except ValueError as exc:                   # past the request's checks: the server's fault, not the client's
            raise InternalError(f"session {self.id}: stepping failed inside the server "
                                f"({type(exc).__name__}: {exc})") from exc
        return r, grades

    # -- over the wire -------------------------------------------------------------------------
    def _sequenced(self, seq: int, key: bytes, run: Callable[[], object]):
        with self.lock:
            if self.closed:
                raise ServiceError("NOT_FOUND", f"session {self.id} is closed")
            if seq and seq == self._seq and self._cached is not None:
                if key != self._cached_key:
                    raise ServiceError("FAILED_PRECONDITION", f"sequence number {seq} of session {self.id} was "
                                       "already used by a different request; a retry must repeat the request")
                return self._cached
            self._check_recorder()
            if seq and seq != self._seq + 1:
                raise ServiceError("FAILED_PRECONDITION", f"sequence number {seq} is out of order for session "
                                   f"{self.id}: expected {self._seq + 1} (next) or {self._seq} (a retry)")
            response = run()
            if seq:
                self._seq, self._cached, self._cached_key = seq, response, key
            return response

    def _check_recorder(self) -> None:
        if self.recorder.error is not None:
            raise ServiceError("DATA_LOSS", f"session {self.id} stopped serving: {self.recorder.error}; "
                               "the trajectory directory must be writable")

    def reset(self, seq: int, seed: int | list[int] | None) -> pb.ResetResponse:
        def run():
            obs = self.restart(seed)
            return pb.ResetResponse(seq=seq, observations=encode(obs, "float32"),
                                    episode_ids=encode(self.start_ids(), "int64"), wm_version=self.wm_version)

        return self._sequenced(seq, f"reset:{seed}".encode(), run)

    def step(self, seq: int, actions: pb.Tensor, hold: pb.Tensor | None = None) -> pb.StepResponse:
        a = decode_float(actions, "actions", (self.num_envs, self.info.action_low.shape[0]))
        held = None if hold is None else decode_mask(hold, "hold", self.num_envs)

        def run():
            r, grades = self.advance(a, held)
            window = np.zeros(self.num_envs, bool) if r.window is None else np.asarray(r.window.mask, bool)
            return pb.StepResponse(
                seq=seq, observations=encode(r.observations, "float32"),
                final_observations=encode(r.final_observations, "float32"),
                reward=encode(grades["total"], "float32"),
                reward_terms={k: encode(grades[k], "float32") for k in TERMS},
                terminated=encode(r.terminated, "bool"), truncated=encode(r.truncated, "bool"),
                success=encode(r.success, "bool"), episode_ids=encode(r.episode_ids, "int64"),
                steps=encode(r.steps, "int32"), window=encode(window, "bool"), wm_version=self.wm_version)

        key = actions.SerializeToString() + (b"" if hold is None else hold.SerializeToString())
        return self._sequenced(seq, key, run)

    def close(self) -> str | None:
        """Mark closed, write what the recorder holds and give the engine back; returns the last shard written."""
        with self.lock:
            already, self.closed = self.closed, True
        if already:
            return None
        try:
            return self.recorder.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release(self.engine)


def check_seeds(seeds, num_envs: int) -> list[int]:
    """Per-env seeds: exactly ``num_envs`` integers in [0, 2**63)."""
    values = list(seeds)
    if len(values) != num_envs:
        raise ServiceError("INVALID_ARGUMENT", f"{len(values)} seeds for {num_envs} envs; give one seed per env "
                           "or a single seed")
    bad = [v for v in values if not _valid_seed(v)]
    if bad:
        raise ServiceError("INVALID_ARGUMENT", f"seeds must be integers in [0, 2**63), got {bad[:5]}")
    return [int(v) for v in values]


def check_seed(seed) -> int:
    """A batch seed: one integer in [0, 2**63)."""
    if not _valid_seed(seed):
        raise ServiceError("INVALID_ARGUMENT", f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def _valid_seed(value) -> bool:
    return isinstance(value, (int, np.integer)) and 0 <= int(value) < 2**63
