"""Composing the config from its layers, and which layer each value came from.

Layers, later wins::

    schema defaults (flywheel.config's dataclasses)
      <- configs/default.yaml
      <- configs/task/<task>.yaml                 (the task's tuned settings, PPO included)
      <- configs/preset/<preset>.yaml             (only when ``preset=...`` is given)
      <- command line                             (``simulator.fidelity=0.5 laps=6``)

A saved resolved config (``base``, a run's ``config.yaml``) replaces the YAML layers. One setting has
one key: the keys in ``FOLLOWS`` are OmegaConf interpolations of another key, and the keys in
``PER_LAP`` are filled in by the flywheel for each lap; a layer that sets either is refused with the
key to set instead (a saved config's copies of them are dropped, so they follow again).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

SCHEMA = "schema default"
COMMAND_LINE = "command line"
# key -> the key it follows (one setting, one key)
FOLLOWS: dict[str, str] = {
    "rewards.horizon": "simulator.horizon",
    "ppo.num_envs_per_runner": "simulator.num_envs",
    "ppo.seed": "seed",
    "world_model.seed": "seed",
    "service.seed": "seed",
    "service.task": "task",
    "service.engine": "engine.name",
}
# key -> what the flywheel fills it in from, for each lap and server
PER_LAP: dict[str, str] = {
    "service.engine_params": "engine.params",
    "service.reward": "rewards",
    "service.world_model_path": "the previous lap's world model",
    "service.trajectory_dir": "the lap's trajectory store",
    "service.lap": "the lap number",
    "service.episode_offset": "the lap and the server's index",
}


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what is allowed."""


@dataclass
class Composed:
    """The merged (unresolved) config and, per dotted leaf key, the layer that set its value."""

    node: DictConfig
    origins: dict[str, str]

    def origin(self, key: str) -> str:
        """The layer of ``key`` (or of its nearest parent that a layer set as a whole)."""
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return SCHEMA


def schema_node(schema: type) -> DictConfig:
    """The structured config of the dataclass ``schema`` with the ``FOLLOWS`` interpolations in place."""
    node = OmegaConf.structured(schema)
    for key, source in FOLLOWS.items():
        OmegaConf.update(node, key, "${" + source + "}", merge=False)
    return node


def compose(schema: type, overrides: Sequence[str] = (), base: str | Path | None = None,
            config_dir: str | Path = "configs", tasks: Sequence[str] = ()) -> Composed:
    """Merge the layers onto ``schema``; ``ConfigError`` for a malformed override, an unknown key or a bad value."""
    config_dir = Path(config_dir)
    cli_layer = _dotlist(list(overrides))
    for key in leaf_keys(OmegaConf.to_container(cli_layer)):
        _check_settable(key, COMMAND_LINE)
    node = schema_node(schema)
    cli = _merge(COMMAND_LINE, node, cli_layer)                   # the overrides' keys and types, checked first
    out = Composed(node, {k: SCHEMA for k in leaf_keys(OmegaConf.to_container(node))})
    out.origins.update({key: f"follows {source}" for key, source in FOLLOWS.items()})
    if base is not None:
        _apply(out, str(base), _drop_followers(_yaml(Path(base))))
    else:
        _apply(out, f"{config_dir.name}/default.yaml", _yaml(config_dir / "default.yaml"))
        task = cli.task if "task" in cli_layer else out.node.task
        _check_choice("task", task, tasks)
        task_file = config_dir / "task" / f"{task}.yaml"
        if task_file.exists():
            _apply(out, f"{config_dir.name}/task/{task}.yaml", _yaml(task_file), fixed=("task", "preset"))
        preset = cli.preset if "preset" in cli_layer else out.node.preset
        if preset:
            presets = sorted(p.stem for p in (config_dir / "preset").glob("*.yaml"))
            _check_choice("preset", preset, presets)
            _apply(out, f"{config_dir.name}/preset/{preset}.yaml", _yaml(config_dir / "preset" / f"{preset}.yaml"),
                   fixed=("task", "preset"))
    _apply(out, COMMAND_LINE, cli_layer)
    return out


