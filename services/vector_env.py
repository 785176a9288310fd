"""Gymnasium ``VectorEnv`` adapters over a batch of corrected-simulator environments.

``SimulatorVectorEnv`` holds the conversion shared by ``RemoteVectorEnv`` (one gRPC session) and
``services.local_env.LocalVectorEnv`` (an in-process ``CorrectedSimulator``): the backend steps
with same-step auto-reset; this class presents gymnasium's **next-step** autoreset, the mode RLlib's
``SingleAgentEnvRunner`` expects (it records the observation after a done step as the terminal
observation, and the next step's observation as the new episode's reset observation).

    env = RemoteVectorEnv(address, "pendulum", num_envs=64, fidelity=0.5)
    obs, info = env.reset(seed=0)
    for t in range(T):
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        # info["reward/task"|"reward/imagination"|"reward/physics"|"reward/total"], info["success"] (+ "_" masks)
    env.close()

``normalized_actions=True``: the env takes actions in [-1, 1] (RLlib's normalized convention) and maps
them to the task's bounds itself, ``low + (a + 1) * (high - low) / 2`` clipped to the bounds (RLlib's
``unsquash_action``, bit for bit, for the whole batch at once instead of once per env);
``action_space`` is then ``[-1, 1]`` (for a task bounded on every side, as RLlib maps only those) and
``physical_action_space`` keeps the task's bounds.

``step_async(actions)`` then ``step_wait()`` is ``step`` with the served step on the wire in between (the
caller computes something else meanwhile: ``services.lanes``).

Next-step reset: an env whose episode ended returns its terminal observation; the backend has
already reset it to a fresh initial state, so on the following call the env is sent as held
(``hold``): it ignores the given action, does not move, and returns that initial state's
observation with reward 0 and no termination, exactly as gymnasium's next-step autoreset does.

``reset(seed=...)`` takes an int (the whole batch) or one seed per env; ``options={"reset_mask": m}``
is accepted when every env is reset (an all-True mask) and refused otherwise, as these envs reset
themselves (next-step autoreset). ``reset`` returns ``info["episode_id"]``. A closed env raises.

A server that restarts (a killed Ray server actor comes back at the same address) is survived:
calls wait for it (``SimulatorClient`` retries UNAVAILABLE), and when it no longer knows the
session, ``RemoteVectorEnv`` re-creates the session with the same settings and ends every running
episode as **truncated** at its last observation (reward 0); the next step starts new episodes,
as after any next-step autoreset. ``env.sessions_recreated`` counts these.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from services.auth import ClientCredentials
from services.client import NotFound, SessionInfo, SimulatorClient, SimulatorError, StepReply, Unavailable

TERMS = ("task", "imagination", "physics")
log = logging.getLogger(__name__)


class SimulatorVectorEnv(VectorEnv):
    """Next-step-autoreset ``VectorEnv`` over a same-step batch backend (subclasses supply ``_reset``/``_step``)."""

    metadata: ClassVar[dict] = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}
    render_mode = None

    def _setup(self, info: SessionInfo, normalized_actions: bool = False) -> None:
        self.num_envs = int(info.num_envs)
        self.session_info = info
        self.single_observation_space = spaces.Box(info.observation_low.astype(np.float32),
                                                   info.observation_high.astype(np.float32), dtype=np.float32)
        self.physical_action_space = spaces.Box(info.action_low.astype(np.float32),
                                                info.action_high.astype(np.float32), dtype=np.float32)
        self.normalized_actions = bool(normalized_actions)
        self.single_action_space = (normalized_space(self.physical_action_space) if self.normalized_actions
                                    else self.physical_action_space)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._pending = np.zeros(self.num_envs, dtype=bool)
        self._needs_reset = True
        self._in_flight: tuple | None = None     # (backend token, held envs) of a step_async not yet waited for

    # -- backend -------------------------------------------------------------------------------
    def _reset(self, seed: int | None) -> np.ndarray:
        raise NotImplementedError

    def _step(self, actions: np.ndarray, hold: np.ndarray | None = None) -> StepReply:
        raise NotImplementedError

    def _send(self, actions: np.ndarray, hold: np.ndarray | None) -> object:
        """Start a step; what ``_receive`` needs to finish it (here: the finished step)."""
        return self._step(actions, hold)

    def _receive(self, token) -> StepReply:
        return token

    def _episode_ids(self) -> np.ndarray | None:
        """``[B]`` the episodes the last reset started (None when the backend does not say)."""
        return None

    def _drop_in_flight(self) -> None:
        """Forget a step that was sent and not waited for (before a reset)."""

    # -- gymnasium -----------------------------------------------------------------------------
    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        self._check_open()
        seed = self._seed(seed)
        self._check_options(options)
        super().reset(seed=seed if isinstance(seed, int) else None)
        if self._in_flight is not None:        # a step sent but never waited for: its answer is dropped
            self._in_flight = None
            self._drop_in_flight()
        obs = self._reset(seed)
        self._pending[:] = False
        self._needs_reset = False
        ids = self._episode_ids()
        info = {} if ids is None else {"episode_id": ids, "_episode_id": np.ones(self.num_envs, bool)}
        return np.asarray(obs, dtype=np.float32), info

    def _seed(self, seed) -> int | list[int] | None:
        """None, an int for the batch, or one int per env (a list of equal seeds is that int)."""
        if isinstance(seed, (list, tuple, np.ndarray)):
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"a list of seeds needs one per env: got {len(seeds)} for {self.num_envs} envs")
            if not all(isinstance(s, (int, np.integer)) and s >= 0 for s in seeds):
                raise ValueError(f"seeds must be non-negative ints, got {seeds[:5]}")
            return int(seeds[0]) if len(set(seeds)) == 1 else [int(s) for s in seeds]
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, a list of one int per env, or None; got {seed!r}")
        return None if seed is None else int(seed)

    def _check_options(self, options: dict[str, Any] | None) -> None:
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != bool or m.shape != (self.num_envs,):
                raise ValueError(f"reset_mask must be a bool array of shape ({self.num_envs},), got {m.dtype} {m.shape}")
            if not m.all():
                raise ValueError("reset_mask resetting only some envs is not supported: these envs reset themselves "
                                 "when their episode ends (next-step autoreset); reset() resets all of them")
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; allowed: reset_mask (all True)")

    def _check_open(self) -> None:
        if getattr(self, "closed", False):
            raise RuntimeError(f"{type(self).__name__} is closed; create a new env")

    def step(self, actions):
        a, held = self._prepare(actions)
        return self._present(self._step(a, held if held.any() else None), held)

    def step_async(self, actions) -> None:
        """Send ``actions`` (checked as ``step`` checks them) and return; ``step_wait`` gives what ``step`` would.

        A served env's step is on the wire meanwhile, so the caller can compute something else (another
        lane's actions: ``services.lanes``); an in-process env steps here.
        """
        a, held = self._prepare(actions)
        self._in_flight = (self._send(a, held if held.any() else None), held)

    def step_wait(self):
        """The step ``step_async`` sent: ``(obs, reward, terminated, truncated, info)`` as ``step`` returns them."""
        if self._in_flight is None:
            raise RuntimeError("step_wait() without a step in flight; call step_async(actions) first")
        token, held = self._in_flight
        self._in_flight = None
        return self._present(self._receive(token), held)

    def _prepare(self, actions) -> tuple[np.ndarray, np.ndarray]:
        """Checked actions and the envs held this step (those whose episode ended on the last one)."""
        self._check_open()
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        if self._in_flight is not None:
            raise RuntimeError("a step is already in flight; call step_wait() before the next step")
        a = check_actions(actions, self.action_space.shape)
        return (unsquash(a, self.physical_action_space) if self.normalized_actions else a), self._pending

    def _present(self, out: StepReply, held: np.ndarray):
        """A same-step-autoreset backend step as gymnasium's next-step-autoreset ``step`` return."""
        ended = out.terminated | out.truncated
        live = ~held
        obs = np.where((ended & live)[:, None], out.final_observations, out.observations).astype(np.float32)
        reward = np.where(live, out.reward, 0.0).astype(np.float32)
        terminated, truncated = out.terminated & live, out.truncated & live
        info: dict[str, np.ndarray] = {}
        for name in (*TERMS, "total"):
            value = out.reward if name == "total" else out.reward_terms[name]
            info[f"reward/{name}"] = np.where(live, value, 0.0).astype(np.float32)
            info[f"_reward/{name}"] = live.copy()
        info["success"], info["_success"] = out.success & ended & live, ended & live
        info["episode_id"], info["_episode_id"] = out.episode_ids, live.copy()
        info["window"], info["_window"] = out.window & live, live.copy()
        self._pending = ended.copy()
        return obs, reward, terminated, truncated, info


