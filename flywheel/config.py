"""The flywheel's configuration: OmegaConf structured config with dataclasses as the schema.

The layers (schema <- configs/default.yaml <- configs/task/<task>.yaml <- preset <- command line), the
keys that follow another key and the keys the flywheel fills in per lap are in ``flywheel.layers``.
An unknown key, a wrongly typed value, an out-of-range value or options that cannot work together
raise ``ConfigError`` naming the key and what is allowed, before anything starts. The resolved config
is saved as YAML in the run directory; ``config_hash`` fingerprints the parts that change results (not
run location, lap count, tracking or Ray resources), so a resume can refuse a changed config.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flywheel.cluster import PLACEMENTS
from flywheel.layers import FOLLOWS, PER_LAP, Composed, ConfigError, compose, leaf_keys
from flywheel.sections import PPOConfig, RewardConfig, ServerConfig, WorldModelConfig
from policies.planner import PlannerConfig
from simulators.dataset import atomic_write
from simulators.physics import ENGINES
from simulators.tasks import PARAM_NAMES, TASKS, make_task
from simulators.tasks.base import PARAM_MAX

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SIM_MODES = ("blend", "reground")
AGENT_KINDS = ("ppo", "planner")
# Keys that do not change what a run computes: excluded from the resume hash.
_HASH_EXCLUDED = ("run_dir", "runs_root", "laps", "preset", "tracking", "ray")


@dataclass
class PhysicsParams:
    """Scales of the MJCF's physics (1.0 = the task as written); reality vs engine is the sim-to-real gap."""

    mass_scale: float = 1.0
    damping_scale: float = 1.0
    gain_scale: float = 1.0
    friction_scale: float = 1.0


@dataclass
class EngineSection:
    """The physics engine that corrects the world model inside the learned simulator."""

    name: str = "auto"
    params: PhysicsParams = field(default_factory=PhysicsParams)


@dataclass
class RealitySection:
    """Ground truth: where the seed data comes from and where capability is measured."""

    engine: str = "auto"
    params: PhysicsParams = field(default_factory=PhysicsParams)
    seed_steps: int = 8000          # transitions of random-policy seed data collected in lap 0
    seed_action_scale: float = 1.0  # the seed policy's actions span this fraction of the action bounds
    seed_envs: int = 16
    eval_episodes: int = 32
    steps_per_lap: int = 0          # reality transitions each lap spends with the lap's policy (train the WM too)
    gap_warning: float = 0.3        # flag a lap whose simulated success exceeds reality's by more than this


@dataclass
class SimulatorSection:
    """The learned world simulator served to the policy workers."""

    fidelity: float = 0.5
    mode: str = "blend"
    horizon: int = 5
    num_envs: int = 16              # envs per session (per policy worker)


@dataclass
class SelfPlaySection:
    """The lap's policy-training budget in the served simulator."""

    iterations: int = 4             # PPO training iterations per lap
    num_servers: int = 1
    lanes: int = 1                  # sessions per policy worker stepped in turn: 2 overlaps the policy with the server


@dataclass
class SelectionSection:
    """Which self-play episodes retrain the world model."""

    require_success: bool = True
    min_imagination_accuracy: float = 0.0   # mean accuracy over the episode's closed windows, in [0, 1]
    max_physics_violation: float = 1.0      # mean violation (-reward/physics) over closed windows, in [0, 1]
    max_episodes: int = 0                    # per lap; 0 = no cap


@dataclass
class GuardSection:
    """The model-exploitation guard (``flywheel.guard``): self-play replayed in the engine each lap."""

    threshold: float = 0.1          # flag a lap whose mean per-step task reward served exceeds the replay's by this
    max_episodes: int = 64          # complete self-play episodes replayed per lap
    window: int = 10                # control steps replayed from each served state; 0 = whole episodes open loop
    replay_on_flag: bool = True     # a flagged lap's engine replays train the next world model too


@dataclass
class AgentSection(PlannerConfig):
    """The agent in the served simulator: PPO (the ``ppo`` section) or the planner (``policies.planner``'s fields)."""

    kind: str = "ppo"               # ppo | planner


@dataclass
class ServiceSection(ServerConfig):
    """The simulator servers: ``ServerConfig``'s fields, and where the flywheel places them (``flywheel.cluster``)."""

    placement: str = "spread"       # spread: self_play.num_servers over the nodes that fit one | per_node: servers_per_node on each
    servers_per_node: int = 1       # placement=per_node: servers on every node with service.num_gpus GPUs (any node when 0)
    tls_root_cert: str | None = None    # PEM CA the policy workers trust for TLS servers; None: service.tls_cert_file


