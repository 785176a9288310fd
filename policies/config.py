"""Policy-worker configuration: our own PPO settings and where the workers' environments come from.

Plain dataclasses (composable into the flywheel's OmegaConf schema); the RLlib configuration is
built from them in ``policies.rllib_adapter`` and nowhere else::

    ppo = ppo_config_for("pendulum", num_env_runners=2)        # configs/task/pendulum.yaml + overrides
    env = EnvConfig(task="pendulum", addresses=[server.address], fidelity=1.0)
    trainer = PolicyTrainer(ppo, env)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

ACTIVATIONS = ("tanh", "relu", "silu", "elu")
LOCAL = "local"  # the address of an in-process simulator (no server)
RESTART_SEED_BASE = 2**32   # a restarted policy worker's env seeds lie above every first worker's (seed + 1000 x index)


@dataclass
class PPOConfig:
    """PPO hyper-parameters, network and worker layout (one learner on the driver)."""

    lr: float = 3e-4
    lr_final: float = 0.0               # > 0: lr falls linearly to this over lr_decay_steps env steps, then stays
    lr_decay_steps: int = 0             # lifetime env steps (carried across laps by the checkpoint)
    gamma: float = 0.99
    lambda_: float = 0.95
    clip: float = 0.2                   # PPO surrogate clip
    vf_clip: float = 10.0               # value-function loss clip
    vf_loss_coeff: float = 0.5
    entropy_coeff: float = 0.0
    kl_coeff: float = 0.0               # the KL penalty's initial coefficient (RLlib adapts it); 0 turns it off
    grad_clip: float = 0.5
    train_batch_size: int = 4000        # env steps per training iteration
    minibatch_size: int = 256
    num_epochs: int = 10
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    num_env_runners: int = 1            # EnvRunner actors; 0 steps the env in the driver
    num_envs_per_runner: int = 16       # envs in each runner's (gRPC-backed) VectorEnv
    num_cpus_per_runner: float = 1.0
    rollout_fragment_length: int = 0    # 0 = auto (train_batch_size / (runners * envs))
    sample_timeout_s: float = 120.0
    max_runner_restarts: int = 100      # restarts of failed EnvRunners before they are dropped
    restart_delay_s: float = 1.0
    seed: int = 0

    def validate(self) -> PPOConfig:
        """Raise ``ValueError`` naming the first out-of-range field and what is allowed."""
        positive = ("lr", "train_batch_size", "minibatch_size", "num_epochs", "num_envs_per_runner", "sample_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gamma", "lambda_"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if (self.lr_final > 0) != (self.lr_decay_steps > 0) or self.lr_final < 0 or self.lr_decay_steps < 0:
            raise ValueError(f"PPOConfig.lr_final ({self.lr_final!r}) and lr_decay_steps ({self.lr_decay_steps!r}) go "
                             f"together: both 0 (a constant lr) or both > 0 (lr falls linearly to lr_final)")
        nonneg = ("clip", "vf_clip", "vf_loss_coeff", "entropy_coeff", "kl_coeff", "grad_clip", "num_env_runners",
                  "num_cpus_per_runner", "rollout_fragment_length", "max_runner_restarts", "restart_delay_s")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.minibatch_size > self.train_batch_size:
            raise ValueError(f"PPOConfig.minibatch_size ({self.minibatch_size}) must be <= train_batch_size "
                             f"({self.train_batch_size})")
        self._check_rollout_sizes()
        if not self.hidden_sizes or any(int(h) < 1 for h in self.hidden_sizes):
            raise ValueError(f"PPOConfig.hidden_sizes must be a non-empty list of positive ints, got {self.hidden_sizes!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"PPOConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        return self

    def _check_rollout_sizes(self) -> None:
        """Each iteration samples ``train_batch_size`` steps: at least one per env, in whole fragments (RLlib's rule)."""
        envs = max(1, self.num_env_runners) * self.num_envs_per_runner
        if self.train_batch_size < envs:
            raise ValueError(f"PPOConfig.train_batch_size ({self.train_batch_size}) must be >= the envs that sample it, "
                             f"max(1, num_env_runners) x num_envs_per_runner = {envs}")
        if self.rollout_fragment_length:
            step = envs * self.rollout_fragment_length
            sampled = -(-self.train_batch_size // step) * step
            if sampled > 1.1 * self.train_batch_size:
                raise ValueError(f"PPOConfig.rollout_fragment_length ({self.rollout_fragment_length}) x {envs} envs samples "
                                 f"{sampled} steps per iteration for train_batch_size {self.train_batch_size} (more than "
                                 f"10% over); allowed: 0 (auto) or a length whose multiple of {envs} envs is within 10% "
                                 f"of train_batch_size, e.g. {max(1, self.train_batch_size // envs)}")

    def lr_schedule(self) -> float | list[list[float]]:
        """RLlib's ``lr``: the constant rate, or ``[[0, lr], [lr_decay_steps, lr_final]]`` (linear, by lifetime env steps)."""
        if not self.lr_decay_steps:
            return self.lr
        return [[0, self.lr], [int(self.lr_decay_steps), self.lr_final]]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EnvConfig:
    """What every EnvRunner's environment is: a session on one of ``addresses`` (``server_order``).

    Each runner opens ``PPOConfig.num_envs_per_runner`` envs in one session of the corrected simulator
    with the given fidelity, mode, horizon and reward weights (empty = the server's weights). A runner
    prefers a server on its own Ray node (``server_nodes``); if its server is unreachable it tries the
    others in order. ``token_file`` and ``tls_root_cert`` are paths read on the runner's node (left
    empty, the runner's environment: ``$FLYWHEEL_TOKEN_FILE``, ``$FLYWHEEL_TOKEN``, ``$FLYWHEEL_TLS_ROOT_CERT``).
    """

    task: str = "pendulum"
    addresses: list[str] = field(default_factory=list)
    fidelity: float = 1.0
    mode: str = "blend"
    horizon: int = 0                    # imagination window; 0 = the server's default
    reward_weights: dict[str, float] = field(default_factory=dict)
    world_model_version: str = ""       # "" = the server's current world model
    streaming: bool = False             # bidirectional streaming Step instead of unary calls
    lanes: int = 1                      # sessions per runner stepped in turn (2: policy and server overlap)
    timeout_s: float = 60.0             # per gRPC call
    seed: int = 0                       # runner i seeds its session with seed + 1000 * i
    local_engine: str = "mujoco"        # physics of the in-process simulator when addresses == ["local"]
    server_nodes: list[str] = field(default_factory=list)   # Ray node id of each address ("" unknown); [] = none known
    token_file: str | None = None       # the servers' token (a path on the runner's node); None: the environment's
    tls_root_cert: str | None = None    # PEM CA of the servers' TLS certificate; None: $FLYWHEEL_TLS_ROOT_CERT or plaintext

    def validate(self) -> EnvConfig:
        if not self.addresses:
            raise ValueError("EnvConfig.addresses must list at least one simulator server address (host:port)")
        if list(self.addresses) != [LOCAL] and not all(isinstance(a, str) and ":" in a for a in self.addresses):
            raise ValueError(f"EnvConfig.addresses must be 'host:port' strings (or just ['{LOCAL}'] for an "
                             f"in-process simulator), got {list(self.addresses)!r}")
        if not 0.0 <= self.fidelity <= 1.0:
            raise ValueError(f"EnvConfig.fidelity must be in [0, 1], got {self.fidelity!r}")
        if not self.mode:
            raise ValueError("EnvConfig.mode must name a corrected-simulator mode, e.g. 'blend'")
        if self.horizon < 0 or self.timeout_s <= 0:
            raise ValueError(f"EnvConfig.horizon must be >= 0 and timeout_s > 0, got {self.horizon}, {self.timeout_s}")
        if not 1 <= self.lanes <= 8:
            raise ValueError(f"EnvConfig.lanes must be in [1, 8] (sessions per EnvRunner stepped in turn), "
                             f"got {self.lanes!r}")
        if self.server_nodes and len(self.server_nodes) != len(self.addresses):
            raise ValueError(f"EnvConfig.server_nodes must name one node per address ({len(self.addresses)}) or be "
                             f"empty, got {len(self.server_nodes)}")
        return self

    def server_order(self, node_id: str, index: int) -> list[str]:
        """The addresses worker ``index`` (0-based) on Ray node ``node_id`` tries, in order (``server_order``)."""
        return server_order(list(self.addresses), list(self.server_nodes), node_id, index)

    def credentials(self) -> dict:
        """The client's keyword arguments for a secured server (``RemoteVectorEnv``/``SimulatorClient``)."""
        return {"token_file": self.token_file or None, "tls_root_cert": self.tls_root_cert or None}

    def to_dict(self) -> dict:
        return asdict(self)


def server_order(addresses: list[str], server_nodes: list[str], node_id: str, index: int) -> list[str]:
    """The servers a policy worker tries: those on its own node first (``index`` spreads workers over them),
    else all of them (``index`` spreads workers evenly); every other address follows as a fallback."""
    local = [a for a, n in zip(addresses, server_nodes) if n and n == node_id]
    pool = local or list(addresses)
    k = index % len(pool)
    first = pool[k:] + pool[:k]
    return first + [a for a in addresses if a not in first]


TASK_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "task"


def task_ppo_defaults(task: str) -> dict:
    """A task's tuned PPO settings: the ``ppo:`` section of ``configs/task/<task>.yaml``, with its
    ``simulator.num_envs`` as ``num_envs_per_runner`` (the flywheel's one key for envs per worker)."""
    path = TASK_CONFIG_DIR / f"{task}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TASK_CONFIG_DIR.glob("*.yaml")))
        raise ValueError(f"no PPO defaults for task {task!r}: {path} does not exist; tasks with defaults: {known}")
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    out = dict(data.get("ppo") or {})
    num_envs = (data.get("simulator") or {}).get("num_envs")
    if num_envs is not None:
        out["num_envs_per_runner"] = num_envs
    return out


class _TaskDefaults(Mapping[str, dict]):
    """Read-only view ``task -> task_ppo_defaults(task)`` over ``configs/task/*.yaml``."""

    def __getitem__(self, task: str) -> dict:
        if not (TASK_CONFIG_DIR / f"{task}.yaml").exists():
            raise KeyError(task)
        return task_ppo_defaults(task)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(p.stem for p in TASK_CONFIG_DIR.glob("*.yaml")))

    def __len__(self) -> int:
        return len(list(TASK_CONFIG_DIR.glob("*.yaml")))


# Tuned per task so that a user gets a learning policy without tuning (see tests/test_policies_learning.py).
TASK_DEFAULTS: Mapping[str, dict] = _TaskDefaults()


def ppo_config_for(task: str, **overrides) -> PPOConfig:
    """``PPOConfig`` with the task's tuned defaults (``task_ppo_defaults``), then ``overrides``; unknown keys are an error."""
    names = {f.name for f in fields(PPOConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown PPOConfig key(s) {sorted(unknown)}; allowed: {', '.join(sorted(names))}")
    defaults = task_ppo_defaults(task)
    unknown = set(defaults) - names
    if unknown:
        raise ValueError(f"unknown PPOConfig key(s) {sorted(unknown)} in {TASK_CONFIG_DIR / (task + '.yaml')}; "
                         f"allowed: {', '.join(sorted(names))}")
    return PPOConfig(**{**defaults, **overrides}).validate()
