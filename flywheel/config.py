"""The flywheel's configuration: OmegaConf structured config with dataclasses as the schema.

Loading order (later wins)::

    schema (these dataclasses)
      <- configs/default.yaml
      <- policies.config.TASK_DEFAULTS[task]      (tuned PPO settings per task)
      <- configs/task/<task>.yaml
      <- configs/preset/<preset>.yaml             (only when ``preset=...`` is given)
      <- CLI dotlist overrides                    (``simulator.fidelity=0.5 laps=6``)

An unknown key, a wrongly typed value or an out-of-range value raises ``ConfigError`` naming the
key and what is allowed, before anything starts. The resolved config is saved as YAML in the run
directory; ``config_hash`` fingerprints the parts that change results (not run location, lap count,
tracking or Ray resources), so a resume can refuse a changed config.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from flywheel.sections import PPOConfig, RewardConfig, ServerConfig, WorldModelConfig, task_ppo_defaults
from simulators.dataset import atomic_write
from simulators.physics import ENGINES
from simulators.tasks import PARAM_NAMES, TASKS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SIM_MODES = ("blend", "reground")
# Keys that do not change what a run computes: excluded from the resume hash.
_HASH_EXCLUDED = ("run_dir", "runs_root", "laps", "preset", "tracking", "ray")


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what is allowed."""


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


@dataclass
class SelectionSection:
    """Which self-play episodes retrain the world model."""

    require_success: bool = True
    min_imagination_accuracy: float = 0.0   # mean accuracy over the episode's closed windows, in [0, 1]
    max_physics_violation: float = 1.0      # mean violation (-reward/physics) over closed windows, in [0, 1]
    max_episodes: int = 0                    # per lap; 0 = no cap


@dataclass
class RaySection:
    address: str | None = None   # None: a local ray.init() on this machine's cores
    num_cpus: int | None = None
    include_dashboard: bool = False


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
    ppo: PPOConfig = field(default_factory=PPOConfig)
    service: ServerConfig = field(default_factory=ServerConfig)
    ray: RaySection = field(default_factory=RaySection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


# -- loading -----------------------------------------------------------------------------------
def load_config(overrides: list[str] | tuple[str, ...] = (), base: str | Path | None = None,
                config_dir: str | Path = CONFIG_DIR) -> FlywheelConfig:
    """Compose and validate the config; ``base`` (a saved resolved config) replaces the YAML layers."""
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. simulator.fidelity=0.5)")
    cli = _merge("command line", OmegaConf.structured(FlywheelConfig), OmegaConf.from_dotlist(overrides))
    cfg = OmegaConf.structured(FlywheelConfig)
    config_dir = Path(config_dir)
    if base is not None:
        cfg = _merge(str(base), cfg, OmegaConf.load(base))
    else:
        cfg = _merge("configs/default.yaml", cfg, _yaml(config_dir / "default.yaml"))
        task = cli.task if _has(overrides, "task") else cfg.task
        _check_choice("task", task, TASKS)
        cfg.task = task
        cfg = _merge(f"ppo defaults of task {task}", cfg, OmegaConf.create({"ppo": task_ppo_defaults(task)}))
        task_file = config_dir / "task" / f"{task}.yaml"
        if task_file.exists():
            cfg = _merge(f"configs/task/{task}.yaml", cfg, _yaml(task_file))
        preset = cli.preset if _has(overrides, "preset") else cfg.preset
        if preset:
            presets = sorted(p.stem for p in (config_dir / "preset").glob("*.yaml"))
            _check_choice("preset", preset, presets)
            cfg = _merge(f"configs/preset/{preset}.yaml", cfg, _yaml(config_dir / "preset" / f"{preset}.yaml"))
            cfg.preset = preset
    cfg = _merge("command line", cfg, OmegaConf.from_dotlist(overrides))
    try:
        obj = OmegaConf.to_object(cfg)
    except (ValueError, TypeError) as exc:  # a section's own __post_init__ checks
        raise ConfigError(f"invalid config: {exc}") from exc
    validate(obj)
    return obj


def _has(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def _yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    return OmegaConf.load(path)


def _merge(where: str, cfg: DictConfig, layer: Any) -> DictConfig:
    """Merge a layer onto the structured config, turning OmegaConf errors into ``ConfigError``."""
    try:
        return OmegaConf.merge(cfg, layer)
    except ConfigKeyError as exc:
        key = exc.full_key or exc.key
        parent = key.rsplit(".", 1)[0] if "." in str(key) else ""
        node = OmegaConf.select(cfg, parent) if parent else cfg
        allowed = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else "(no sub-keys)"
        where_in = f"under '{parent}'" if parent else "at the top level"
        raise ConfigError(f"unknown config key '{key}' (from {where}); allowed keys {where_in}: {allowed}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"bad value for config key '{key}' (from {where}): {msg}") from None


# -- validation --------------------------------------------------------------------------------
def _check_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, allowed))}")


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    ok = value is not None and math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: a number {rng}")


def validate(cfg: FlywheelConfig) -> None:
    """Range and choice checks of the flywheel's own sections (sub-configs check themselves)."""
    _check_choice("task", cfg.task, TASKS)
    _check_range("seed", cfg.seed, 0)
    _check_range("laps", cfg.laps, 1)
    _check_choice("engine.name", cfg.engine.name, ENGINES)
    _check_choice("reality.engine", cfg.reality.engine, ENGINES)
    for section in ("engine", "reality"):
        params = getattr(cfg, section).params
        for name in PARAM_NAMES:
            _check_range(f"{section}.params.{name}", getattr(params, name), 0.0)
    _check_range("reality.seed_steps", cfg.reality.seed_steps, 1)
    _check_range("reality.seed_envs", cfg.reality.seed_envs, 1)
    _check_range("reality.eval_episodes", cfg.reality.eval_episodes, 1)
    _check_range("reality.seed_action_scale", cfg.reality.seed_action_scale, 0.01, 1.0)
    _check_range("simulator.fidelity", cfg.simulator.fidelity, 0.0, 1.0)
    _check_choice("simulator.mode", cfg.simulator.mode, SIM_MODES)
    _check_range("simulator.horizon", cfg.simulator.horizon, 1)
    _check_range("simulator.num_envs", cfg.simulator.num_envs, 1)
    _check_range("self_play.iterations", cfg.self_play.iterations, 1)
    _check_range("self_play.num_servers", cfg.self_play.num_servers, 1)
    _check_range("selection.min_imagination_accuracy", cfg.selection.min_imagination_accuracy, 0.0, 1.0)
    _check_range("selection.max_physics_violation", cfg.selection.max_physics_violation, 0.0, 1.0)
    _check_range("selection.max_episodes", cfg.selection.max_episodes, 0)
    if cfg.ray.num_cpus is not None:
        _check_range("ray.num_cpus", cfg.ray.num_cpus, 1)
    if cfg.rewards.horizon != cfg.simulator.horizon:
        raise ConfigError(f"config keys 'rewards.horizon' ({cfg.rewards.horizon}) and 'simulator.horizon' "
                          f"({cfg.simulator.horizon}) differ; allowed: the same imagination window in both")
    try:
        cfg.ppo.validate()
    except ValueError as exc:
        raise ConfigError(f"invalid config section 'ppo': {exc}") from None
    if not cfg.tracking.experiment:
        raise ConfigError("config key 'tracking.experiment' is empty; allowed: a non-empty experiment name")


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
