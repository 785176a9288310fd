"""The learned world simulator: the world model's prediction corrected by a physics engine at fidelity f.

Canonical loop (batched; every env auto-resets inside the step that ends its episode)::

    sim = CorrectedSimulator(task, wm, engine="mujoco", fidelity=0.5, mode="blend", horizon=5, num_envs=64)
    obs = sim.reset()                                  # [B, O]
    while training:
        r = sim.step(policy(obs))                      # StepResult
        obs = r.observations                           # already reset where r.terminated | r.truncated
        if r.window is not None:                       # envs that closed an H-step imagination window
            grade(r.window.imagined[r.window.mask], r.window.actual[r.window.mask])

Modes (``MODES``):

- ``blend``: ``s' = WM(s, a) + f (E(s, a) - WM(s, a))``. f = 1 is the engine exactly (no WM call for
  the correction), f = 0 is the WM alone (no engine call). With a world model on an engine base
  (``world_model.base=engine``: ``WM = E + D``) this is ``s' = E(s, a) + (1 - f) D(s, a)``: f scales how much
  of the learned difference from the engine is kept.
- ``reground``: the WM runs open loop and every ``k`` steps of an episode the state is replaced by the
  engine's step from the current state, with ``k = round(1 / f)`` (f = 1: every step, i.e. the engine;
  f = 0.5: every 2nd step; f = 0.1: every 10th; f = 0: never, i.e. the WM alone). About a fraction f
  of the steps is grounded.

``step(actions, hold=mask)`` leaves the held envs exactly where they are (no physics, no reward,
no episode clock, no imagination): that is how a gymnasium next-step autoreset returns an env's
fresh initial state without advancing it.

``step`` is ``begin`` -> ``compute`` -> ``combine`` -> ``finish``; ``services.batcher`` runs ``compute`` for many
simulators at once. Torch (the WM) and the engine (MuJoCo C arrays or JAX) meet here through float64 numpy arrays; when
a JAX engine runs on a GPU and the world model on CUDA (``device_path``), a blend step stays on the
device instead: the engine's next states reach torch through DLPack, and only the result is copied out.
Episodes are truncated at ``task.episode_length``; they terminate early only if a corrected state
turns non-finite (then ``terminated`` is True, the reward is 0, and the env is reset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulators.physics import PhysicsEngine, make_engine
from simulators.physics.base import InputError
from simulators.tasks import Task, make_task

MODES = ("blend", "reground")


def engine_platform(engine) -> str:
    """``"gpu"`` for a JAX engine whose model lives on a GPU, else ``"cpu"`` (MuJoCo's C engine runs on the host)."""
    model = getattr(engine, "jax_model", None)
    if model is None:
        return "cpu"
    import jax

    leaves = jax.tree_util.tree_leaves(model)
    devices = leaves[0].devices() if leaves and hasattr(leaves[0], "devices") else set()
    return "gpu" if any(d.platform == "gpu" for d in devices) else "cpu"


def device_path(platform: str, wm_device: str) -> bool:
    """Whether blend steps stay on the accelerator: the engine on a GPU and the world model on CUDA."""
    return platform == "gpu" and str(wm_device).startswith("cuda")


def engine_tensor(engine, states: np.ndarray, actions: np.ndarray):
    """A JAX engine's next states ``[B, S]`` as a torch tensor on the engine's device, handed over by DLPack."""
    import jax.numpy as jnp
    import torch

    with engine.precision():
        state = engine.step(engine.from_vector(states), actions)
        vec = jnp.concatenate([getattr(state, engine.pos_field), getattr(state, engine.vel_field)], axis=1)
    return torch.from_dlpack(vec)


@dataclass
class ImaginationWindow:
    """H-step imagination windows closed at this step; rows are valid where ``mask`` is True."""

    mask: np.ndarray        # [B] bool
    start: np.ndarray       # [B, S] state at the window's start
    actions: np.ndarray     # [B, H, A] actions executed in the window
    imagined: np.ndarray    # [B, H, S] the WM's open-loop prediction from ``start`` under ``actions``
    actual: np.ndarray      # [B, H, S] what the simulator produced


@dataclass
class StepResult:
    """One batched step of the corrected simulator."""

    states: np.ndarray              # [B, S] before the step
    actions: np.ndarray             # [B, A] clipped to the bounds
    next_states: np.ndarray         # [B, S] corrected, before auto-reset
    observations: np.ndarray        # [B, O] after auto-reset
    final_observations: np.ndarray  # [B, O] observation of next_states
    task_reward: np.ndarray         # [B] float32
    terminated: np.ndarray          # [B] bool (non-finite state)
    truncated: np.ndarray           # [B] bool (time limit)
    success: np.ndarray             # [B] bool episode success, valid where an episode ended
    episode_ids: np.ndarray         # [B] int64 of the transition
    steps: np.ndarray               # [B] int32 index of the transition within its episode
    window: ImaginationWindow | None


@dataclass
class PendingStep:
    """A step between ``begin`` and ``finish``: the rows the world model and the engine must compute.

    ``step`` computes them alone; ``services.batcher`` computes those of many simulators in one call each.
    """

    states: np.ndarray                  # [B, S] before the step
    actions: np.ndarray                 # [B, A] clipped
    held: np.ndarray                    # [B] bool
    wm_states: np.ndarray | None        # world-model rows: [s; imagined] (f < 1; s alone where they are equal) or imagined
    wm_actions: np.ndarray | None
    engine: bool                        # whether the engine steps (states, actions)
    ground: np.ndarray | None = None    # reground: [B] envs replaced by the engine's step


class CorrectedSimulator:
    """Batched reset/step combining a world model with a physics engine at fidelity f."""

    def __init__(self, task: str | Task, world_model, engine: str | PhysicsEngine, fidelity: float,
                 mode: str = "blend", horizon: int = 5, seed: int = 0, num_envs: int = 16,
                 episode_offset: int = 0, engine_params: dict | None = None):
        self.task = make_task(task)
        if mode not in MODES:
            raise ValueError(f"unknown corrected-simulator mode {mode!r}; valid modes: {', '.join(MODES)}")
        fidelity = float(fidelity)
        if not (np.isfinite(fidelity) and 0.0 <= fidelity <= 1.0):
            raise ValueError(f"fidelity must be in [0, 1], got {fidelity!r}")
        if int(horizon) < 1 or int(num_envs) < 1:
            raise ValueError(f"horizon and num_envs must be >= 1, got horizon={horizon}, num_envs={num_envs}")
        self.engine = make_engine(engine, self.task, engine_params) if isinstance(engine, str) else engine
        self.spec = self.engine.spec
        self.fidelity, self.mode, self.horizon = fidelity, mode, int(horizon)
        self.reground_every = 0 if fidelity == 0 else max(1, round(1.0 / fidelity))
        self.num_envs, self.episode_offset = int(num_envs), int(episode_offset)
        self._rng = np.random.default_rng(seed)
        self.world_model = None
        self.set_world_model(world_model)
        self._states = None

    def set_world_model(self, world_model) -> None:
        """Swap the world model (e.g. a new version between laps); sizes and task must match the engine."""
        diffs = [f"{name} {getattr(world_model, name)} vs engine {want}" for name, want in
                 (("state_size", self.spec.state_size), ("action_size", self.spec.action_size))
                 if getattr(world_model, name) != want]
        if world_model.task.name != self.task.name:
            diffs.append(f"task {world_model.task.name!r} vs {self.task.name!r}")
        if diffs:
            raise ValueError("world model does not fit this simulator: " + "; ".join(diffs))
        self.world_model = world_model
        # blend on the device (DLPack); may be set True to take that path on the CPU too
        self.device_blend = device_path(engine_platform(self.engine), getattr(world_model, "device", "cpu"))

    # -- episodes ------------------------------------------------------------------------------
    @property
    def next_episode_id(self) -> int:
        """The first episode id not handed out yet (``episode_offset`` before the first reset)."""
        return int(getattr(self, "_next_id", self.episode_offset))

    def reset(self) -> np.ndarray:
        """Start a fresh episode in every env; returns observations ``[B, O]``."""
        B, S, A, H = self.num_envs, self.spec.state_size, self.spec.action_size, self.horizon
        self._states = self.task.initial_states(self._rng, B).astype(np.float64)
        self._t = np.zeros(B, np.int32)
        self._good_run = np.zeros(B, np.int32)
        self._episode_ids = self.episode_offset + np.arange(B, dtype=np.int64)
        self._next_id = self.episode_offset + B
        self._win_k = np.zeros(B, np.int32)
        self._win_start = self._states.copy()
        self._imagined_state = self._states.copy()
        self._win_actions = np.zeros((B, H, A))
        self._win_imagined = np.zeros((B, H, S))
        self._win_actual = np.zeros((B, H, S))
        return self.task.observe(self._states)

    @property
    def states(self) -> np.ndarray:
        return self._states

    def _correct(self, p: PendingStep, wm_next: np.ndarray | None, engine_next: np.ndarray | None) -> np.ndarray:
        """The corrected next state of every env."""
        f = self.fidelity
        if f == 1.0:
            return engine_next
        if self.mode == "blend":
            return wm_next if f == 0.0 else wm_next + f * (engine_next - wm_next)
        return wm_next if engine_next is None else np.where(p.ground[:, None], engine_next, wm_next)

    def _blend_on_device(self, rows: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``blend`` with both models on their device: one world-model call for the correction and the imagination,
        the engine's states by DLPack, one copy of the results to the host."""
        import torch

        B, wm = len(a), self.world_model
        acts = np.concatenate([a, a]) if len(rows) > B else a   # B rows: the imagination starts from the states
        pred, _ = wm.predict(torch.as_tensor(rows, dtype=torch.float64, device=wm.device), acts)
        engine_next = engine_tensor(self.engine, rows[:B], a).to(pred)
        s1 = pred[:B] + self.fidelity * (engine_next - pred[:B])
        return s1.cpu().numpy(), pred[B:].cpu().numpy() if len(rows) > B else pred[:B].cpu().numpy()

    def begin(self, actions: np.ndarray, hold: np.ndarray | None = None) -> PendingStep:
        """Check the actions and say what the world model and the engine must compute for this step."""
        if self._states is None:
            raise RuntimeError("call reset() before step()")
        B, s, f = self.num_envs, self._states, self.fidelity
        a = self.engine.check_actions(actions, B)
        held = np.zeros(B, bool) if hold is None else np.asarray(hold, bool).reshape(-1)
        if held.shape != (B,):
            raise InputError(f"hold has shape {np.shape(hold)}, expected ({B},) (one flag per env)")
        # One WM call for both the correction (from s) and the imagination (from the imagined state); where they
        # are the same rows (every window starts at this step, or f = 0) they are computed once (one env: two rows
        # cost what one does). The values are the same where the model's rows do not depend on their batch
        # (``WorldModel.rows_independent``); either way a step is a function of the simulator's state.
        need_wm = f < 1.0
        shared = need_wm and B > 1 and np.array_equal(s, self._imagined_state)
        rows = s if shared else np.concatenate([s, self._imagined_state]) if need_wm else self._imagined_state
        ground = None
        if f == 1.0 or (self.mode == "blend" and f > 0.0):
            engine = True
        elif self.mode == "blend":
            engine = False
        else:  # reground: the full batch when any env grounds (keeps JAX engines at one compiled shape)
            ground = (self._t + 1) % self.reground_every == 0 if self.reground_every else np.zeros(B, bool)
            engine = bool(ground.any())
        return PendingStep(s, a, held, rows, np.concatenate([a, a]) if need_wm and not shared else a, engine, ground)

    def compute(self, p: PendingStep) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The world model's and the engine's next states of ``p``'s rows, this simulator alone."""
        wm = None if p.wm_states is None else self.world_model.step(p.wm_states, p.wm_actions)
        return wm, (self.engine.step_vectors(p.states, p.actions) if p.engine else None)

    def step(self, actions: np.ndarray, hold: np.ndarray | None = None) -> StepResult:
        """Advance every env not in ``hold`` one step; finished envs are reset inside this step."""
        p = self.begin(actions, hold)
        if self.device_blend and self.mode == "blend" and 0.0 < self.fidelity < 1.0:
            return self.finish(p, *self._blend_on_device(p.wm_states, p.actions))
        return self.finish(p, *self.combine(p, *self.compute(p)))

    def combine(self, p: PendingStep, wm_out: np.ndarray | None, engine_next: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:
        """(corrected next states, next imagined states) from the computed rows of ``p``."""
        B = len(p.states)
        if self.fidelity == 1.0:
            return self._correct(p, None, engine_next), wm_out
        wm_next = wm_out[:B]
        return self._correct(p, wm_next, engine_next), (wm_out[B:] if len(wm_out) > B else wm_next)

    def finish(self, p: PendingStep, s1: np.ndarray, imagined_next: np.ndarray) -> StepResult:
        """Hold, terminate, reward, record the imagination and auto-reset: the rest of ``step``."""
        H = self.horizon
        s, a, held = p.states, p.actions, p.held
        live = ~held
        if held.any():
            s1 = np.where(held[:, None], s, s1)
            imagined_next = np.where(held[:, None], self._imagined_state, imagined_next)

        terminated = ~np.isfinite(s1).all(axis=1) & live
        safe = np.where(terminated[:, None], 0.0, s1)
        steps = self._t.copy()
        self._t += live
        truncated = (self._t >= self.task.episode_length) & ~terminated & live
        reward = np.where(terminated | held, 0.0, self.task.reward(safe, a)).astype(np.float32)
        good = np.asarray(self.task.is_good(safe)) & ~terminated
        self._good_run = np.where(held, self._good_run, np.where(good, self._good_run + 1, 0)).astype(np.int32)
        success = self._good_run >= self.task.success_steps
        episode_ids = self._episode_ids.copy()

        # Imagination: record this step in each env's window, close the windows that reached H.
        rows_b = np.flatnonzero(live)
        k = self._win_k[rows_b]
        self._win_actions[rows_b, k] = a[rows_b]
        self._win_imagined[rows_b, k] = imagined_next[rows_b]
        self._win_actual[rows_b, k] = s1[rows_b]
        self._win_k = self._win_k + live
        closed = (self._win_k >= H) & live
        window = None
        if closed.any():
            window = ImaginationWindow(closed, self._win_start.copy(), self._win_actions.copy(),
                                       self._win_imagined.copy(), self._win_actual.copy())
        self._imagined_state = np.where(closed[:, None], s1, imagined_next)
        self._win_start = np.where(closed[:, None], s1, self._win_start)
        self._win_k = np.where(closed, 0, self._win_k).astype(np.int32)

        # Auto-reset of finished envs (windows restart with the new episode).
        done = terminated | truncated
        final_obs = self.task.observe(s1)
        obs = final_obs.copy()              # observe only the rows that reset (a per-step cost at batch 1)
        s_next = s1.copy()
        if done.any():
            n = int(done.sum())
            fresh = self.task.initial_states(self._rng, n).astype(np.float64)
            s_next[done] = fresh
            self._t[done] = 0
            self._good_run[done] = 0
            self._episode_ids[done] = self._next_id + np.arange(n)
            self._next_id += n
            self._win_k[done] = 0
            self._win_start[done] = fresh
            self._imagined_state[done] = fresh
            obs[done] = self.task.observe(fresh)
        self._states = s_next
        return StepResult(s, a, s1, obs, final_obs, reward, terminated, truncated,
                          success & done, episode_ids, steps, window)

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()