def leaf_keys(data: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys of the leaves of a nested dict (lists and empty dicts are leaves)."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from leaf_keys(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1]


def _apply(out: Composed, where: str, layer: DictConfig, fixed: tuple[str, ...] = ()) -> None:
    keys = list(leaf_keys(OmegaConf.to_container(layer)))
    for key in keys:
        _check_settable(key, where, fixed)
    out.node = _merge(where, out.node, layer)
    out.origins.update({k: where for k in keys})


def _check_settable(key: str, where: str, fixed: tuple[str, ...] = ()) -> None:
    if key in FOLLOWS:
        raise ConfigError(f"config key '{key}' (from {where}) follows '{FOLLOWS[key]}' (one setting, one key); "
                          f"allowed: set '{FOLLOWS[key]}' instead")
    for owned, source in PER_LAP.items():
        if key == owned or key.startswith(owned + "."):
            raise ConfigError(f"config key '{key}' (from {where}) is filled in by the flywheel each lap from {source}; "
                              f"allowed: leave it out" + (f" and set '{source}'" if "." in source else ""))
    if key in fixed:
        raise ConfigError(f"config key '{key}' cannot be set in {where}; allowed: on the command line or in "
                          f"configs/default.yaml")


def _drop_followers(layer: DictConfig) -> DictConfig:
    """A saved config without its copies of the ``FOLLOWS`` and ``PER_LAP`` keys."""
    data = OmegaConf.to_container(layer)
    for key in (*FOLLOWS, *PER_LAP):
        parent, _, name = key.rpartition(".")
        node = data
        for part in parent.split(".") if parent else ():
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return OmegaConf.create(data)


def _dotlist(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. simulator.fidelity=0.5)")
    try:
        return OmegaConf.from_dotlist(overrides)
    except Exception as exc:  # OmegaConf's errors and the YAML parser's: a value that is not YAML
        bad = [o for o in overrides if not _parses(o)] or overrides
        raise ConfigError(f"cannot parse the override(s) {bad}: {str(exc).splitlines()[0]}; quote a value that "
                          'YAML would read otherwise, e.g. service.host=\'"[::1]"\'') from None


def _parses(override: str) -> bool:
    try:
        OmegaConf.from_dotlist([override])
        return True
    except Exception:  # noqa: BLE001 - only which one fails matters here
        return False


def _yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # a YAML syntax error, whatever the parser raises
        raise ConfigError(f"config file {path} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} holds a {type(node).__name__}; allowed: a mapping of config keys")
    return node


# RLlib's PPO / AlgorithmConfig names of the ``ppo`` section's keys: named in the error when a user gives them
RLLIB_NAMES = {"clip_param": "clip", "vf_clip_param": "vf_clip", "lambda": "lambda_", "fcnet_hiddens": "hidden_sizes",
               "fcnet_activation": "activation", "train_batch_size_per_learner": "train_batch_size",
               "num_envs_per_env_runner": "num_envs_per_runner", "num_cpus_per_env_runner": "num_cpus_per_runner",
               "max_num_env_runner_restarts": "max_runner_restarts",
               "delay_between_env_runner_restarts_s": "restart_delay_s",
               "num_sgd_iter": "num_epochs", "sgd_minibatch_size": "minibatch_size"}


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
        name = str(key).rsplit(".", 1)[-1]
        hint = f"; RLlib's {name} is 'ppo.{RLLIB_NAMES[name]}' here" if parent == "ppo" and name in RLLIB_NAMES else ""
        raise ConfigError(f"unknown config key '{key}' (from {where}){hint}; allowed keys {where_in}: {allowed}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        msg = str(exc).splitlines()[0]
        if key is not None and msg.startswith("Incompatible value 'None'"):   # key= with nothing after it
            raise ConfigError(f"config key '{key}' (from {where}) was given no value; allowed: a value after '=' "
                              f"(an empty string: {key}='\"\"')") from None
        if key is None:           # a whole section given a plain value: name the section
            sections = [k for k in (layer.keys() if isinstance(layer, DictConfig) else [])
                        if isinstance(OmegaConf.select(cfg, str(k)), DictConfig) and not isinstance(layer[k], DictConfig)]
            if sections:
                raise ConfigError(f"config key '{sections[0]}' (from {where}) is a section; give its keys, e.g. "
                                  f"{sections[0]}.<key>=<value>") from None
        raise ConfigError(f"bad value for config key '{key}' (from {where}): {msg}") from None


def _check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(map(str, allowed))}")