def check_actions(actions, shape: tuple[int, ...]) -> np.ndarray:
    """``actions`` as float32 ``shape`` ``(num_envs, action_size)``, all finite; a ``ValueError`` naming what is wrong."""
    a = np.asarray(actions, dtype=np.float32)
    if a.shape != shape:
        raise ValueError(f"actions have shape {a.shape}, expected {shape} (num_envs, action_size)")
    if not np.isfinite(a).all():
        raise ValueError(f"non-finite action in env(s) {np.flatnonzero(~np.isfinite(a).all(axis=1))[:10].tolist()}")
    return a


def normalized_space(space: spaces.Box) -> spaces.Box:
    """``[-1, 1]`` in ``space``'s shape: what a ``normalized_actions`` env takes (``space`` itself where it is
    not bounded on every side, as RLlib leaves such a space alone)."""
    if not space.is_bounded("both"):
        return space
    return spaces.Box(-1.0, 1.0, space.shape, dtype=np.float32)


def unsquash(actions: np.ndarray, space: spaces.Box) -> np.ndarray:
    """Normalized actions ``[B, A]`` -> ``space``'s bounds, clipped: RLlib's ``unsquash_action`` for every row at
    once (actions unchanged where ``space`` is not bounded on every side, as there)."""
    if not space.is_bounded("both"):
        return actions
    low, high = space.low, space.high
    return np.clip(low + (actions + 1.0) * (high - low) / 2.0, low, high)