@dataclass
class RaySection:
    address: str | None = None   # None: a local ray.init() on this machine's cores
    num_cpus: int | None = None  # a new local Ray's CPUs (None: what Ray detects, at least 2); not with address
    include_dashboard: bool = False   # a new local Ray's dashboard; not with address


@dataclass
class TrackingSection:
    uri: str | None = None       # None: sqlite:///<runs_root>/mlflow.db, shared by all local runs
    experiment: str = "flywheel"


@dataclass
class FlywheelConfig:
    """The whole run. ``laps`` counts lap 0 (seed data + first world model) too."""

    task: str = "pendulum"
    seed: int = 0
    laps: int = 4
    retrain: bool = True            # false: the world model stays the seed model (the no-retraining ablation)
    preset: str | None = None
    run_dir: str | None = None
    runs_root: str = "runs"
    engine: EngineSection = field(default_factory=EngineSection)
    reality: RealitySection = field(default_factory=RealitySection)
    simulator: SimulatorSection = field(default_factory=SimulatorSection)
    self_play: SelfPlaySection = field(default_factory=SelfPlaySection)
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    selection: SelectionSection = field(default_factory=SelectionSection)
    guard: GuardSection = field(default_factory=GuardSection)
    agent: AgentSection = field(default_factory=AgentSection)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    service: ServiceSection = field(default_factory=ServiceSection)
    ray: RaySection = field(default_factory=RaySection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


# -- loading -----------------------------------------------------------------------------------
def load_config(overrides: list[str] | tuple[str, ...] = (), base: str | Path | None = None,
                config_dir: str | Path = CONFIG_DIR) -> FlywheelConfig:
    """Compose and validate the config; ``base`` (a saved resolved config) replaces the YAML layers."""
    return load_config_with_origins(overrides, base, config_dir)[0]


# a section's own check names its class; the user wrote the section's key
CONFIG_CLASS_KEYS = {"ServerConfig.": "service.", "WorldModelConfig.": "world_model.", "PlannerConfig.": "agent.",
                     "PPOConfig.": "ppo.", "RewardConfig.": "rewards."}


def _keyed(exc: BaseException) -> str:
    """The first line of a section's error with its class name (``ServerConfig.port``) as the config key (``service.port``)."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for cls, key in CONFIG_CLASS_KEYS.items():
        line = line.replace(cls, key)
    return line


def load_config_with_origins(overrides: list[str] | tuple[str, ...] = (), base: str | Path | None = None,
                             config_dir: str | Path = CONFIG_DIR) -> tuple[FlywheelConfig, Composed]:
    """``load_config`` and the composition it came from (``Composed.origin(key)`` names each value's layer)."""
    composed = compose(FlywheelConfig, overrides, base, config_dir, TASKS)
    try:
        obj = OmegaConf.to_object(composed.node)
    except (ValueError, TypeError) as exc:  # a section's own __post_init__ checks
        raise ConfigError(f"invalid config: {_keyed(exc)}") from exc
    except Exception as exc:  # an interpolation that does not resolve
        raise ConfigError(f"invalid config: {str(exc).splitlines()[0]}") from None
    validate(obj)
    return obj, composed


SERVE_KEYS = ("task", "seed", "preset", "simulator.horizon", "engine.", "rewards.", "service.")


def load_service_config(overrides: list[str] | tuple[str, ...] = (), **per_run: Any) -> ServerConfig:
    """A simulator server's config from ``load_config``'s layers (``flywheel serve``), filled in as a lap fills it.

    Overrides may set ``task``, ``seed``, ``preset``, ``simulator.horizon``, ``engine.*``, ``rewards.*`` and
    ``service.*``; ``per_run`` sets the fields a lap fills in (``world_model_path``, ``trajectory_dir``, ...).
    """
    for item in overrides:
        key = item.partition("=")[0]
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in SERVE_KEYS):
            raise ConfigError(f"config key '{key}' does not configure a simulator server; allowed: task, seed, preset, "
                              "simulator.horizon, engine.*, rewards.*, service.*")
    cfg = load_config(overrides)
    try:
        return replace(cfg.service, task=cfg.task, engine=cfg.engine.name, engine_params=vars(cfg.engine.params),
                       seed=cfg.seed, reward=cfg.rewards, **per_run)
    except ValueError as exc:
        raise ConfigError(f"invalid config: {_keyed(exc)}") from None


def format_config(cfg: FlywheelConfig, composed: Composed) -> str:
    """The resolved config as ``key: value    # origin`` lines (``flywheel config show``)."""
    data = to_container(cfg)
    rows = []
    for key in leaf_keys(data):
        if any(key == k or key.startswith(k + ".") for k in PER_LAP):
            continue
        value = data
        for part in key.split("."):
            value = value[part]
        origin = composed.origin(key)
        if key in FOLLOWS:
            origin = f"follows {FOLLOWS[key]} ({composed.origin(FOLLOWS[key])})"
        rows.append((f"{key}: {_scalar(value)}", origin))
    width = min(60, max(len(r[0]) for r in rows)) + 2
    lines = [f"{text:<{width}}# {origin}" for text, origin in rows]
    lines.append(f"# filled in by the flywheel for each lap: {', '.join(PER_LAP)}")
    return "\n".join(lines)


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value if value and value.strip() == value and value[0] not in "[{'\"#&*!|>%@`" else json.dumps(value)
    return json.dumps(value)


# -- validation --------------------------------------------------------------------------------
def _check_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, allowed))}")


