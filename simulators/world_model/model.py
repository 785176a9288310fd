"""The world model: a probabilistic ensemble of p(s' | s, a) over a task's state vectors.

Canonical use::

    wm = WorldModel(task, spec.state_size, spec.action_size, WorldModelConfig())
    metrics = wm.fit(dataset)                      # held-out split by episodes, early stopping
    mean, std = wm.predict(states, actions)        # next state: ensemble mean, total std
    s1 = wm.step(states, actions)                  # ensemble mean (numpy)
    traj = wm.imagine(s0, actions)                 # [B, H, S] open loop
    wm.save(path)
    wm = WorldModel(task, S, A, WorldModelConfig(base="engine"), base_params=engine_params)  # learns E's error
    wm = WorldModel.load(path)                               # as saved, fitting settings included
    wm = WorldModel.load(path, task, config=run_config)      # architecture checked, fitting settings from run_config

Inputs are the task's observation features of the state (``task.observe``: angles as cos/sin, so
raw angles that wind past +-pi do not confuse the network; a task's observation must therefore be
Markov) plus the action. Outputs are the mean and log-std of the *change* of the raw state vector,
so predicted angles stay continuous with the input's. Inputs and outputs are normalised with
statistics fitted on the first ``fit``'s training split.

``config.base`` says what the predicted change is added to: ``"none"`` (the default), ``s' = s + D(s, a)``;
``"engine"``, ``s' = E(s, a) + D(s, a)`` with ``E`` MuJoCo's C engine built with ``base_params`` (the
simulator's engine parameters): the network then learns only where reality differs from the engine, which a
few reality transitions can teach when the whole dynamics could not be learned from them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from simulators.dataset import TransitionDataset
from simulators.tasks import Task, make_task
from simulators.world_model.ensemble import CHUNK_ROWS, GaussianEnsemble, member_mean

# The fields that shape the network: stored in a checkpoint and checked when it is loaded with a config.
# The other fields (learning rate, batch size, epochs, patience, holdout, seed, device, threads, inference dtype) say how
# to fit and where to run, and come from the config given to ``WorldModel.load``.
ARCHITECTURE: tuple[str, ...] = ("ensemble_size", "hidden_size", "num_layers", "base")
BASES: tuple[str, ...] = ("none", "engine")
INFERENCE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# CPU instructions that compute bfloat16 products natively; without them torch emulates bfloat16 (AVX2 only: the
# README's AMD EPYC figures, predictions 5-40x slower than in float32)
BFLOAT16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
log = logging.getLogger(__name__)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def warn_emulated_bfloat16() -> bool:
    """Log once per process when bfloat16 predictions run on a CPU without bfloat16 instructions; True if so."""
    flags = cpu_flags()
    if not flags or flags & set(BFLOAT16_CPU_FLAGS):
        return False
    log.warning("world_model.inference_dtype=bfloat16 on a CPU without bfloat16 instructions (none of %s): torch "
                "emulates it and predictions are several times slower than in float32; use "
                "world_model.inference_dtype=float32 here", ", ".join(BFLOAT16_CPU_FLAGS))
    return True


@dataclass
class WorldModelConfig:
    """Hyper-parameters of the ensemble (``ARCHITECTURE``) and of its fitting."""

    ensemble_size: int = 5
    hidden_size: int = 128
    num_layers: int = 3
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    max_epochs: int = 50
    patience: int = 5           # epochs without held-out improvement before stopping
    holdout: float = 0.1        # fraction of episodes held out
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0        # torch CPU threads while fitting/predicting; 0 keeps torch's own setting
    num_gpus: float = 0.0       # GPUs the fitting task asks Ray for (0 = CPU); it fits on CUDA when it gets one
    base: str = "none"          # the change is added to: "none" (s' = s + D), "engine" (s' = E(s, a) + D)
    inference_dtype: str = "float32"   # predictions' hidden products: float32 | bfloat16 (faster on AMX CPUs and GPUs)

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"WorldModelConfig.base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.inference_dtype not in INFERENCE_DTYPES:
            raise ValueError(f"WorldModelConfig.inference_dtype must be one of {', '.join(INFERENCE_DTYPES)}, "
                             f"got {self.inference_dtype!r}")
        for name in ("ensemble_size", "hidden_size", "num_layers", "batch_size", "max_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"WorldModelConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.patience < 0:
            raise ValueError(f"WorldModelConfig.patience must be >= 0, got {self.patience!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"WorldModelConfig.holdout must be in [0, 1), got {self.holdout!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"WorldModelConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.num_gpus:
            raise ValueError(f"WorldModelConfig.num_gpus must be >= 0, got {self.num_gpus!r}")

    @classmethod
    def from_dict(cls, data: dict) -> WorldModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown WorldModelConfig key(s) {sorted(unknown)}; allowed: {', '.join(sorted(names))}")
        return cls(**data)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (``n <= 0``: unchanged), restoring the setting after."""
    if n <= 0 or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _writable(x):
    """``x``, or a copy of a read-only array (a decoded request): torch would share its memory and warn."""
    return x.copy() if isinstance(x, np.ndarray) and not x.flags.writeable else x