class RemoteVectorEnv(SimulatorVectorEnv):
    """A ``VectorEnv`` over one session of a simulator server (numpy, gymnasium and grpc only).

    ``normalized_actions``: actions in [-1, 1], mapped to the task's bounds here (see the module's docstring).
    ``client`` shares an open ``SimulatorClient`` (one channel for several sessions, e.g. the lanes of
    ``services.lanes``; the env then leaves it open on close).
    ``timeout`` bounds every call, connecting included. ``token``/``token_file`` and ``tls_root_cert``
    (or ``credentials``) are what a secured server wants; left out, they come from ``$FLYWHEEL_TOKEN``,
    ``$FLYWHEEL_TOKEN_FILE`` and ``$FLYWHEEL_TLS_ROOT_CERT`` (``services.auth.ClientCredentials.from_env``).
    """

    def __init__(self, address: str, task: str, num_envs: int, fidelity: float = 1.0, mode: str = "blend",
                 seed: int = 0, reward_weights: dict[str, float] | None = None, horizon: int = 0,
                 world_model_version: str = "", streaming: bool = False, timeout: float = 60.0,
                 max_message_mb: int = 256, token: str | None = None, token_file: str | None = None,
                 tls_root_cert: str | None = None, credentials: ClientCredentials | None = None,
                 client: SimulatorClient | None = None, normalized_actions: bool = False):
        self._owns_client = client is None
        self.client = client or SimulatorClient(address, timeout=timeout, max_message_mb=max_message_mb, token=token,
                                                token_file=token_file, tls_root_cert=tls_root_cert,
                                                credentials=credentials)
        try:
            self.session = self.client.create_session(task, num_envs, fidelity=fidelity, mode=mode, seed=seed,
                                                      world_model_version=world_model_version,
                                                      reward_weights=reward_weights, horizon=horizon)
        except BaseException:
            if self._owns_client:
                self.client.close()
            raise
        if streaming:
            self.session.use_stream()
        self._setup(self.session.info, normalized_actions)
        self._current: np.ndarray | None = None    # [B, O] observation of each env's present state

    @property
    def sessions_recreated(self) -> int:
        return self.session.recreated

    def _episode_ids(self) -> np.ndarray | None:
        return self.session.episode_ids

    def _reset(self, seed: int | list[int] | None) -> np.ndarray:
        try:
            obs = self.session.reset(seed)
        except NotFound as exc:
            self._recreate(exc)
            obs = self.session.reset(seed)
        self._current = np.asarray(obs, np.float32)
        return obs

    def _step(self, actions: np.ndarray, hold: np.ndarray | None = None) -> StepReply:
        try:
            out = self.session.step(actions, hold)      # blocking: no thread of gRPC's per call, as a future needs
        except NotFound as exc:
            return self._truncated(hold, exc)
        self._current = out.observations
        return out

    def _send(self, actions: np.ndarray, hold: np.ndarray | None) -> tuple:
        return self.session.step_start(actions, hold), hold

    def _receive(self, token) -> StepReply:
        pending, hold = token
        try:
            out = pending.result()
        except NotFound as exc:
            return self._truncated(hold, exc)
        self._current = out.observations
        return out

    def _drop_in_flight(self) -> None:
        pending = self.session._pending
        if pending is not None:
            with contextlib.suppress(SimulatorError):   # the reset that follows decides whether the session lives
                pending.result()

    def _recreate(self, why: NotFound) -> None:
        lost = self.session.id
        self.session.recreate()
        log.warning("simulator session %s at %s is gone (%s); continuing in session %s", lost, self.client.address,
                    why.details, self.session.id)

    def _truncated(self, hold: np.ndarray | None, why: NotFound) -> StepReply:
        """Continue in a new session: the step never ran, running episodes end truncated at their last observation."""
        self._recreate(why)
        obs = np.asarray(self.session.reset(None), np.float32)
        live = np.ones(self.num_envs, bool) if hold is None else ~np.asarray(hold, bool)
        final = np.where(live[:, None], self._current, obs).astype(np.float32)
        self._current = obs
        zeros, no = np.zeros(self.num_envs, np.float32), np.zeros(self.num_envs, bool)
        return StepReply(obs, final, zeros, {k: zeros for k in TERMS}, no, live, no,
                         np.full(self.num_envs, -1, np.int64), np.zeros(self.num_envs, np.int32), no,
                         self.session.info.wm_version)

    def close_extras(self, **kwargs) -> None:
        if not hasattr(self, "session"):      # the constructor failed: nothing was opened
            return
        try:
            self.session.close()
        except (NotFound, Unavailable):   # the server already dropped the session or went away
            pass
        finally:
            if self._owns_client:
                self.client.close()