# The largest run seed: runners, evaluations and laps derive theirs by adding offsets (1000 per runner, 7919 per
# lap), and numpy and RLlib take seeds below 2**32
MAX_SEED = 2**31 - 1

def _check_warm_start(path: str, task_name: str) -> None:
    """The planner's warm-start file is a readable PPO policy of this task's observations and actions."""
    from policies.checkpoint import CheckpointError
    from policies.torch_policy import TorchPolicy

    try:
        policy = TorchPolicy.load(path)
    except (CheckpointError, OSError, ValueError) as exc:
        raise ConfigError(f"config key 'agent.warm_start' ({path!r}) is not a PPO policy file: {exc}") from None
    task = make_task(task_name)
    if policy.observation_size != task.observation_size:
        raise ConfigError(f"config key 'agent.warm_start' ({path!r}) is a policy of {policy.observation_size} "
                          f"observations; task {task_name} has {task.observation_size}, so it is another task's "
                          f"policy; allowed: a PPO policy file of a {task_name} run")

def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    ok = (value is not None and math.isfinite(value) and (lo is None or value > lo or (value == lo and not lo_open))
          and (hi is None or value <= hi))
    if not ok:
        if hi is None:
            rng = f"{'>' if lo_open else '>='} {lo}"
        else:
            rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: a number {rng}")


def validate(cfg: FlywheelConfig) -> None:
    """Range and choice checks of the flywheel's own sections (sub-configs check themselves), then combinations."""
    _check_choice("task", cfg.task, TASKS)
    _check_range("seed", cfg.seed, 0, MAX_SEED)
    _check_range("laps", cfg.laps, 1)
    _check_choice("engine.name", cfg.engine.name, ENGINES)
    _check_choice("reality.engine", cfg.reality.engine, ENGINES)
    for section in ("engine", "reality"):
        params = getattr(cfg, section).params
        for name in PARAM_NAMES:
            _check_range(f"{section}.params.{name}", getattr(params, name), 0.0, PARAM_MAX, lo_open=True)
    _check_range("reality.seed_steps", cfg.reality.seed_steps, 1)
    _check_range("reality.seed_envs", cfg.reality.seed_envs, 1)
    _check_range("reality.eval_episodes", cfg.reality.eval_episodes, 1)
    _check_range("reality.seed_action_scale", cfg.reality.seed_action_scale, 0.01, 1.0)
    _check_range("reality.steps_per_lap", cfg.reality.steps_per_lap, 0)
    _check_range("reality.gap_warning", cfg.reality.gap_warning, 0.0, 1.0)
    _check_range("simulator.fidelity", cfg.simulator.fidelity, 0.0, 1.0)
    _check_choice("simulator.mode", cfg.simulator.mode, SIM_MODES)
    _check_range("simulator.horizon", cfg.simulator.horizon, 1)
    _check_range("simulator.num_envs", cfg.simulator.num_envs, 1)
    _check_range("self_play.iterations", cfg.self_play.iterations, 1)
    _check_range("self_play.num_servers", cfg.self_play.num_servers, 1)
    _check_range("self_play.lanes", cfg.self_play.lanes, 1, 8)
    _check_range("selection.min_imagination_accuracy", cfg.selection.min_imagination_accuracy, 0.0, 1.0)
    _check_range("selection.max_physics_violation", cfg.selection.max_physics_violation, 0.0, 1.0)
    _check_range("selection.max_episodes", cfg.selection.max_episodes, 0)
    _check_range("guard.threshold", cfg.guard.threshold, 0.0, 1.0)
    _check_range("guard.max_episodes", cfg.guard.max_episodes, 1)
    _check_range("guard.window", cfg.guard.window, 0)
    _check_choice("service.placement", cfg.service.placement, PLACEMENTS)
    _check_range("service.servers_per_node", cfg.service.servers_per_node, 1)
    if cfg.ray.num_cpus is not None:
        _check_range("ray.num_cpus", cfg.ray.num_cpus, 1)
    try:
        cfg.ppo.validate()
    except ValueError as exc:
        raise ConfigError(f"invalid config section 'ppo': {_keyed(exc)}") from None
    _check_agent(cfg)
    if not cfg.tracking.experiment:
        raise ConfigError("config key 'tracking.experiment' is empty; allowed: a non-empty experiment name")
    _check_combinations(cfg)