def new_version() -> str:
    return f"wm-{uuid.uuid4().hex[:8]}"


class WorldModel:
    """Probabilistic ensemble world model; numpy in -> numpy out, torch in -> torch out."""

    def __init__(self, task: str | Task, state_size: int, action_size: int, config: WorldModelConfig | None = None,
                 base_params: dict | None = None):
        self.task = make_task(task)
        self.config = config or WorldModelConfig()
        self.base_params = {k: float(v) for k, v in (base_params or {}).items()} if self.config.base == "engine" else {}
        self._base, self._base_lock = None, threading.Lock()
        self._independent: dict[tuple, bool] = {}
        self.state_size, self.action_size = int(state_size), int(action_size)
        self.device = torch.device(self.config.device)
        obs = self.task.observe(np.zeros((1, self.state_size)))
        self.in_features = obs.shape[1] + self.action_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.net = GaussianEnsemble(self.config.ensemble_size, self.in_features, self.state_size,
                                        self.config.hidden_size, self.config.num_layers).to(self.device)
        z = {"device": self.device, "dtype": torch.float32}
        self.norm = {"in_mean": torch.zeros(self.in_features, **z), "in_std": torch.ones(self.in_features, **z),
                     "out_mean": torch.zeros(self.state_size, **z), "out_std": torch.ones(self.state_size, **z)}
        self.state_scale = np.ones(self.state_size)
        self.fitted = False
        self.version = new_version()

    # -- prediction ----------------------------------------------------------------------------
    def base_step(self, states, actions) -> np.ndarray:
        """What the change is added to, float64 ``[B, S]``: the states (base none) or the engine's step from them."""
        s = np.asarray(states, dtype=np.float64)
        if self.config.base == "none":
            return s
        finite = np.isfinite(s).all(axis=1)   # MuJoCo would reset a non-finite state: keep it non-finite instead
        with self._base_lock:
            if self._base is None:
                from simulators.physics import make_engine

                self._base = make_engine("mujoco", self.task, self.base_params or None)
            out = self._base.step(np.where(finite[:, None], s, 0.0), actions)
        return np.where(finite[:, None], out, np.nan)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_base", "_base_lock", "_independent")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._base, self._base_lock = None, threading.Lock()
        self._independent = {}

    def _inputs(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.task.observe(states), actions], dim=1)
        return (x - self.norm["in_mean"]) / self.norm["in_std"]

    def _as_tensors(self, states, actions) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.as_tensor(_writable(states), dtype=torch.float32, device=self.device)
        a = torch.as_tensor(_writable(actions), dtype=torch.float32, device=self.device)
        if a.dim() == 1 and self.action_size == 1:
            a = a[:, None]
        if s.dim() != 2 or s.shape[1] != self.state_size:
            raise ValueError(f"world model: states have shape {tuple(s.shape)}, expected (batch, {self.state_size})")
        if a.shape != (s.shape[0], self.action_size):
            raise ValueError(f"world model: actions have shape {tuple(a.shape)}, expected ({s.shape[0]}, {self.action_size})")
        return s, a

    @torch.inference_mode()
    def _members(self, states, actions, with_std: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-member normalised state change and std ``[E, B, S]`` (float32); the std in state units.

        A row's mean is meant to depend on that row alone, not on the rest of the batch: the smallest batches
        are padded (``ensemble.MIN_ROWS``: they take other kernels), and members are averaged by
        ``member_mean``. Whether the matrix library keeps it so for this model's layer shapes is checked by
        ``rows_independent`` (it does for the default architecture here).
        (The std's softplus bound may differ in its last bit between batch sizes: a vectorised
        transcendental computes the tail of an array with other instructions.)
        """
        s, a = self._as_tensors(states, actions)
        if self.config.inference_dtype == "bfloat16" and self.device.type == "cpu":
            warn_emulated_bfloat16()
        with torch_threads(self.config.num_threads):
            x = self._inputs(s, a)
            mean, log_std = self.net.infer(x, with_std, INFERENCE_DTYPES[self.config.inference_dtype])
            return mean, (torch.exp(log_std) * self.norm["out_std"] if with_std else None)

    @torch.inference_mode()
    def _delta(self, mean: torch.Tensor) -> torch.Tensor:
        """Ensemble-mean state change ``[B, S]`` in state units from normalised member means ``[E, B, S]``."""
        return member_mean(mean) * self.norm["out_std"] + self.norm["out_mean"]

    @torch.inference_mode()
    def predict(self, states, actions):
        """Next-state mean (ensemble mean) and total std (aleatoric + epistemic), each ``[B, S]``."""
        mean, sigma = self._members(states, actions)
        delta = self._delta(mean)
        mu = mean * self.norm["out_std"] + self.norm["out_mean"]
        spread = mu - member_mean(mu)
        std = torch.sqrt(member_mean(sigma * sigma) + member_mean(spread * spread))
        if isinstance(states, torch.Tensor):
            if self.config.base == "none":
                return states + delta.to(states), std.to(states)
            acts = actions.detach().cpu().numpy() if isinstance(actions, torch.Tensor) else actions
            base = torch.as_tensor(self.base_step(states.detach().cpu().numpy(), acts))
            return base.to(states) + delta.to(states), std.to(states)
        return self.base_step(states, actions) + delta.double().cpu().numpy(), std.double().cpu().numpy()

    def step(self, states, actions) -> np.ndarray:
        """Ensemble-mean next state ``[B, S]`` (float64 numpy)."""
        delta = self._delta(self._members(states, actions, with_std=False)[0])
        return self.base_step(states, actions) + delta.double().cpu().numpy()

    def rows_independent(self) -> bool:
        """Whether each row's ``step`` is the same, bit for bit, in any batch on this machine.

        A matrix library may choose its kernels (and so its order of summation) by batch size and thread
        count, for some layer shapes and not others. Checked once per weights version, dtype, device and
        thread count on a probe batch: slices of 1-600 rows at several offsets, across the CPU chunk
        boundary. ``services.batcher`` merges a model's rows with other sessions' only when this holds.
        """
        key = (self.version, self.config.inference_dtype, str(self.device), torch.get_num_threads())
        if key not in self._independent:
            rng = np.random.default_rng(0)
            n = 2 * CHUNK_ROWS + 37
            states = rng.normal(size=(n, self.state_size)) * self.state_scale
            actions = rng.uniform(-1.0, 1.0, (n, self.action_size))
            whole = self.step(states, actions)
            sizes = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 100, 129, 255, 257, CHUNK_ROWS + 1, 600)
            self._independent[key] = all(
                np.array_equal(self.step(states[lo:lo + k], actions[lo:lo + k]), whole[lo:lo + k], equal_nan=True)
                for k in sizes for lo in {0, 1, 37, n - k})
        return self._independent[key]

    @torch.inference_mode()
    def disagreement(self, states, actions) -> np.ndarray:
        """Epistemic uncertainty: std of the members' predicted means ``[B, S]``."""
        mean = self._members(states, actions, with_std=False)[0] * self.norm["out_std"]
        return mean.std(0, unbiased=False).double().cpu().numpy()

    def imagine(self, s0, actions) -> np.ndarray:
        """Open-loop rollout of the ensemble mean from ``s0 [B, S]`` under ``actions [B, H, A]`` -> ``[B, H, S]``."""
        s = np.asarray(s0, dtype=np.float64)
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 3 or a.shape[0] != len(s) or a.shape[2] != self.action_size:
            raise ValueError(f"imagine: actions have shape {a.shape}, expected ({len(s)}, H, {self.action_size})")
        out = np.empty((len(s), a.shape[1], self.state_size))
        for h in range(a.shape[1]):
            s = self.step(s, a[:, h])
            out[:, h] = s
        return out

    # -- training ------------------------------------------------------------------------------
    def _changes(self, data: TransitionDataset) -> torch.Tensor:
        """The training targets ``[N, S]``: each transition's next state minus the base (the state or the engine's step)."""
        base = self.base_step(data.states, data.actions)
        return torch.as_tensor(np.asarray(data.next_states, np.float64) - base, dtype=torch.float32, device=self.device)

    def _fit_normalisers(self, data: TransitionDataset, d: torch.Tensor) -> None:
        s = torch.as_tensor(data.states, dtype=torch.float32, device=self.device)
        a = torch.as_tensor(data.actions, dtype=torch.float32, device=self.device)
        x = torch.cat([self.task.observe(s), a], dim=1)
        self.norm = {"in_mean": x.mean(0), "in_std": x.std(0).clamp_min(1e-6),
                     "out_mean": d.mean(0), "out_std": d.std(0).clamp_min(1e-6)}
        self.state_scale = np.maximum(np.asarray(data.states, dtype=np.float64).std(0), 1e-6)

    def _tensors(self, data: TransitionDataset, d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s, a = self._as_tensors(data.states, data.actions)
        d = self._changes(data) if d is None else d
        return self._inputs(s, a), (d - self.norm["out_mean"]) / self.norm["out_std"]

    @torch.no_grad()
    def _holdout_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        mean, _ = self.net(x)
        return float(((mean.mean(0) - y) ** 2).mean())

    def fit(self, dataset: TransitionDataset, reinit: bool = False) -> dict:
        """Train on ``dataset`` (warm start after the first fit unless ``reinit``); returns metrics.

        Episodes are split into train and held-out (``config.holdout``); each member sees its own
        shuffle of the training set; training stops after ``patience`` epochs without held-out
        improvement and the best weights are kept. Normalisers and ``state_scale`` are fitted on
        the first call (or with ``reinit``) and kept afterwards, so errors stay comparable across laps.
        """
        with torch_threads(self.config.num_threads):
            return self._fit(dataset, reinit)

    def _fit(self, dataset: TransitionDataset, reinit: bool) -> dict:
        cfg = self.config
        if len(dataset) < 2:
            raise ValueError(f"world model fit needs at least 2 transitions, got {len(dataset)}")
        train, hold = dataset.split_episodes(cfg.holdout, seed=cfg.seed)
        d = self._changes(train)      # with an engine base, the engine steps the training set once
        if not self.fitted or reinit:
            self._fit_normalisers(train, d)
        x, y = self._tensors(train, d)
        hx, hy = self._tensors(hold) if len(hold) else (x, y)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        n, e, bs = len(x), cfg.ensemble_size, min(cfg.batch_size, len(x))
        best, best_epoch, best_state = self._holdout_loss(hx, hy), 0, copy.deepcopy(self.net.state_dict())
        start, epoch, train_nll = time.perf_counter(), 0, float("nan")
        self.net.train()
        for epoch in range(1, cfg.max_epochs + 1):
            order = torch.argsort(torch.rand(e, n, generator=gen), dim=1).to(self.device)
            total = 0.0
            for i in range(0, n - bs + 1, bs):
                idx = order[:, i:i + bs]
                loss = self.net.nll(x[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            train_nll = total / max(1, n // bs)
            loss = self._holdout_loss(hx, hy)
            if loss < best - 1e-6:
                best, best_epoch, best_state = loss, epoch, copy.deepcopy(self.net.state_dict())
            elif epoch - best_epoch > cfg.patience:
                break
        seconds = time.perf_counter() - start
        self.net.load_state_dict(best_state)
        self.net.eval()
        self.fitted = True
        self.version = new_version()
        from simulators.world_model.evaluation import one_step_error

        return {"epochs": epoch, "best_epoch": best_epoch, "train_nll": train_nll,
                "holdout_mse": one_step_error(self, hold if len(hold) else train),
                "n_train": len(train), "n_holdout": len(hold), "seconds": seconds,
                "transitions_per_second": epoch * n / max(seconds, 1e-9), "threads": torch.get_num_threads(),
                "version": self.version}

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write weights, config, task, sizes, normalisers and version to one file, atomically."""
        from simulators.world_model.checkpoint import save_checkpoint

        save_checkpoint(self, path)

    @classmethod
    def load(cls, path, task: str | Task | None = None, state_size: int | None = None,
             action_size: int | None = None, config: WorldModelConfig | None = None) -> WorldModel:
        """Load a checkpoint; a task/size mismatch or a corrupt file raises ``ValueError`` saying what is wrong.

        Without ``config`` the model keeps the config it was saved with. With ``config`` its
        ``ARCHITECTURE`` fields must equal the checkpoint's (``ValueError`` names each that differs)
        and every other field (how to fit, where to run) is taken from ``config``.
        """
        from simulators.world_model.checkpoint import load_checkpoint

        return load_checkpoint(cls, path, task, state_size, action_size, config)

    def config_dict(self) -> dict:
        return asdict(self.config)

    def __repr__(self) -> str:
        return (f"WorldModel(task={self.task.name!r}, state_size={self.state_size}, action_size={self.action_size}, "
                f"members={self.config.ensemble_size}, base={self.config.base!r}, version={self.version!r}, "
                f"fitted={self.fitted})")