def _check_combinations(cfg: FlywheelConfig) -> None:
    """Options that are each in range but cannot work together."""
    envs, servers = cfg.simulator.num_envs, cfg.self_play.num_servers
    workers, who = max(1, cfg.ppo.num_env_runners), "max(1, ppo.num_env_runners)"
    if cfg.agent.kind == "planner":
        workers, who = cfg.agent.num_workers, "agent.num_workers"
    if cfg.service.max_batch < envs:
        raise ConfigError(f"config key 'service.max_batch' ({cfg.service.max_batch}) is below 'simulator.num_envs' "
                          f"({envs}), the envs of each policy worker's session; allowed: service.max_batch >= {envs}")
    if servers > workers:
        raise ConfigError(f"config key 'self_play.num_servers' ({servers}) is above the policy workers that use them "
                          f"({who} = {workers}); allowed: at most {workers}")
    lanes = cfg.self_play.lanes if cfg.agent.kind == "ppo" else 1
    if lanes > envs:
        raise ConfigError(f"config key 'self_play.lanes' ({lanes}) is above 'simulator.num_envs' ({envs}): a lane is a "
                          f"session of at least one env; allowed: 1 to {min(envs, 8)}")
    sessions = -(-workers // servers) * lanes
    if cfg.service.max_sessions < sessions:
        raise ConfigError(f"config key 'service.max_sessions' ({cfg.service.max_sessions}) is below the sessions each "
                          f"server holds ({workers} policy workers x {lanes} lane(s) over {servers} server(s)); "
                          f"allowed: >= {sessions}")
    if cfg.service.port and servers > 1:
        raise ConfigError(f"config key 'service.port' ({cfg.service.port}) is one fixed port for {servers} servers "
                          f"(self_play.num_servers); allowed: service.port=0 (each server picks a free port) or "
                          f"self_play.num_servers=1")
    if str(cfg.ray.address or "").strip().lower().startswith("ray://"):
        raise ConfigError(f"config key 'ray.address' is {cfg.ray.address!r}, a Ray Client address: the driver would run "
                          "here while its Ray work runs on the head, and the run directory, trajectory store and "
                          "checkpoints are the driver's local files; allowed: run flywheel on a cluster node with "
                          "ray.address=auto (or <head ip>:6379), e.g. through `ray attach` or `ray job submit`")
    if cfg.ray.address and (cfg.ray.num_cpus is not None or cfg.ray.include_dashboard):
        given = "ray.num_cpus" if cfg.ray.num_cpus is not None else "ray.include_dashboard"
        raise ConfigError(f"config key '{given}' sizes a new local Ray; with 'ray.address' ({cfg.ray.address}) the run "
                          "joins a running cluster, whose CPUs and dashboard `ray start` set; allowed: leave it unset "
                          "with ray.address, or drop ray.address")
    length = make_task(cfg.task).episode_length
    if cfg.simulator.horizon > length:
        raise ConfigError(f"config key 'simulator.horizon' ({cfg.simulator.horizon}) is longer than a {cfg.task} episode "
                          f"({length} steps): no imagination window would close; allowed: 1 to {length}")


def config_warnings(cfg: FlywheelConfig) -> list[str]:
    """Settings that run but cannot give a lap what it needs (said at the start of a run, tagged in MLflow)."""
    out = []
    if cfg.agent.kind == "ppo":
        workers, envs = max(1, cfg.ppo.num_env_runners), cfg.simulator.num_envs
        budget = cfg.self_play.iterations * cfg.ppo.train_batch_size
        length = make_task(cfg.task).episode_length
        if budget // (workers * envs) < length:
            out.append(f"self-play samples {budget} env steps over {workers} x {envs} envs: {budget // (workers * envs)} "
                       f"steps per env, under one {cfg.task} episode ({length} steps), so only episodes that end early "
                       "finish and a lap may select nothing; raise self_play.iterations or ppo.train_batch_size, or "
                       "lower simulator.num_envs")
    return out


def _check_agent(cfg: FlywheelConfig) -> None:
    """``agent.kind`` and, for the planner, its settings, its horizon against the window and the task it needs."""
    _check_choice("agent.kind", cfg.agent.kind, AGENT_KINDS)
    try:
        PlannerConfig.from_object(cfg.agent).validate()
    except ValueError as exc:
        raise ConfigError(f"invalid config section 'agent': {str(exc).replace('PlannerConfig.', 'agent.')}") from None
    if cfg.agent.kind != "planner":
        return
    if cfg.agent.replan == "window" and cfg.agent.horizon < cfg.simulator.horizon:
        raise ConfigError(f"config key 'agent.horizon' ({cfg.agent.horizon}) is shorter than the imagination window "
                          f"'simulator.horizon' ({cfg.simulator.horizon}) the planner commits to (agent.replan=window); "
                          f"allowed: agent.horizon >= {cfg.simulator.horizon}, or agent.replan=step")
    if cfg.agent.warm_start and not Path(cfg.agent.warm_start).is_file():
        raise ConfigError(f"config key 'agent.warm_start' ({cfg.agent.warm_start!r}) is not a file; allowed: \"\" "
                          "(no warm start) or a PPO policy file such as runs/<run>/checkpoints/policy_lap003.pt")
    if cfg.agent.warm_start:
        _check_warm_start(cfg.agent.warm_start, cfg.task)
    from policies.planner import ObservationInverse

    try:
        ObservationInverse.for_task(make_task(cfg.task))
    except ValueError as exc:
        raise ConfigError(f"config key 'agent.kind' is 'planner', which cannot plan task {cfg.task!r}: {exc}; "
                          f"allowed: agent.kind=ppo for this task") from None


# -- saving and fingerprinting -----------------------------------------------------------------
def to_container(cfg: FlywheelConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: FlywheelConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: FlywheelConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    text = to_yaml(cfg).encode()
    atomic_write(path, lambda f: f.write(text))
    return Path(path)


def config_hash(cfg: FlywheelConfig) -> str:
    """A stable fingerprint of everything that changes a run's results."""
    data = {k: v for k, v in to_container(cfg).items() if k not in _HASH_EXCLUDED}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def keys_added_since(cfg: FlywheelConfig, saved: str | Path) -> tuple[list[str], str]:
    """The keys of ``cfg`` that the saved config file lacks (added to Flywheel since it was written), and the
    fingerprint ``config_hash`` gives ``cfg`` without them: equal to the run's, the new keys are all that changed."""
    raw = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    added: list[str] = []

    def prune(x: Any, y: Any, prefix: str) -> Any:
        if not (isinstance(x, dict) and isinstance(y, dict)):
            return x
        added.extend(f"{prefix}{k}" for k in sorted(set(x) - set(y)))
        return {k: prune(v, y[k], f"{prefix}{k}.") for k, v in x.items() if k in y}

    data = {k: v for k, v in prune(to_container(cfg), raw, "").items() if k not in _HASH_EXCLUDED}
    return [k for k in added if k.split(".")[0] not in _HASH_EXCLUDED], \
        hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(a: FlywheelConfig, b: FlywheelConfig) -> list[str]:
    """The dotted keys whose values differ (hash-relevant keys only), as ``key: old -> new``."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if not prefix and k in _HASH_EXCLUDED:
                    continue
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix[:-1]}: {x!r} -> {y!r}")

    walk(to_container(a), to_container(b), "")
    return out
